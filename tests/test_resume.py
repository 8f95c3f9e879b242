"""Crash-safe runs: a run killed with SIGKILL mid-task resumes from its last checkpoint to the same matrices
as an uninterrupted run, into the same MLflow run; relaunched sweeps skip finished jobs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli

# SpaceNet keeps the most state between tasks (masks, importances, its own RNG, figure data); enough
# epochs on the bundled digits that one task takes about a second, so the kill lands inside task 3
ARGS = ["method=spacenet", "method.epochs=25", "seed=3", "progress=off", "hardware=cpu", "hardware.threads=1"]


def env_for(outputs: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CL_RUNNER_DATA")}
    env["CL_RUNNER_OUTPUTS"] = str(outputs)
    return env


def cl_run(outputs: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([cli(), *args], cwd=outputs.parent, env=env_for(outputs), capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        pytest.fail(f"cl-run {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def results(outputs: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted(outputs.glob("runs/*/*/results.json"))]


def kill_after(proc: subprocess.Popen, outputs: Path, tasks: int, then_s: float = 0.0) -> dict:
    """SIGKILL `proc` once its run has finished `tasks` tasks (and `then_s` seconds more); its results.json."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = results(outputs) if outputs.exists() else []
        if found and found[0]["tasks_done"] >= tasks:
            break
        time.sleep(0.02)
    time.sleep(then_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = results(outputs)
    return killed


def test_sigkill_mid_task_then_resume_gives_the_uninterrupted_matrices(tmp_path):
    ref_out = tmp_path / "ref" / "outputs"
    ref_out.parent.mkdir()
    cl_run(ref_out, *ARGS, "tracking=local")
    (ref,) = results(ref_out)
    assert ref["status"] == "finished" and ref["tasks_done"] == 5

    out = tmp_path / "crash" / "outputs"
    out.parent.mkdir()
    db = f"sqlite:///{out.parent / 'mlflow.db'}"
    proc = subprocess.Popen([cli(), *ARGS, "tracking=mlflow", f"mlflow.uri={db}"], cwd=out.parent, env=env_for(out),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = kill_after(proc, out, 2, then_s=0.3)  # into task 3
    assert killed["status"] == "running", "the run ended before it could be killed; raise the epochs"
    assert killed["tasks_done"] == 2, f"killed after {killed['tasks_done']} tasks, not inside task 3"
    run_dir = Path(killed["run_dir"])
    assert (run_dir / "checkpoint.pt").exists()

    p = cl_run(out, *ARGS, "tracking=mlflow", f"mlflow.uri={db}", "resume=true")
    assert f"resuming {run_dir} after task 2 of 5" in p.stderr + p.stdout
    final = json.loads((run_dir / "results.json").read_text())
    assert final["status"] == "finished" and final["tasks_done"] == 5 and len(final["resumed"]) == 1
    assert final["acc"] == ref["acc"]  # bit-identical: the same floats, every row
    assert final["acc_til"] == ref["acc_til"]
    assert final["capacity"] == ref["capacity"]
    assert len(final["timings"]["task_s"]) == 5

    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=db)
    runs = c.search_runs([c.get_experiment_by_name("cl_runner").experiment_id])
    assert len(runs) == 1, "the resumed run must continue the same MLflow run"
    run = runs[0]
    assert run.info.run_id == final["mlflow_run_id"] and run.info.status == "FINISHED"
    hist = c.get_metric_history(run.info.run_id, "acc/task_1")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5]  # no step twice
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == [r[0] for r in ref["acc"]]
    assert run.data.metrics["final/avg_acc"] == pytest.approx(ref["metrics"]["final/avg_acc"], abs=0)


def test_resume_errors_and_fresh_start(tmp_path):
    out = tmp_path / "outputs"
    p = cl_run(out, "method.epochs=1", "tracking=local", "progress=off", "resume=true")  # nothing to resume
    assert "starting a new run" in p.stderr + p.stdout
    (r,) = results(out)
    assert r["status"] == "finished"
    run_dir = r["run_dir"]
    p = cl_run(out, "method.epochs=1", "tracking=local", f"resume={run_dir}", check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "already finished" in p.stderr
    p = cl_run(out, "method.epochs=2", "tracking=local", f"resume={run_dir}", check=False)
    assert p.returncode == 2 and "config differs" in p.stderr
    p = cl_run(out, "tracking=local", f"resume={tmp_path / 'nowhere'}", check=False)
    assert p.returncode == 2 and "no results.json" in p.stderr


def test_relaunched_sweep_skips_finished_jobs(tmp_path):
    out = tmp_path / "outputs"
    sweep = ["-m", "seed=0,1", "method.epochs=1", "tracking=local", "progress=off"]
    cl_run(out, *sweep)
    assert len(list(out.glob("multirun/*/*/*/results.json"))) == 2
    p = cl_run(out, *sweep)
    assert (p.stdout + p.stderr).count("skipped: this config") == 2
    assert len(list(out.glob("multirun/*/*/*/results.json"))) == 2  # nothing ran again
    cl_run(out, *sweep, "skip_finished=false")
    assert len(list(out.glob("multirun/*/*/*/results.json"))) == 4


def test_relaunched_mlflow_sweep_parent_stands_for_the_skipped_jobs(tmp_path):
    """Both jobs skipped: the relaunch's parent run has no child, but it reports the two finished runs it reused
    (test_sweeps.py checks its numbers), so it is kept."""
    from mlflow.tracking import MlflowClient

    from cl_runner.tracking.records import reused_runs

    out = tmp_path / "outputs"
    out.parent.mkdir(exist_ok=True)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = ["-m", "seed=0,1", "method.epochs=1", "tracking=mlflow", f"mlflow.uri={db}", "progress=off"]
    cl_run(out, *sweep)
    p = cl_run(out, *sweep)
    assert (p.stdout + p.stderr).count("skipped: this config") == 2
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("cl_runner")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("cl_runner.sweep_parent") == "true"]
    jobs = [r for r in runs if r not in parents]
    assert len(runs) == 4 and len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    assert {r.data.tags.get("mlflow.parentRunId") for r in jobs} == {parents[0].info.run_id}
    assert sorted(reused_runs(parents[1].data.tags)) == sorted(r.info.run_id for r in jobs)
    assert parents[1].data.metrics["runs"] == 2


