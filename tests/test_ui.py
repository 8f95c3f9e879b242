"""What a researcher reads, without running anything: the line with a run's address in the MLflow UI, run and
sweep-parent names, the parent's metric names for one and for several groups of runs, the per-task table and
the figures' task numbers (from 1). The runs themselves are checked in test_tracking.py and test_sweeps.py."""
from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from cl_runner.tracking import mlflow_store, summary, ui
from cl_runner.tracking.records import RunRecord, reused_runs, reused_tags

TAIL = "#/experiments/3/runs/abc?workflowType=machine_learning"


def test_ui_line_for_a_local_database_names_the_command_that_serves_it(tmp_path, monkeypatch):
    db = tmp_path / "out" / "mlflow.db"
    uri = f"sqlite:///{db}"
    line = ui.ui_line(uri, "3", "abc", cwd=tmp_path)  # no Makefile here: mlflow ui itself
    assert line == (f"MLflow UI (run): http://127.0.0.1:5000/{TAIL}  "
                    f"(start the UI with: mlflow ui --backend-store-uri {uri})")
    (tmp_path / "Makefile").write_text("x:\n\ttrue\nui: install\n\tmlflow ui\n")
    monkeypatch.setenv("CL_RUNNER_OUTPUTS", "out")  # what `make ui` serves: $CL_RUNNER_OUTPUTS/mlflow.db
    assert ui.ui_line(uri, "3", "abc", cwd=tmp_path).endswith("(start the UI with: make ui)")
    monkeypatch.delenv("CL_RUNNER_OUTPUTS")  # then outputs/mlflow.db, which is not this database
    assert "mlflow ui --backend-store-uri" in ui.ui_line(uri, "3", "abc", cwd=tmp_path)


def test_ui_line_for_a_server_is_its_address():
    assert ui.ui_line("http://host:5001/", "3", "abc", what="sweep parent, 4 jobs") == \
        f"MLflow UI (sweep parent, 4 jobs): http://host:5001/{TAIL}"
    assert ui.ui_line("postgresql://db/x", "3", "abc").startswith("MLflow run abc (experiment 3) in postgresql://db/x")


def test_run_names_put_what_tells_runs_apart_first():
    tags = {"method": "spacenet", "dataset": "split_mnist", "seed": "1",
            "overrides": "method.sel=10 seed=1 progress=off"}
    assert mlflow_store.run_name(tags) == "spacenet s1 · split_mnist"
    assert mlflow_store.run_name(tags, ["method.sel", "seed"]) == "sel=10 s1 · spacenet split_mnist"
    tags["overrides"] = "method=ewc seed=1"
    assert mlflow_store.run_name({**tags, "method": "ewc"}, ["method", "seed"]) == "ewc s1 · split_mnist"


def test_sweep_parent_is_named_after_what_it_sweeps():
    from cl_runner.sweep import parent_name, swept

    cfg = OmegaConf.create({"method": {"name": "spacenet"}, "dataset": {"name": "split_mnist"}, "hydra": {
        "overrides": {"task": ["method.sel=10,20", "seed=range(0,3)", "progress=off", "+experiment=x"]},
        "sweeper": {"params": {"method.spec": "1,2"}},
        "runtime": {"choices": {"method": "spacenet", "dataset": "split_mnist"}}}})
    keys = swept(cfg)
    assert keys == {"method.sel": "10,20", "seed": "range(0,3)", "method.spec": "1,2"}
    assert parent_name(cfg, keys) == "spacenet split_mnist: method.sel x seed x method.spec"
    assert parent_name(cfg, {"method": "ewc,si", "seed": "0,1"}) == "ewc,si split_mnist: seed"


def _record(seed: int, sel: str, acc: float) -> RunRecord:
    params = {"seed": str(seed), "method.sel": sel, "method.name": "spacenet"}
    return RunRecord("spacenet", "split_mnist", seed, params,
                     {"final/avg_acc": acc, "final/avg_acc_til": 99.0, "time/total_s": 10.0}, source=f"r{seed}{sel}")


