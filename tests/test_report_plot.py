"""cl-report by scenario and its figure: a task-IL row (model.head=multi) is compared with the paper's task-IL
number, a class-IL row with its class-IL one; keys older runs lack do not split rows; `--plot` draws the
average accuracy over the tasks seen after each task, whose values are checked by hand on two seeds."""
import json
import math

import pytest

from cl_runner.plots import mean_std_curve
from cl_runner.report import RunRecord, collect_from_mlflow, collect_from_results, curve_lines, main, summarise, \
    swept_keys

# two seeds, three tasks: R[i][j] after task i on task j (null: not seen yet)
ACC = {0: [[90, None, None], [60, 80, None], [30, 50, 70]],  # seen averages 90, 70, 50
       1: [[100, None, None], [40, 90, None], [20, 40, 90]]}  # 100, 65, 50
ACC_TIL = {0: [[99, None, None], [97, 95, None], [96, 94, 98]],  # 99, 96, 96
           1: [[100, None, None], [99, 97, None], [90, 96, 99]]}  # 100, 98, 95


def write_run(root, name, method, seed, head="single", dataset="split_mnist", acc=None, acc_til=None, **method_keys):
    """One fake results.json of `method` on `dataset` with a single or multi head, and its matrices."""
    acc, acc_til = acc or ACC[seed], acc_til or ACC_TIL[seed]
    final, final_til = sum(acc[-1]) / len(acc[-1]), sum(acc_til[-1]) / len(acc_til[-1])
    data = {
        "schema_version": 1, "status": "finished", "config_hash": name,
        "config": {"seed": seed, "method": {"name": method, "lr": 0.001,
                                            "active_outputs": "task" if head == "multi" else "seen", **method_keys},
                   "dataset": {"name": dataset}, "model": {"name": "mlp", "head": head}},
        "choices": {"method": method, "dataset": dataset}, "acc": acc, "acc_til": acc_til,
        "metrics": {"final/avg_acc": final, "final/avg_acc_til": final_til, "final/bwt": -30.0,
                    "final/bwt_til": -2.0, "final/forgetting": 30.0, "final/forgetting_til": 2.0},
        "timings": {"total_s": 5.0}, "updated": "2026-01-01T00:00:00+00:00",
    }
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(data))


def table_rows(out):
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[:1] + lines[2:]]


@pytest.fixture
def vdv(tmp_path):
    """finetune in both split-MNIST scenarios (the paper: 19.90 class-IL, 87.19 task-IL), mas task-IL (no
    published task-IL number), CLNP single-head on permuted MNIST (the paper: task-aware 98.42 only)."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, f"ci{seed}", "finetune", seed, acc=[[100, None], [0, 39.8]] if seed else [[100, None], [0, 40]])
        write_run(root, f"ti{seed}", "finetune", seed, head="multi", acc_til=[[100, None], [75, 99.38]])
    write_run(root, "mas", "mas", 0, head="multi")
    write_run(root, "clnp", "clnp", 0, dataset="permuted_mnist", acc_til=[[98.4]])
    return root


def test_ref_compares_each_scenario_with_its_number(vdv, capsys):
    assert main([str(vdv), "--ref"]) == 0
    head, clnp, ft_class, ft_task, mas = table_rows(capsys.readouterr().out)
    assert head[:4] == ["method", "dataset", "scenario", "n"]  # model.head / active_outputs: the scenario column
    cell = dict(zip(head, ft_class))
    assert (cell["scenario"], cell["acc (class-IL)"], cell["paper"], cell["vs paper"]) == (
        "class-IL", "19.95 ± 0.07", "19.90", "✓ (18-22)")
    cell = dict(zip(head, ft_task))
    # task-IL: 87.19 against its task-IL accuracy (87.19), not 19.90 against its class-IL one (48.5)
    assert (cell["scenario"], cell["acc (task-IL)"], cell["paper"], cell["vs paper"]) == (
        "task-IL", "87.19 ± 0.00", "87.19", "✓ (80-94)")
    assert (cell["BWT"], cell["forgetting"]) == ("-2.00 ± 0.00", "2.00 ± 0.00")  # the row's scenario's
    cell = dict(zip(head, mas))  # the paper gives mas a class-IL number only; its task-IL band still judges
    assert (cell["scenario"], cell["paper"], cell["vs paper"]) == ("task-IL", "–", "✗ outside (≥ 97.5)")
    cell = dict(zip(head, clnp))  # one head, but the paper's number is task-aware
    assert (cell["scenario"], cell["paper"], cell["vs paper"]) == ("class-IL", "98.42 ± 0.04 task-IL", "✓")


def rec(seed: int, **params) -> RunRecord:
    return RunRecord("ewc", "split_mnist", seed, {"seed": str(seed), "method.lr": "0.001", **params},
                     {"final/avg_acc": 20.0 + seed})


def test_a_key_older_runs_lack_is_swept_only_if_its_values_differ():
    old, new = [rec(0), rec(1)], [rec(2, **{"method.gamma": "1.0"}), rec(3, **{"method.gamma": "1.0"})]
    assert swept_keys(old + new) == []
    (row,) = summarise(old + new)
    assert row.n == 4 and row.swept == {}
    differ = old + [rec(2, **{"method.gamma": "1.0"}), rec(3, **{"method.gamma": "0.8"})]
    assert swept_keys(differ) == ["method.gamma"]
    assert [(r.swept["method.gamma"], r.n) for r in summarise(differ)] == [("0.8", 1), ("1.0", 1), ("–", 2)]


def test_scenarios_are_not_swept_keys_and_keep_their_own_values():
    """ewc's λ differs between its class-IL and task-IL protocols: two scenarios, not a swept λ."""
    runs = [rec(0, **{"model.head": "single", "method.lam": "5000"}),
            rec(0, **{"model.head": "multi", "method.lam": "1e7"})]
    assert swept_keys(runs) == []
    assert [(r.scenario, r.n) for r in summarise(runs)] == [("class-IL", 1), ("task-IL", 1)]


