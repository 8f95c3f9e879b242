"""cl-report: grouping, mean ± std, swept keys, references, CSV, and both sources (results.json, MLflow)."""
import csv
import json
import math
import socket
import time

import pytest

from cl_runner.references import band_label, lands, load_references, parse_band, reference_band
from cl_runner.report import collect_from_results, main, summarise, to_markdown


def write_run(root, name, method, seed, acc, status="finished", choice=None, device="cpu", **extra):
    """One fake results.json; `extra` = method keys (e.g. sel=80) and metric overrides via metrics=."""
    metrics = {"final/avg_acc": acc, "final/avg_acc_til": acc + 10, "final/bwt": -acc / 10,
               "final/forgetting": acc / 5, "time/total_s": 10.0 + seed, **extra.pop("metrics", {})}
    data = {
        "schema_version": 1, "status": status, "config_hash": "abc",
        "config": {"seed": seed, "tracking": "local",
                   "method": {"name": method, "lr": 0.01, **extra},
                   "dataset": {"name": "split_mnist", "n_tasks": 5},
                   "paths": {"outputs": str(root / name)}, "hardware": {"device": device}},
        "choices": {"method": choice or method, "dataset": "split_mnist", "model": "mlp", "hardware": "auto"},
        "overrides": [f"seed={seed}"], "run_dir": str(root / name), "mlflow_run_id": None,
        "tasks_done": 5, "n_tasks": 5, "acc": [], "acc_til": [], "metrics": metrics, "capacity": [],
        "timings": {"total_s": 10.0 + seed, "task_s": []}, "started": "", "updated": "",
    }
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(data))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "ft0", "finetune", 0, 19.0)
    write_run(root, "ft1", "finetune", 1, 21.0, device="cuda")  # hardware differs: not a swept key
    write_run(root, "ft2", "finetune", 2, 99.0, status="running")  # unfinished: left out by default
    write_run(root, "sn0", "spacenet", 0, 75.0, sel=80, metrics={"capacity/fc1/used_frac": 0.2})
    write_run(root, "sn1", "spacenet", 1, 76.0, sel=80, metrics={"capacity/fc1/used_frac": 0.4})
    write_run(root, "sn2", "spacenet", 0, 60.0, sel=40)
    return root


def table_rows(out):
    """Markdown table lines after the caption -> list of cell lists (header first, rule dropped)."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[:1] + lines[2:]]


def test_grouping_and_values(runs):
    records = collect_from_results([str(runs)])
    assert len(records) == 5 and {r.method for r in records} == {"finetune", "spacenet"}
    rows = summarise(records)
    assert [(r.method, r.swept, r.n) for r in rows] == [
        ("finetune", {"method.sel": "–"}, 2), ("spacenet", {"method.sel": "40"}, 1),
        ("spacenet", {"method.sel": "80"}, 2)]
    md = to_markdown(rows)
    head, ft, sn40, sn80 = table_rows(md)
    assert head == ["method", "dataset", "scenario", "method.sel", "n", "acc (class-IL)", "acc (task-IL)", "BWT",
                    "forgetting", "time (s)"]
    assert ft == ["finetune", "split_mnist", "class-IL", "–", "2", "20.00 ± 1.41", "30.00 ± 1.41", "-2.00 ± 0.14",
                  "4.00 ± 0.28", "10.50 ± 0.71"]
    assert sn40[:6] == ["spacenet", "split_mnist", "class-IL", "40", "1", "60.00"]  # one run: no std
    assert sn80[5] == "75.50 ± 0.71"


def test_mlflow_artifact_copies_are_not_counted_as_runs(tmp_path):
    """`cl-report outputs` walks MLflow's artifact store too (outputs/mlartifacts/<run>/artifacts/results.json,
    a copy of each run's file): a copy beside its run would double the seed count and shrink the std."""
    out = tmp_path / "outputs"
    write_run(out / "runs", "a", "finetune", 0, 19.0)
    write_run(out / "runs", "b", "finetune", 1, 21.0)
    for name in ("a", "b"):
        copy = out / "mlartifacts" / f"id{name}" / "artifacts"
        copy.mkdir(parents=True)
        (copy / "results.json").write_text((out / "runs" / name / "results.json").read_text())
    for where in (str(out), f"{out}/**/results.json"):  # a folder, or a quoted pattern
        records = collect_from_results([where])
        assert sorted(r.source for r in records) == [str(out / "runs" / n / "results.json") for n in "ab"], where
    assert [r.n for r in summarise(collect_from_results([str(out)]))] == [2]


def test_rows_sort_numbers_as_numbers(tmp_path):
    """Swept values sort by their numbers, lists included: 80 before 120, [80, 80] before [120, 120]."""
    root = tmp_path / "runs"
    for i, (sel, spec) in enumerate([(120, [120, 120]), (120, [80, 80]), (80, [80, 40]), (1000, [9, 9])]):
        write_run(root, f"r{i}", "spacenet", 0, 70.0, sel=sel, spec=spec)
    rows = summarise(collect_from_results([str(root)]))
    assert [(r.swept["method.sel"], r.swept["method.spec"]) for r in rows] == [
        ("80", "[80, 40]"), ("120", "[80, 80]"), ("120", "[120, 120]"), ("1000", "[9, 9]")]


