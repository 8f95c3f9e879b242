"""`cl-run -m` sweeps end to end: one MLflow parent run per sweep (Hydra's SweepCallback), one child
per job, with the basic launcher and with joblib (jobs in other processes); then `cl-report` on the
sweep's database.
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


def sweep(tmp_path_factory, name: str, *extra: str) -> Path:
    cwd = tmp_path_factory.mktemp(name)
    run_script("cl-run", cwd, "-m", "method=finetune", "seed=0,1", "method.epochs=1", "progress=off", *extra)
    return cwd


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
    parents = [r for r in runs if r.data.tags.get("cl_runner.sweep_parent") == "true"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"] == parent.info.run_id
    assert parent.data.tags["sweep_dir"] == str(sweep_dir)
    children = [r for r in runs if r is not parent]
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
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{basic_sweep / 'outputs'}/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("cl_runner").experiment_id])
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get("cl_runner.sweep_parent") == "true"]
    assert {f.path for f in c.list_artifacts(parent, "sweep_report")} == {
        "sweep_report/accuracy.png", "sweep_report/table.md", "sweep_report/table.csv"}
    folder = Path(c.download_artifacts(parent, "sweep_report", str(tmp_path)))
    assert (folder / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and (folder / "accuracy.png").stat().st_size > 1000
    table = (folder / "table.md").read_text()
    assert table.startswith("Runs: 2, rows: 1") and "| finetune | split_digits | class-IL | 2 |" in table, table


def test_a_failing_sweep_report_is_one_warning(tmp_path, caplog):
    """The parent's table and figure are extras: a store that cannot give them costs one warning line."""
    from cl_runner.cli import SweepCallback

    cb = SweepCallback()
    cb.client, cb.run_id, cb.exp_id, cb.uri = None, "abc", "0", f"sqlite:///{tmp_path}/missing.db"
    with caplog.at_level("WARNING", logger="cl_runner"):
        cb._log_report()
    (record,) = caplog.records
    assert "abc" in record.getMessage() and "\n" not in record.getMessage()
