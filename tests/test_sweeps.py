"""`cl-run -m` sweeps end to end: one MLflow parent run per sweep (Hydra's SweepCallback), one child
per job, with the basic launcher and with joblib (jobs in other processes); then `cl-report` on the
sweep's database, what the parent run holds when the sweep ends, and a relaunch that skips every job.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"console script {name} not found (pip install -e .)"
    return found


def run_script(name: str, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CL_RUNNER_DATA")}
    env["CL_RUNNER_OUTPUTS"] = str(cwd / "outputs")
    p = subprocess.run([script(name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


SWEEP = ("-m", "method=finetune", "seed=0,1", "method.epochs=1", "progress=off")


def sweep(tmp_path_factory, name: str, *extra: str) -> Path:
    cwd = tmp_path_factory.mktemp(name)
    p = run_script("cl-run", cwd, *SWEEP, *extra)
    (cwd / "cl-run.out").write_text(p.stdout)
    return cwd


def store(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'outputs'}/mlflow.db")


def parent_in(c, sweep_dir: str):
    """The sweep parent run of the sweep folder `sweep_dir`."""
    runs = c.search_runs([c.get_experiment_by_name("cl_runner").experiment_id], "tags.cl_runner.sweep_parent = 'true'")
    (parent,) = [r for r in runs if r.data.tags["sweep_dir"].startswith(str(sweep_dir))]
    return parent


def check_sweep(cwd: Path) -> None:
    """One parent run (tagged, FINISHED) with two FINISHED children, matching the sweep folder."""
    from mlflow.tracking import MlflowClient

    outputs = cwd / "outputs"
    sweep_dirs = [p for p in (outputs / "multirun").glob("*/*") if p.is_dir()]
    assert len(sweep_dirs) == 1, sweep_dirs
    sweep_dir = sweep_dirs[0]
    results = [json.loads(f.read_text()) for f in sorted(sweep_dir.glob("*/results.json"))]
    assert len(results) == 2 and {r["config"]["seed"] for r in results} == {0, 1}
    assert all(r["status"] == "finished" for r in results)
    assert not (outputs / "runs").exists()  # jobs write into the sweep folder only

    c = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    exp = c.get_experiment_by_name("cl_runner")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cl_runner.sweep_parent") == "true"
               and r.data.tags["sweep_dir"] == str(sweep_dir)]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"] == parent.info.run_id
    assert parent.data.tags["sweep_dir"] == str(sweep_dir)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
    assert {r.info.run_id for r in children} == {r["mlflow_run_id"] for r in results}


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    return sweep(tmp_path_factory, "basic_sweep")


def test_sweep_basic_launcher(basic_sweep):
    check_sweep(basic_sweep)


def test_sweep_joblib_launcher(tmp_path_factory):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    check_sweep(sweep(tmp_path_factory, "joblib_sweep", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))


def test_report_on_sweep(basic_sweep):
    uri = f"sqlite:///{basic_sweep / 'outputs'}/mlflow.db"
    p = run_script("cl-report", basic_sweep, "--experiment", "cl_runner", "--tracking-uri", uri, timeout=120)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("|")]
    table = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert len(table) == 3, p.stdout  # header, rule, one row: the parent run is not a result
    head, row = table[0], table[2]
    assert row[head.index("method")] == "finetune" and row[head.index("dataset")] == "split_digits"
    assert row[head.index("n")] == "2", p.stdout  # the two seeds are averaged, not separate rows
    assert "±" in row[head.index("acc (class-IL)")]


def test_sweep_parent_holds_the_table_and_the_figure(basic_sweep, tmp_path):
    """When the sweep ends its parent run gets what `cl-report --parent <id> --ref --plot` gives, as artifacts."""
    c = store(basic_sweep)
    parent = parent_in(c, basic_sweep / "outputs" / "multirun").info.run_id
    assert {f.path for f in c.list_artifacts(parent, "sweep_report")} == {
        "sweep_report/accuracy.png", "sweep_report/table.md", "sweep_report/table.csv"}
    folder = Path(c.download_artifacts(parent, "sweep_report", str(tmp_path)))
    assert (folder / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and (folder / "accuracy.png").stat().st_size > 1000
    table = (folder / "table.md").read_text()
    assert table.startswith("Runs: 2, rows: 1") and "| finetune | split_digits | class-IL | 2 |" in table, table


def check_parent_reports(c, parent, runs: list) -> None:
    """The sweep parent `parent` stands for the finished `runs` (one per seed): named after what was swept,
    the swept keys as params, cl-report's mean and std over the runs as metrics, the mean accuracy curves,
    cl-report's table (its CSV holds the same numbers), a description with a link to every run."""
    from cl_runner.report import COLUMNS, summarise
    from cl_runner.tracking.records import collect_from_mlflow

    uri = c.tracking_uri
    assert parent.info.run_name == "finetune split_digits: seed" and parent.data.params == {"seed": "0,1"}
    (row,) = summarise(collect_from_mlflow(parent=parent.info.run_id, tracking_uri=uri))
    assert row.n == 2 and {r.source for r in row.runs} == {r.info.run_id for r in runs}
    m = parent.data.metrics
    assert m["runs"] == 2
    for column, name in COLUMNS.items():  # cl-report's mean ± std (ddof=1) under the children's metric names
        mean, std = row.stats[column]
        assert m[name] == pytest.approx(mean) and m[name + "_std"] == pytest.approx(std), name
        assert mean == pytest.approx(sum(r.data.metrics[name] for r in runs) / 2)
    csv_lines = Path(c.download_artifacts(parent.info.run_id, "sweep_report/table.csv")).read_text().splitlines()
    head, values = csv_lines[0].split(","), csv_lines[1].split(",")
    assert float(values[head.index("acc (class-IL) mean")]) == pytest.approx(m["final/avg_acc"], abs=1e-4)
    assert float(values[head.index("acc (class-IL) std")]) == pytest.approx(m["final/avg_acc_std"], abs=1e-4)
    assert {f.path for f in c.list_artifacts(parent.info.run_id, "sweep_report")} == {
        "sweep_report/accuracy.png", "sweep_report/table.md", "sweep_report/table.csv"}
    for key in ("acc/avg", "acc/task_1"):  # the collapsed sweep is one line in the UI's charts: the mean
        mean = {h.step: h.value for h in c.get_metric_history(parent.info.run_id, key)}
        per_run = [{h.step: h.value for h in c.get_metric_history(r.info.run_id, key)} for r in runs]
        assert mean == pytest.approx({s: sum(p[s] for p in per_run) / 2 for s in per_run[0]}), key
    note = parent.data.tags["mlflow.note.content"]
    for r in runs:
        assert f"(#/experiments/{r.info.experiment_id}/runs/{r.info.run_id})" in note, note
    assert "| finetune | split_digits | class-IL | 2 |" in note


