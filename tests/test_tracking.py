"""`cl-run` end to end with its tracking backends: MLflow in SQLite (the default), `tracking=local`
(which must never import MLflow), a real MLflow tracking server, and an unreachable one.

Each test runs the installed console script in a subprocess, in a temporary folder of its own, with
`CL_RUNNER_OUTPUTS` pointing into it and `MLFLOW_TRACKING_URI` removed from the environment.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = {"acc_matrix.json", "acc_matrix.csv", "acc_til_matrix.csv", "acc_heatmap.png", "config.yaml",
             "results.json", "tasks.csv"}
# the default method is SpaceNet: its capacity record and the paper's Figs. 4-6 go to MLflow too
SPACENET_ARTIFACTS = {"capacity.json", "capacity.png", "spacenet_fig4_activations.png",
                      "spacenet_fig5_connections.png", "spacenet_fig6_input_connections.png"}
N_TASKS = 5  # split_digits


# ------------------------------------------------------------------------------------- helpers
def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"console script {name} not found (pip install -e .)"
    return found


def clean_env(outputs: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CL_RUNNER_DATA")}
    env["CL_RUNNER_OUTPUTS"] = str(outputs)
    env.update(extra)
    return env


def cl_run(cwd: Path, *args: str, check: bool = True, timeout: float = 300, **env: str):
    """`cl-run ARGS progress=off` in cwd, outputs in cwd/outputs; fails the test with both streams."""
    p = subprocess.run([script("cl-run"), *args, "progress=off"], cwd=cwd, env=clean_env(cwd / "outputs", **env),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"cl-run {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def one_results(outputs: Path) -> dict:
    files = sorted((outputs / "runs").glob("*/*_spacenet_split_digits/results.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


# --------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One default run (spacenet / split_digits / mlp) tracked in <outputs>/mlflow.db."""
    cwd = tmp_path_factory.mktemp("default_run")
    proc = cl_run(cwd)
    return cwd, proc


def test_default_run_results_json(default_run):
    cwd, _ = default_run
    res = one_results(cwd / "outputs")
    assert res["schema_version"] == 1 and res["status"] == "finished" and res["error"] is None
    assert res["tasks_done"] == res["n_tasks"] == N_TASKS
    assert res["choices"]["method"] == "spacenet" and res["choices"]["dataset"] == "split_digits"
    for key in ("acc", "acc_til"):
        R = res[key]
        assert len(R) == N_TASKS and all(len(r) == N_TASKS for r in R)
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                if j > i:
                    assert v is None, (key, i, j)  # not evaluated yet: null, not NaN
                else:
                    assert isinstance(v, float) and 0.0 <= v <= 100.0, (key, i, j, v)
    for m in ("final/avg_acc", "final/avg_acc_til", "final/bwt", "final/forgetting", "time/total_s"):
        assert isinstance(res["metrics"][m], float), m
    assert res["mlflow_run_id"]


