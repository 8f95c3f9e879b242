"""Every failure on the way of a run ends in one line and a non-zero exit (2; 1 for a run that failed after it
started), with no traceback and the finished results kept. Each runs the console script as a user does."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import cli


def run_cli(cwd: Path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CL_RUNNER_DATA")}
    full_env.update(CL_RUNNER_OUTPUTS=str(cwd / "outputs"), **env)
    return subprocess.run([cli(name), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def one_line(p: subprocess.CompletedProcess, code: int, prefix: str = "cl-run: error: ") -> str:
    """The single stderr line of a failure with exit `code`."""
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and lines[0].startswith(prefix), (p.returncode, p.stderr)
    return lines[0]


@pytest.mark.parametrize("env, args, needle", [
    ({"MLFLOW_TRACKING_URI": "nosuch://x"}, [], "MLflow cannot use the tracking URI nosuch://x"),
    ({"MLFLOW_TRACKING_URI": "sqlite:////proc/nope/mlflow.db"}, [], "no folder /proc/nope"),
    ({}, ["hydra.run.dir=/proc/nope"], "the run folder (hydra.run.dir) /proc/nope cannot be written"),
    ({}, ["paths.outputs=/proc/nope"], "paths.outputs /proc/nope cannot be written"),
    ({}, ["paths.outputs=/proc/nope", "hydra.run.dir={tmp}/run"], "paths.outputs /proc/nope cannot be written"),
    ({}, ["-m", "seed=0,1", "hydra.sweep.dir=/proc/nope"], "the sweep folder (hydra.sweep.dir) /proc/nope"),
    ({}, ["method.nonexistent=1"], "method.nonexistent is not a known key of method finetune (known keys: "
                                   "name, optimizer, lr, momentum, weight_decay, epochs, batch_size, steps, "
                                   "active_outputs, reset_optimizer)"),
])
def test_cl_run_stops_in_one_line_before_training(tmp_path, env, args, needle):
    args = [a.format(tmp=tmp_path) for a in args]
    p = run_cli(tmp_path, "cl-run", *args, "method=finetune", "method.epochs=1", "progress=off", **env)
    assert needle in one_line(p, 2)
    assert not list(tmp_path.rglob("results.json"))  # nothing trained


def test_a_nonfinite_loss_fails_the_run_in_one_line(tmp_path):
    p = run_cli(tmp_path, "cl-run", "method=finetune", "method.lr=1e6", "tracking=local", "progress=off")
    line = one_line(p, 1)
    assert "the training loss became non-finite in task 1/5, epoch 1" in line and "on_nonfinite=continue" in line
    (f,) = (tmp_path / "outputs").rglob("results.json")
    res = json.loads(f.read_text())
    assert res["status"] == "failed" and res["nonfinite_loss"] == "task 1/5, epoch 1" and res["tasks_done"] == 0


def write_results(folder: Path, seed: int, acc: float) -> None:
    folder.mkdir(parents=True)
    cfg = {"seed": seed, "method": {"name": "finetune", "lr": 0.01}, "dataset": {"name": "split_mnist"},
           "model": {"name": "mlp"}, "mlflow": {"experiment": "cl_runner"}}
    (folder / "results.json").write_text(json.dumps({
        "schema_version": 1, "status": "finished", "config": cfg, "config_hash": f"h{seed}", "choices": {},
        "overrides": [], "run_dir": str(folder), "mlflow_run_id": None, "tasks_done": 1, "n_tasks": 1,
        "acc": [[acc]], "acc_til": [[acc]], "metrics": {"final/avg_acc": acc}, "capacity": [],
        "timings": {"task_s": [1.0], "total_s": 1.0}, "started": "2026-01-01T00:00:00+00:00",
        "updated": "2026-01-01T00:00:01+00:00"}))


@pytest.fixture
def runs_and_a_corrupt_file(tmp_path) -> tuple[Path, Path]:
    runs = tmp_path / "outputs" / "runs"
    for seed, acc in ((0, 19.0), (1, 21.0)):
        write_results(runs / f"r{seed}", seed, acc)
    bad = runs / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"schema_version": 1, "stat')  # cut off
    return tmp_path, bad


def test_report_warns_about_a_corrupt_results_json_and_reports_the_rest(runs_and_a_corrupt_file):
    cwd, bad = runs_and_a_corrupt_file
    p = run_cli(cwd, "cl-report", str(cwd / "outputs"))
    assert p.returncode == 0, p.stderr
    assert str(bad) in one_line(p, 0, "cl-report: warning: ")
    assert p.stdout.startswith("Runs: 2, rows: 1") and "20.00 ± 1.41" in p.stdout


def test_sync_warns_about_a_corrupt_results_json_and_syncs_the_rest(runs_and_a_corrupt_file):
    cwd, bad = runs_and_a_corrupt_file
    p = run_cli(cwd, "cl-report", "--sync", str(cwd / "outputs"), "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}")
    assert str(bad) in one_line(p, 0, "cl-report: warning: ")
    assert "2 created, 1 unreadable" in p.stdout, p.stdout