def test_parent_metrics_one_name_per_group_and_column():
    from cl_runner.report import summarise
    from cl_runner.sweep_summary import group_labels, parent_metrics

    one = summarise([_record(0, "10", 80.0), _record(1, "10", 90.0)])
    m = parent_metrics(one)  # one group: the children's own names
    assert m["final/avg_acc"] == 85.0 and m["final/avg_acc_std"] == pytest.approx(math.sqrt(50)) and m["runs"] == 2
    assert "final/bwt" not in m  # no value, no metric
    two = summarise([_record(s, sel, 80.0 + s) for s in (0, 1) for sel in ("10", "[20, 20]")])
    assert group_labels(two) == ["sel 10", "sel 20 20"]
    m = parent_metrics(two)
    assert m["sel 10/final/avg_acc"] == 80.5 and m["sel 20 20/runs"] == 2


def test_reused_runs_round_trip_through_tags():
    ids = [f"{i:032x}" for i in range(450)]
    tags = reused_tags(ids)
    assert len(tags) == 3 and all(len(v) < 8000 for v in tags.values())
    assert reused_runs({**tags, "other": "x"}) == ids


def test_task_table_counts_tasks_from_one_and_skips_what_a_joint_run_lacks():
    res = {"config": {"method": {"name": "finetune"}, "dataset": {"name": "split_digits"}, "seed": 0},
           "acc": [[100.0, None], [50.0, 90.0]], "acc_til": [[100.0, None], [95.0, 90.0]], "status": "finished",
           "tasks_done": 2, "n_tasks": 2, "timings": {"task_s": [1.5, 2.5]}, "metrics": {"final/avg_acc": 70.0},
           "dataset": {"profile": {"classes": [[0, 1], [2, 3]]}}}
    assert summary.task_rows(res)[0] == [1, "0 1", 1.5, 100.0, 50.0, 100.0, 95.0]
    assert summary.tasks_csv(res).splitlines()[2] == "2,2 3,2.5000,90.0000,90.0000,90.0000,90.0000"
    note = summary.run_description(res)
    assert "class-IL **70.00 %**" in note and "| 1 | 0 1 | 1.50 | 100.00 | 50.00 | 100.00 | 95.00 |" in note
    joint = {**res, "acc": [[80.0, 70.0]], "acc_til": [[90.0, 95.0]], "timings": {"task_s": [4.0]}, "tasks_done": 1}
    row = summary.task_rows(joint)[1]
    assert row[0] == 2 and math.isnan(row[2]) and math.isnan(row[3]) and row[4] == 70.0


def test_figures_number_tasks_from_one(tmp_path, monkeypatch):
    from cl_runner import plots

    seen = {}
    real = plots._plt

    def spy():
        plt = real()
        orig = plt.Figure.savefig

        def save(fig, *a, **k):
            seen[len(seen)] = [[t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
                               + [h.get_label() for h in ax.get_lines()] for ax in fig.axes if ax.get_visible()]
            return orig(fig, *a, **k)

        monkeypatch.setattr(plt.Figure, "savefig", save)
        return plt

    monkeypatch.setattr(plots, "_plt", spy)
    plots.accuracy_heatmap([[90.0, math.nan], [80.0, 95.0]], [[99.0, math.nan], [98.0, 97.0]], tmp_path / "h.png")
    assert seen[0][0][:4] == ["1", "2", "1", "2"]  # evaluated on task 1, 2; after training task 1, 2
    cap = [{"fc1": {"conn_task1": 5, "conn_task2": 0, "conn_free": 9, "conn_used_pct": 20.0}}] * 2
    plots.capacity_plot(cap, tmp_path / "c.png")
    labels = {label for ax in seen[1] for label in ax}
    assert {"task 1", "task 2", "conn_free", "conn_used_pct"} <= labels and "conn_task1" not in labels