def check_labels(runs: list, sweep_parent: bool = False) -> None:
    """Every run has a dataset input with a digest, and the source tags the UI's Source column shows."""
    for r in runs:
        assert r.inputs.dataset_inputs, r.info.run_name
        for d in r.inputs.dataset_inputs:
            assert d.dataset.name == "split_digits" and len(d.dataset.digest) == 16
        assert r.data.tags["mlflow.source.name"] in ("cl-run", "cl-run -m")
        assert r.data.tags["mlflow.source.type"] == "LOCAL" and r.data.tags["mlflow.source.git.commit"]


def test_sweep_parent_reports_the_sweep(basic_sweep):
    c = store(basic_sweep)
    parent = parent_in(c, basic_sweep / "outputs" / "multirun")
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["s0 · finetune split_digits", "s1 · finetune split_digits"]
    check_parent_reports(c, parent, children)
    check_labels([parent, *children])
    url = (f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
           "?workflowType=machine_learning")
    out = (basic_sweep / "cl-run.out").read_text()
    assert [ln for ln in out.splitlines() if ln.startswith("MLflow UI")] == [
        f"MLflow UI (sweep parent, 2 jobs): {url}  (start the UI with: mlflow ui --backend-store-uri "
        f"sqlite:///{(basic_sweep / 'outputs').resolve()}/mlflow.db)"], out


def test_a_relaunch_that_skips_every_job_still_reports_them(basic_sweep):
    """Run the same sweep again (another sweep folder): both jobs are skipped, and the new parent stands for the
    two finished runs it reused, with the same numbers as the first sweep's parent."""
    c = store(basic_sweep)
    first = parent_in(c, basic_sweep / "outputs" / "multirun")
    runs = c.search_runs([first.info.experiment_id], f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    p = run_script("cl-run", basic_sweep, *SWEEP, f"hydra.sweep.dir={basic_sweep / 'relaunch'}")
    assert (p.stdout + p.stderr).count("skipped: this config") == 2
    assert not list((basic_sweep / "relaunch").rglob("results.json"))  # nothing ran again
    again = parent_in(c, basic_sweep / "relaunch")
    assert again.info.status == "FINISHED" and again.info.lifecycle_stage == "active"  # kept, though childless
    assert not c.search_runs([again.info.experiment_id], f"tags.mlflow.parentRunId = '{again.info.run_id}'")
    check_parent_reports(c, again, runs)
    check_labels([again])
    assert {k: again.data.metrics[k] for k in first.data.metrics} == pytest.approx(first.data.metrics)
    assert "2 jobs, 0 run in this sweep, 2 skipped" in again.data.tags["mlflow.note.content"]
    assert f"runs/{again.info.run_id}?workflowType=machine_learning" in p.stdout


def test_a_failing_sweep_report_is_one_warning(tmp_path, caplog):
    """The parent's table and figure are extras: a store that cannot give them costs one warning line."""
    from cl_runner.sweep import SweepCallback

    cb = SweepCallback()
    cb.client, cb.run_id, cb.exp_id, cb.uri = None, "abc", "0", f"sqlite:///{tmp_path}/missing.db"
    cb.sweep_dir, cb.keys, cb.command = tmp_path, ["seed"], "cl-run -m seed=0,1"
    with caplog.at_level("WARNING", logger="cl_runner"):
        assert cb._log_report() == -1  # unknown: the parent is kept
    (record,) = caplog.records
    assert "abc" in record.getMessage() and "\n" not in record.getMessage()