def test_curves_by_hand(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, f"c{seed}", "si", seed)
        write_run(root, f"t{seed}", "si", seed, head="multi")
    records = collect_from_results([str(root)])
    by = {(r.scenario, r.seed): r.curve for r in records}
    assert by[("class-IL", 0)] == [90, 70, 50] and by[("class-IL", 1)] == [100, 65, 50]
    assert by[("task-IL", 0)] == [99, 96, 96] and by[("task-IL", 1)] == [100, 98, 95]  # the task-IL matrix

    mean, std = mean_std_curve([[90, 70, 50], [100, 65, 50]])
    assert mean == [95, 67.5, 50]
    assert std == pytest.approx([math.sqrt(50), math.sqrt(12.5), 0.0])  # ddof=1: (10²/2)^½, (5²/2)^½
    mean, std = mean_std_curve([[90, 70, 50], [100, math.nan]])  # an unfinished run counts where it has values
    assert mean == [95, 70, 50] and std[0] == pytest.approx(math.sqrt(50)) and math.isnan(std[1])

    assert curve_lines(summarise(records)) == [("split_mnist, class-IL", "si", [[90, 70, 50], [100, 65, 50]]),
                                               ("split_mnist, task-IL", "si", [[99, 96, 96], [100, 98, 95]])]


def test_labels_name_only_the_swept_values_that_differ(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, f"a{seed}", "spacenet", seed, sel=40)
        write_run(root, f"b{seed}", "spacenet", seed, sel=80)
        write_run(root, f"f{seed}", "finetune", seed)
    write_run(root, "t", "spacenet", 0, head="multi", sel=40)  # alone in its scenario: no sel in its label
    lines = curve_lines(summarise(collect_from_results([str(root)])))
    assert [(title, label) for title, label, _ in lines] == [
        ("split_mnist, class-IL", "finetune"), ("split_mnist, class-IL", "spacenet (sel=40)"),
        ("split_mnist, class-IL", "spacenet (sel=80)"), ("split_mnist, task-IL", "spacenet")]


def test_plot_writes_an_image(vdv, tmp_path, capsys):
    for name in ("acc.png", "acc.svg"):
        assert main([str(vdv), "--plot", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main([str(vdv), "--plot", str(tmp_path / "acc.jpg")]) == 2  # a suffix matplotlib may not write
    assert main([str(vdv), "--plot", str(tmp_path / "no" / "such" / "acc.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("cl-report: ") for line in err), err


def test_mlflow_curves_from_the_metric_history(tmp_path):
    """MLflow records carry the run's acc/avg (class-IL) or acc_til/avg (task-IL) history as the curve."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cl_runner", artifact_location=(tmp_path / "art").as_uri())
    for head, key in (("single", "acc/avg"), ("multi", "acc_til/avg")):
        run_id = client.create_run(exp, tags={"method": "si", "dataset": "split_mnist", "seed": "0"}).info.run_id
        client.log_param(run_id, "model.head", head)
        for i, (step, value) in enumerate(((1, 90.0), (2, 70.0), (3, 50.0), (2, 71.0))):  # 2 again: resumed
            client.log_metric(run_id, key, value, timestamp=1000 + i, step=step)
        client.log_metric(run_id, "acc/avg" if key != "acc/avg" else "acc_til/avg", 1.0, step=1)  # the other
        client.set_terminated(run_id, "FINISHED")
    records = collect_from_mlflow(tracking_uri=uri, curves=True)
    assert sorted((r.scenario, tuple(r.curve)) for r in records) == [
        ("class-IL", (90.0, 71.0, 50.0)), ("task-IL", (90.0, 71.0, 50.0))]
    assert all(r.curve is None for r in collect_from_mlflow(tracking_uri=uri))  # only when asked
