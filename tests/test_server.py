"""The shared tracking server (`scripts/server.sh`: MLflow on PostgreSQL) and `cl-report --sync`.

Fast tier: the sync logic against SQLite stores standing in for the server. Slow tier (`make test-full`):
a real PostgreSQL-backed server on free ports in a temporary folder, a parallel sweep logging to it over
HTTP, and a server killed mid-run whose gap `cl-report --sync` fills afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from test_tracking import ARTIFACTS, N_TASKS, script

REPO = Path(__file__).resolve().parents[1]
SERVER_SH = REPO / "scripts" / "server.sh"


# ------------------------------------------------------------------------------------- helpers


def clean_env(cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CL_RUNNER_DATA")}
    env["CL_RUNNER_OUTPUTS"] = str(cwd / "outputs")
    return env


def run_script(name: str, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([script(name), *args], cwd=cwd, env=clean_env(cwd), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def results_files(cwd: Path) -> list[Path]:
    # rglob: a job folder named after an override with a '/' in it (mlflow.uri=http://...) is two folders deep
    return sorted(f for f in (cwd / "outputs").rglob("results.json") if f.parent.name != "artifacts")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def histories(c, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's full history, (step, value) sorted: duplicates would show as repeated steps."""
    keys = c.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys}


def assert_no_duplicates(hist: dict) -> None:
    for key, entries in hist.items():
        steps = Counter(s for s, _ in entries)
        assert max(steps.values()) == 1, (key, entries)


def assert_complete(c, run_id: str, res: dict) -> None:
    """The MLflow run holds everything results.json does: every step once, finals, artifacts, status."""
    hist = histories(c, run_id)
    assert_no_duplicates(hist)
    for j in range(N_TASKS):  # task j is evaluated after tasks j..T-1 (steps j+1..T)
        assert [s for s, _ in hist[f"acc/task_{j + 1}"]] == list(range(j + 1, N_TASKS + 1)), hist[f"acc/task_{j + 1}"]
        assert [v for _, v in hist[f"acc/task_{j + 1}"]] == pytest.approx([row[j] for row in res["acc"][j:]])
        assert [s for s, _ in hist[f"acc_til/task_{j + 1}"]] == list(range(j + 1, N_TASKS + 1))
    assert not [k for k in hist if k.startswith("time/task_")]  # a task's seconds: results.json and tasks.csv
    run = c.get_run(run_id)
    for k in ("final/avg_acc", "final/avg_acc_til", "final/bwt", "final/forgetting", "time/total_s"):
        assert run.data.metrics[k] == pytest.approx(res["metrics"][k]), k
    assert run.info.status == "FINISHED"
    assert ARTIFACTS <= {a.path for a in c.list_artifacts(run_id)}