def test_sweep_goes_on_after_a_job_runs_out_of_capacity(tmp_path):
    """spec = sel = 20 of 60 neurons: the 4th task finds no free neuron. That job keeps its 3 rows
    (status failed) and the sweep's other job still runs."""
    out = tmp_path / "outputs"
    p = cl_run(out, "-m", "method=spacenet", "model.hidden=[60,60]", "method.sel=20", "method.spec=20,5",
               "method.epochs=1", "tracking=local", "progress=off")
    assert "has 0 free neurons left" in p.stderr
    res = {r["config"]["method"]["spec"][0]: r for r in
           (json.loads(f.read_text()) for f in out.glob("multirun/*/*/*/results.json"))}
    assert res[5]["status"] == "finished" and res[5]["tasks_done"] == 5
    assert res[20]["status"] == "failed" and res[20]["tasks_done"] == 3 and "free neurons" in res[20]["error"]


def test_finished_run_lookup_matches_the_hash_field_not_any_mention(tmp_path):
    """find_finished reads only files whose text holds the hash, then checks the config_hash field: a run
    that merely mentions the hash elsewhere, an unfinished run and a half-written file never match."""
    from cl_runner.checkpoint import find_finished, find_resumable

    def put(name, **fields):
        d = tmp_path / "runs" / "2026-11-22" / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(fields))
        return d

    put("a", config_hash="other", status="finished", overrides=["note=abc123"])
    put("b", config_hash="abc123", status="running")
    (put("c") / "results.json").write_text('{"config_hash": "abc123", "stat')  # cut off mid-write
    assert find_finished(tmp_path, "abc123") is None
    put("d", config_hash="abc123", status="finished", metrics={"final/avg_acc": 1.0})
    assert find_finished(tmp_path, "abc123")["metrics"] == {"final/avg_acc": 1.0}
    (tmp_path / "runs" / "2026-11-22" / "b" / "checkpoint.pt").write_bytes(b"")
    assert find_resumable(True, tmp_path, "abc123") == tmp_path / "runs" / "2026-11-22" / "b"


def test_resume_sends_the_task_metrics_a_kill_kept_out_of_mlflow(make_cfg, tmp_path):
    """A task's row goes to results.json, then to MLflow: a SIGKILL between the two (seen in CI under load)
    leaves that step out of MLflow. Resuming the same MLflow run must send it, once, with its values."""
    from mlflow.tracking import MlflowClient

    from omegaconf import OmegaConf

    from cl_runner.tracking.results import new_record
    from cl_runner.tracking.trackers import LocalTracker, MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg("tracking=mlflow", f"mlflow.uri={uri}")
    run_dir, nan = tmp_path / "run", float("nan")
    acc = [[90.0, nan], [88.0, 92.0]]
    til = [[95.0, nan], [94.0, 96.0]]
    cap = [{"fc1": {"used_pct": 10.0}}, {"fc1": {"used_pct": 20.0}}]

    def tracker(resume: bool) -> MlflowTracker:
        record = None if resume else new_record(OmegaConf.to_container(cfg, resolve=True), "h", {}, [], run_dir, "x")
        return MlflowTracker(run_dir, record, uri=uri, experiment="cl_runner", outputs=tmp_path,
                             connect_timeout_s=2)

    first = tracker(resume=False)
    first.start(threads=1)
    first.log_task(0, acc[:1], til[:1], cap[0], {}, 1.5)
    LocalTracker.log_task(first, 1, acc, til, cap[1], {}, 2.5)  # killed before MLflow
    c = MlflowClient(tracking_uri=uri)
    assert [m.step for m in c.get_metric_history(first.mlflow_run_id, "acc/avg")] == [1]

    for _ in range(2):  # a second resume finds nothing missing and sends nothing twice
        again = tracker(resume=True)
        again.restore(acc, til, cap, [{}, {}], [1.5, 2.5])
        again.start(threads=1)
        assert again.mlflow_run_id == first.mlflow_run_id and not again.broken
        hist = {k: sorted((m.step, m.value) for m in c.get_metric_history(first.mlflow_run_id, k))
                for k in ("acc/avg", "acc/task_2", "acc_til/task_1", "capacity/fc1/used_pct")}
        assert hist == {"acc/avg": [(1, 90.0), (2, 90.0)], "acc/task_2": [(2, 92.0)],
                        "acc_til/task_1": [(1, 95.0), (2, 94.0)], "capacity/fc1/used_pct": [(1, 10.0), (2, 20.0)]}
    assert c.get_run(first.mlflow_run_id).info.status == "RUNNING"