def test_default_run_in_mlflow(default_run):
    cwd, _ = default_run
    outputs = cwd / "outputs"
    res = one_results(outputs)
    assert (outputs / "mlflow.db").is_file()
    c = client(f"sqlite:///{outputs}/mlflow.db")
    exp = c.get_experiment_by_name("cl_runner")
    assert exp is not None
    # artifacts next to the database, not in an mlruns/ or mlartifacts/ folder of the working directory
    assert exp.artifact_location == (outputs / "mlartifacts").resolve().as_uri()
    assert not (cwd / "mlruns").exists() and not (cwd / "mlartifacts").exists()

    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert run_id == res["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((outputs / "mlartifacts").resolve().as_uri() + "/")

    tags = run.data.tags
    assert tags["method"] == "spacenet" and tags["method_class"] == "spacenet"
    assert tags["dataset"] == "split_digits" and tags["model"] == "mlp" and tags["seed"] == "0"
    assert tags["git_commit"]  # a short hash, or "unknown" outside a repository with commits
    assert tags["run_dir"] == res["run_dir"] and tags["config_hash"] == res["config_hash"]
    assert "progress=off" in tags["overrides"].split()

    params = run.data.params
    assert params["method.lr"] == "0.01" and params["seed"] == "0"
    assert params["dataset.name"] == "split_digits" and params["method.epochs"] == "40"  # split_digits schedule

    # per-task metrics: step = number of tasks trained so far
    assert steps(c, run_id, "acc/task_1") == [1, 2, 3, 4, 5]
    assert steps(c, run_id, "acc_til/task_1") == [1, 2, 3, 4, 5]
    assert steps(c, run_id, "acc/task_5") == [5]
    assert steps(c, run_id, "acc/avg") == [1, 2, 3, 4, 5]
    assert steps(c, run_id, "acc_til/avg") == [1, 2, 3, 4, 5]
    history = {m.step: m.value for m in c.get_metric_history(run_id, "acc/task_1")}
    assert [history[s] for s in range(1, 6)] == pytest.approx([row[0] for row in res["acc"]])
    # a task's seconds are no metric (N one-point charts): results.json and tasks.csv keep them
    assert not [k for k in run.data.metrics if k.startswith("time/task_")]
    assert len(res["timings"]["task_s"]) == N_TASKS and res["metrics"]["time/task_1_s"] > 0
    for m in ("final/avg_acc", "final/avg_acc_til", "final/bwt", "final/forgetting", "time/total_s"):
        assert run.data.metrics[m] == pytest.approx(res["metrics"][m], rel=1e-12, abs=1e-12), m
    assert steps(c, run_id, "final/avg_acc") == [5]

    assert ARTIFACTS | SPACENET_ARTIFACTS <= {a.path for a in c.list_artifacts(run_id)}
    for name in SPACENET_ARTIFACTS - {"capacity.json"}:  # real PNG images
        png = Path(c.download_artifacts(run_id, name, str(cwd)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    # capacity per layer after each task, step = tasks trained
    assert steps(c, run_id, "capacity/fc1/conn_task1") == [1, 2, 3, 4, 5]
    assert steps(c, run_id, "capacity/fc2/units_reserved") == [1, 2, 3, 4, 5]
    reserved = {m.step: m.value for m in c.get_metric_history(run_id, "capacity/fc1/units_reserved")}
    assert [reserved[s] for s in range(1, 6)] == [c_["fc1"]["units_reserved"] for c_ in res["capacity"]]
    # the logged results.json is the final one (status finished), not a mid-run copy
    logged = json.loads(Path(c.download_artifacts(run_id, "results.json", str(cwd))).read_text())
    assert logged["status"] == "finished" and logged["mlflow_run_id"] == run_id


def test_default_run_reads_well_in_the_ui(default_run):
    """What the MLflow UI shows of a run beside its numbers: a short name, the dataset input (digest, task
    split), the source (entry point, commit, user), a description with the per-task table; and the one line
    cl-run prints with the run's address in the UI's Model training view."""
    cwd, proc = default_run
    res = one_results(cwd / "outputs")
    c = client(f"sqlite:///{cwd / 'outputs'}/mlflow.db")
    run = c.get_run(res["mlflow_run_id"])
    assert run.info.run_name == res["run_name"] == "spacenet s0 · split_digits"
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "split_digits" and ds.dataset.digest == res["dataset"]["digest"]
    assert len(ds.dataset.digest) == 16 and int(ds.dataset.digest, 16) >= 0
    profile = json.loads(ds.dataset.profile)
    assert profile["tasks"] == N_TASKS and profile["classes"][0] == [0, 1] and sum(profile["test"]) > 0
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "cl-run" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] != "unknown"
    note = tags["mlflow.note.content"]
    assert "**spacenet** on **split_digits**" in note and "| 5 | 8 9 |" in note, note
    tasks_csv = Path(c.download_artifacts(run.info.run_id, "tasks.csv", str(cwd))).read_text().splitlines()
    assert tasks_csv[0].startswith("task,classes,seconds,") and tasks_csv[1].startswith("1,0 1,")
    assert len(tasks_csv) == 1 + N_TASKS
    url = (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
           "?workflowType=machine_learning")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MLflow UI")]
    assert lines == [f"MLflow UI (run): {url}  (start the UI with: mlflow ui --backend-store-uri "
                     f"sqlite:///{(cwd / 'outputs').resolve()}/mlflow.db)"], proc.stdout


def test_local_tracking_never_imports_mlflow(tmp_path):
    """tracking=local: results.json only; an `mlflow` that refuses to import must not matter."""
    fake = tmp_path / "fake_site"
    (fake / "mlflow").mkdir(parents=True)
    marker = tmp_path / "mlflow_was_imported"
    (fake / "mlflow" / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "raise ImportError('mlflow must not be imported with tracking=local')\n")
    pythonpath = os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH")) if p)
    cl_run(tmp_path, "tracking=local", "method.epochs=1", PYTHONPATH=pythonpath)
    # a swallowed ImportError would still leave the marker behind
    assert not marker.exists(), "mlflow was imported with tracking=local"
    outputs = tmp_path / "outputs"
    res = one_results(outputs)
    assert res["status"] == "finished" and res["mlflow_run_id"] is None and res["tasks_done"] == N_TASKS
    assert not (outputs / "mlflow.db").exists() and not (outputs / "mlartifacts").exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_fails_fast_in_one_line(tmp_path):
    port = free_port()  # bound and released: nothing listens there
    t0 = time.monotonic()
    p = cl_run(tmp_path, f"mlflow.uri=http://127.0.0.1:{port}", check=False, timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("cl-run: error:") and "unreachable" in lines[0], lines[0]
    assert f"127.0.0.1:{port}" in lines[0]
    assert elapsed < 20, f"took {elapsed:.1f}s: MLflow's own retries are not bounded"
    assert not list((tmp_path / "outputs").rglob("results.json"))  # reported before training


@pytest.mark.slow  # the server alone takes ~20 s to start on 2 cores
def test_real_mlflow_server(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    env = clean_env(tmp_path / "outputs", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no huey job runner
    server = subprocess.Popen(
        [script("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--artifacts-destination", (tmp_path / "srv_art").as_uri()],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, "mlflow server exited:\n" + (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health:\n" + \
                (tmp_path / "server.log").read_text()
            time.sleep(0.5)

        p = cl_run(tmp_path, f"mlflow.uri={uri}", "method.epochs=1")
        res = one_results(tmp_path / "outputs")
        assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing went to the local default

        c = client(uri)
        run = c.get_run(res["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["method"] == "spacenet" and run.data.params["method.epochs"] == "1"
        assert steps(c, run.info.run_id, "acc/task_1") == [1, 2, 3, 4, 5]
        assert run.data.metrics["final/avg_acc"] == pytest.approx(res["metrics"]["final/avg_acc"])
        # artifacts went through the server's proxy into --artifacts-destination
        assert ARTIFACTS <= {a.path for a in c.list_artifacts(run.info.run_id)}
        assert list((tmp_path / "srv_art").rglob("acc_matrix.csv"))
        exp = run.info.experiment_id  # the run's address on the server, in the UI's Model training view
        assert f"MLflow UI (run): {uri}/#/experiments/{exp}/runs/{run.info.run_id}?workflowType=machine_learning\n" \
            in p.stdout, p.stdout
    finally:
        stop_group(server)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group started by `proc` (start_new_session), then SIGKILL what is left."""
    def signal_group(sig) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while signal_group(0) and time.monotonic() < deadline:  # uvicorn may outlive the `mlflow` parent
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
    proc.wait(timeout=15)