# ------------------------------------------------------------ fast tier: SQLite stands in for the server
@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """One `tracking=local` run (no MLflow run id): its run folder."""
    cwd = tmp_path_factory.mktemp("local_run")
    run_script("cl-run", cwd, "method=finetune", "tracking=local", "method.epochs=1", "progress=off")
    (f,) = results_files(cwd)
    assert json.loads(f.read_text())["mlflow_run_id"] is None
    return f.parent


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a run folder whose results.json names its new place (as a run made there would)."""
    new = dest / "outputs" / "runs" / "day" / run_dir.name
    shutil.copytree(run_dir, new)
    res = json.loads((new / "results.json").read_text())
    res["run_dir"] = str(new)
    (new / "results.json").write_text(json.dumps(res, indent=1))
    return new


def test_sync_local_run_twice_into_sqlite(local_run, tmp_path, capsys):
    from cl_runner.report import main as report_main

    run_dir = copy_run(local_run, tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    p = run_script("cl-report", tmp_path, "--sync", str(tmp_path / "outputs"), "--tracking-uri", uri, timeout=120)
    assert "created run" in p.stdout and "1 created" in p.stdout, p.stdout
    res = json.loads((run_dir / "results.json").read_text())
    run_id = res["mlflow_run_id"]
    assert res["mlflow_synced"]["run_id"] == run_id and res["mlflow_synced"]["uri"] == uri

    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("cl_runner").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert_complete(c, run_id, res)
    tags, params = runs[0].data.tags, runs[0].data.params
    assert tags["method"] == "finetune" and tags["dataset"] == "split_digits" and tags["seed"] == "0"
    assert tags["run_dir"] == str(run_dir) and tags["config_hash"] == res["config_hash"]
    assert tags["git_commit"] == res["git_commit"] and "mlflow.parentRunId" not in tags
    assert params["method.epochs"] == "1" and params["dataset.name"] == "split_digits"
    # artifacts next to the SQLite file, as cl-run's own default store keeps them
    assert list((tmp_path / "store" / "mlartifacts").rglob("acc_matrix.csv"))
    logged = json.loads(Path(c.download_artifacts(run_id, "results.json", str(tmp_path))).read_text())
    assert logged["mlflow_synced"]["run_id"] == run_id

    before = histories(c, run_id), (run_dir / "results.json").read_bytes()
    assert report_main(["--sync", str(run_dir), "--tracking-uri", uri]) == 0  # in-process this time
    out = capsys.readouterr().out
    assert "up to date" in out and "1 up to date" in out, out
    assert len(c.search_runs([runs[0].info.experiment_id])) == 1
    assert (histories(c, run_id), (run_dir / "results.json").read_bytes()) == before


def test_sync_fills_the_gaps_of_an_existing_run(local_run, tmp_path):
    """A run the server saw until task 2 (then died): only the missing steps, finals and artifacts go up."""
    from mlflow.entities import Metric

    from cl_runner.tracking.sync import main as sync

    run_dir = copy_run(local_run, tmp_path)
    res = json.loads((run_dir / "results.json").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    exp = c.create_experiment("cl_runner", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = c.create_run(exp, tags={"run_dir": str(run_dir)}).info.run_id
    seen = [Metric(f"acc/task_{j + 1}", res["acc"][i][j], 0, i + 1) for i in range(2) for j in range(i + 1)]
    c.log_batch(run_id, metrics=seen)
    c.log_artifact(run_id, str(run_dir / "artifacts" / "config.yaml"))
    res["mlflow_run_id"] = run_id
    (run_dir / "results.json").write_text(json.dumps(res))

    assert sync([str(run_dir)], uri) == 0
    assert [r.info.run_id for r in c.search_runs([exp])] == [run_id]
    assert_complete(c, run_id, res)
    assert c.get_run(run_id).data.params["method.epochs"] == "1"
    assert json.loads((run_dir / "results.json").read_text())["mlflow_synced"]["run_id"] == run_id
    n = sum(len(h) for h in histories(c, run_id).values())
    assert sync([str(run_dir)], uri) == 0
    assert sum(len(h) for h in histories(c, run_id).values()) == n


def test_sync_closes_a_sweep_parent_left_running(local_run, tmp_path, capsys):
    """The server was down when a sweep ended, so its parent run stayed RUNNING: sync closes it once every
    job of the sweep folder is over, and leaves it alone while one still runs."""
    from cl_runner.tracking.sync import main as sync

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    exp = c.create_experiment("cl_runner", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = c.create_run(exp, tags={"cl_runner.sweep_parent": "true"}).info.run_id
    sweep = tmp_path / "outputs" / "multirun" / "day" / "time"
    jobs = []
    for i in range(2):
        job = sweep / str(i)
        shutil.copytree(local_run, job)
        res = json.loads((job / "results.json").read_text())
        res.update(run_dir=str(job), status="running" if i else "finished")
        (job / "results.json").write_text(json.dumps(res))
        jobs.append(job)
    (sweep / "mlflow_parent.json").write_text(json.dumps({"run_id": parent, "uri": uri}))

    assert sync([str(sweep)], uri) == 0  # job 1 still runs: the sweep is not over
    assert c.get_run(parent).info.status == "RUNNING"
    (child,) = [r for r in c.search_runs([exp]) if r.info.run_id != parent]
    assert child.data.tags["mlflow.parentRunId"] == parent
    res = json.loads((jobs[1] / "results.json").read_text())
    res["status"] = "finished"
    (jobs[1] / "results.json").write_text(json.dumps(res))
    capsys.readouterr()
    assert sync([str(sweep)], uri) == 0
    out = capsys.readouterr().out
    assert "RUNNING -> FINISHED (2 jobs)" in out and "1 parents closed" in out, out
    assert c.get_run(parent).info.status == "FINISHED"
    assert sync([str(sweep)], uri) == 0
    assert "parents closed" not in capsys.readouterr().out


def test_sync_rebuilds_what_the_tracker_logs(tmp_path):
    """A run tracked live (SQLite) and the same results.json synced into another store hold the same
    (key, step, value) entries, params and tags: sync rebuilds them with the tracker's own names.task_metrics."""
    from cl_runner.tracking.sync import main as sync

    run_script("cl-run", tmp_path, "method=finetune", "method.epochs=1", "progress=off")
    (f,) = results_files(tmp_path)
    res = json.loads(f.read_text())
    live = client(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    other_uri = f"sqlite:///{tmp_path}/other/mlflow.db"
    (tmp_path / "other").mkdir()
    assert sync([str(f)], other_uri) == 0
    synced = json.loads(f.read_text())["mlflow_synced"]
    assert synced["uri"] == other_uri and synced["run_id"] != res["mlflow_run_id"]
    assert json.loads(f.read_text())["mlflow_run_id"] == res["mlflow_run_id"]  # the live run's id is kept
    other = client(other_uri)
    a, b = live.get_run(res["mlflow_run_id"]), other.get_run(synced["run_id"])
    assert histories(live, a.info.run_id) == histories(other, b.info.run_id)  # (step, value) per key
    assert a.data.params == b.data.params
    for k in ("method", "method_class", "dataset", "model", "seed", "git_commit", "run_dir", "config_hash",
              "overrides"):
        assert a.data.tags[k] == b.data.tags[k], k
    assert {x.path for x in live.list_artifacts(a.info.run_id)} == {x.path for x in other.list_artifacts(b.info.run_id)}
    # the live store was already complete: syncing into it changes nothing
    assert sync([str(f)], f"sqlite:///{tmp_path}/outputs/mlflow.db") == 0
    assert len(live.search_runs([a.info.experiment_id])) == 1


def test_sync_skips_running_runs_and_artifact_copies(local_run, tmp_path, capsys):
    from cl_runner.tracking.sync import main as sync

    run_dir = copy_run(local_run, tmp_path)
    res = json.loads((run_dir / "results.json").read_text())
    res["status"] = "running"
    (run_dir / "results.json").write_text(json.dumps(res))
    copy = tmp_path / "outputs" / "mlartifacts" / "1" / "abc" / "artifacts"  # MLflow's copy is not a run
    copy.mkdir(parents=True)
    shutil.copy(local_run / "results.json", copy)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sync([str(tmp_path / "outputs")], uri) == 0
    out = capsys.readouterr().out
    assert "skipped, status 'running'" in out and "1 skipped" in out and "synced 1 run(s)" in out, out
    assert "mlflow_synced" not in json.loads((run_dir / "results.json").read_text())


# ------------------------------------------------------------------ slow tier: PostgreSQL + mlflow server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/server.sh on free ports in a temporary folder."""

    def __init__(self, root: Path):
        self.dir, self.port = root / "server", free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SERVER_DIR": str(self.dir), "PORT": str(self.port), "PG_PORT": str(free_port()),
                    "WORKERS": "1", "MLFLOW": script("mlflow"), "PYTHON": sys.executable}

    def sh(self, cmd: str, timeout: float = 300) -> str:
        p = subprocess.run(["bash", str(SERVER_SH), cmd], env=self.env, capture_output=True, text=True,
                           timeout=timeout, cwd=REPO)
        assert p.returncode == 0, f"server.sh {cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout

    def kill_mlflow(self) -> None:
        """The tracking server dies (SIGKILL, its whole process group); PostgreSQL stays up."""
        pid = int((self.dir / "mlflow.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server():
    bin_dir = subprocess.run(["bash", str(SERVER_SH), "pg-bin"], capture_output=True, text=True).stdout.strip()
    if not bin_dir:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; `make server` installs "
                    "them (apt-get install postgresql, as root)")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[server]'")
    # not pytest's tmp_path: its 0700 folders would keep the `postgres` user (when we are root) out
    root = Path(tempfile.mkdtemp(prefix="cl_srv_"))
    root.chmod(0o755)
    srv = Server(root)
    t0 = time.monotonic()
    out = srv.sh("start")
    print(f"server started in {time.monotonic() - t0:.1f}s:\n{out}")
    assert srv.uri in out
    try:
        yield srv
    finally:
        print(srv.sh("stop"))
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_joblib_sweep_on_postgres_server(server, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    run_script("cl-run", tmp_path, "-m", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               f"mlflow.uri={server.uri}", "progress=off", "method=finetune", "method.epochs=1")
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing went to the local default
    results = [json.loads(f.read_text()) for f in results_files(tmp_path)]
    assert len(results) == 2 and all(r["status"] == "finished" and not r.get("mlflow_error") for r in results)
    sweep_dir = str(next(p for p in Path(results[0]["run_dir"]).parents if (p / "mlflow_parent.json").is_file()))

    c = client(server.uri)
    exp = c.get_experiment_by_name("cl_runner")
    (parent,) = c.search_runs([exp.experiment_id], f"tags.sweep_dir = '{sweep_dir}'")
    assert parent.data.tags["cl_runner.sweep_parent"] == "true" and parent.info.status == "FINISHED"
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
    assert {r.info.run_id for r in children} == {r["mlflow_run_id"] for r in results}
    by_id = {r["mlflow_run_id"]: r for r in results}
    for child in children:
        assert_complete(c, child.info.run_id, by_id[child.info.run_id])
    # artifacts went through the server into its own folder
    assert len(list((server.dir / "artifacts").rglob("acc_matrix.csv"))) >= 2


@pytest.mark.slow
def test_server_killed_mid_run_then_sync(server, tmp_path):
    c = client(server.uri)
    cmd = [script("cl-run"), f"mlflow.uri={server.uri}", "method=finetune", "method.epochs=300", "hardware.threads=1",
           "progress=off"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # wait until the server has task 1's metrics, then freeze the run, kill the server, go on
            files = results_files(tmp_path)
            res = json.loads(files[0].read_text()) if files else {}
            if res.get("tasks_done", 0) >= 1 and c.get_metric_history(res["mlflow_run_id"], "acc/avg"):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not finish task 1 in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        res = json.loads(files[0].read_text())
        assert res["status"] == "running" and res["tasks_done"] < N_TASKS, \
            f"the run got to {res['tasks_done']} tasks before it was stopped: raise method.epochs"
        server.kill_mlflow()
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    assert proc.returncode == 0, f"--- stdout\n{out}\n--- stderr\n{err}"
    assert (out + err).count("MLflow stopped answering") == 1, out + err  # warned once (Hydra logs to stdout)
    res = json.loads(files[0].read_text())
    assert res["status"] == "finished" and res["tasks_done"] == N_TASKS and res["mlflow_error"]
    run_id = res["mlflow_run_id"]

    t0 = time.monotonic()
    print(server.sh("start"))  # PostgreSQL kept the data; MLflow comes back
    print(f"mlflow restarted in {time.monotonic() - t0:.1f}s")
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING"  # what the server was left with
    logged = [m.step for m in c.get_metric_history(run_id, "acc/task_1")]
    assert 1 in logged and len(logged) < N_TASKS, logged

    p = run_script("cl-report", tmp_path, "--sync", str(tmp_path / "outputs"), "--tracking-uri", server.uri)
    print(p.stdout)
    assert f"run {run_id}" in p.stdout and "RUNNING -> FINISHED" in p.stdout and "1 updated" in p.stdout
    exp_id = run.info.experiment_id
    assert [r.info.run_id for r in c.search_runs([exp_id], f"tags.run_dir = '{res['run_dir']}'")] == [run_id]
    final = json.loads(files[0].read_text())
    assert final["mlflow_synced"]["run_id"] == run_id
    assert_complete(c, run_id, final)

    before = histories(c, run_id)
    p = run_script("cl-report", tmp_path, "--sync", str(tmp_path / "outputs"), "--tracking-uri", server.uri)
    print(p.stdout)
    assert "1 up to date" in p.stdout, p.stdout
    assert histories(c, run_id) == before
    assert len(c.search_runs([exp_id], f"tags.run_dir = '{res['run_dir']}'")) == 1