def test_main_metrics_csv_ref(runs, tmp_path, capsys):
    out_csv = tmp_path / "t.csv"
    assert main([str(runs), "--metrics", "capacity/fc1/used_frac", "--csv", str(out_csv), "--ref"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Runs: 5, rows: 3")
    head, ft, sn40, sn80 = table_rows(out)
    assert head[-3:] == ["capacity/fc1/used_frac", "paper", "vs paper"]
    assert ft[-3:] == ["–", "19.90", "✓ (18-22)"]  # 20.00: inside the explicit band (references.yaml)
    assert sn40[-2:] == ["75.53 ± 1.82", "✗ outside"]  # 60.00: more than 2·1.82 below
    assert sn80[-3:] == ["0.30 ± 0.14", "75.53 ± 1.82", "✓"]
    with open(out_csv, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["method.sel"] for r in table] == ["–", "40", "80"]
    assert float(table[0]["acc (class-IL) mean"]) == 20.0
    assert float(table[0]["acc (class-IL) std"]) == pytest.approx(2 ** 0.5, abs=1e-4)
    assert table[1]["acc (class-IL) std"] == "" and table[0]["capacity/fc1/used_frac mean"] == ""
    assert table[2]["vs paper"] == "✓"


def test_all_includes_unfinished(runs, capsys):
    assert main([str(runs / "ft0" / "results.json"), str(runs / "ft2" / "results.json"), "--all"]) == 0
    head, ft = table_rows(capsys.readouterr().out)
    assert ft[head.index("n")] == "2" and ft[head.index("status")] == "1 finished, 1 running"


def test_reference_band():
    assert reference_band(1.82, 0.5, 10) == pytest.approx(3.64)  # paper's spread
    assert reference_band(None, 4.0, 4) == pytest.approx(4.0)  # our standard error, 2·4/√4
    assert reference_band(0.04, float("nan"), 1) == 1.0  # floor


def test_explicit_bands():
    """An explicit band (issue 13's acceptance, one-sided or not) decides instead of the drawn one."""
    assert parse_band("18-22") == (18.0, 22.0) and parse_band(">= 97.5") == (97.5, math.inf)
    assert parse_band("<= 5") == (-math.inf, 5.0) and band_label(parse_band(">= 97.5")) == "≥ 97.5"
    for bad in ("22-18", "> 3", "about 20", ""):
        with pytest.raises(ValueError):
            parse_band(bad)
    assert lands(99.9, 0.1, 5, 99.12, None, parse_band(">= 98.0"))  # 0.8 above the paper: outside a ±1 band, inside ≥ 98
    assert not lands(97.6, 3.5, 5, 99.12, None, parse_band(">= 98.0"))  # inside the drawn band (2·3.5/√5), not ≥ 98
    assert lands(97.6, 3.5, 5, 99.12, None, None)
    assert lands(86.0, 1.0, 5, None, None, parse_band(">= 85"))  # a band without a published number (er)
    bands = [e[k] for datasets in load_references().values() for e in datasets.values()
             for k in ("band", "band_til") if k in e]
    assert len(bands) > 20 and all(low <= high for low, high in bands)  # every band of the package file parses


def test_a_malformed_band_is_one_line(tmp_path, monkeypatch, runs, capsys):
    import cl_runner.references as references

    edited = tmp_path / "references.yaml"
    edited.write_text('finetune:\n  split_mnist: {acc: 19.9, band: "about 20"}\n')
    monkeypatch.setattr(references, "REFERENCES_FILE", edited)
    assert main([str(runs), "--ref"]) == 2
    err = capsys.readouterr().err
    assert "finetune.split_mnist.band" in err and "about 20" in err and "Traceback" not in err


def test_errors(tmp_path, runs, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(runs / "ft2" / "results.json")]) == 2  # only an unfinished run
    (tmp_path / "bad.json").write_text("{not json")
    assert main([str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("cl-report: ") for line in err)


def test_unreachable_server(capsys):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    assert main(["--tracking-uri", f"http://127.0.0.1:{port}"]) == 2
    assert time.monotonic() - start < 5
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "unreachable" in err


def test_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("rep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"cl_runner.sweep_parent": "true", "method": "finetune"})
    client.set_terminated(parent.info.run_id, "FINISHED")

    def log(method, seed, acc, lr, parent_id=None):
        tags = {"method": method, "dataset": "split_mnist", "seed": str(seed), "model": "mlp"}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run_id = client.create_run(exp, tags=tags).info.run_id
        for k, v in {"seed": seed, "method.name": method, "method.lr": lr, "dataset.n_tasks": 5}.items():
            client.log_param(run_id, k, v)
        for k, v in {"final/avg_acc": acc, "final/bwt": -1.0, "time/total_s": 3.0}.items():
            client.log_metric(run_id, k, v)
        client.set_terminated(run_id, "FINISHED")

    log("finetune", 0, 19.0, 0.1, parent.info.run_id)
    log("finetune", 1, 21.0, 0.1, parent.info.run_id)
    log("joint", 0, 98.0, 0.01)
    client.create_run(exp, tags={"method": "joint", "dataset": "split_mnist"})  # still running: left out

    assert main(["--tracking-uri", uri, "--experiment", "rep"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Runs: 3, rows: 2")
    head, ft, joint = table_rows(out)
    assert "method.lr" not in head  # constant within each method × dataset
    assert ft[:6] == ["finetune", "split_mnist", "class-IL", "2", "20.00 ± 1.41", "–"] and joint[4] == "98.00"

    assert main(["--tracking-uri", uri, "--parent", parent.info.run_id, "--ref"]) == 0
    head, ft = table_rows(capsys.readouterr().out)
    assert ft[3] == "2" and ft[-2:] == ["19.90", "✓ (18-22)"]

    assert main(["--tracking-uri", uri, "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "rep" in err  # names the known experiments
