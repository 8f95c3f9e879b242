"""Sweeps on real clusters (slow tier; `make test-cluster` runs just these and installs what they need).

Ray: a head started here with `ray start --head --num-cpus=2 --port=<free>` in a folder of its own, with none
of the driver's variables; the 2-seed sweep run from another folder with `launcher.address=auto` and with
host:port must put one parent and two FINISHED nested children into the driver's (temporary) MLflow database
and its results into the driver's outputs folder, with the matrices of the same sweep run locally, as Ray
tasks of that cluster. SLURM: the same through sbatch on the one-node cluster of scripts/slurm.sh, the jobs
found in sacct. For each launcher, a cluster that is down ends in one line, non-zero, well under 30 s, and
closes the sweep's parent run; a relaunch skips the finished jobs; a job the cluster kills closes the parent
as KILLED. Every cluster started here is stopped by its fixture's finalizer, whatever the tests do.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time

import pytest
import yaml

from clusters_util import SWEEP, RayHead, Slurm, clean_env, free_port, ok, run_cl, sweep_results, sweep_runs

pytestmark = pytest.mark.slow
TIMINGS = {}  # name -> seconds, printed at the end (make test-cluster shows them with -s)


def needs_ray():
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("the Ray launcher is not installed (pip install 'cl-runner[ray]'; make test-cluster does)")


def needs_slurm():
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("the SLURM launcher is not installed (pip install 'cl-runner[slurm]')")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")):
        pytest.skip("no SLURM daemons here (scripts/slurm.sh install: Debian's slurm-wlm, as root)")


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    yield
    for name, seconds in TIMINGS.items():
        print(f"\n[cluster timing] {name}: {seconds:.1f} s", end="")


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The same sweep on this machine (Hydra's basic launcher): results.json by seed."""
    cwd = tmp_path_factory.mktemp("local_sweep")
    ok(run_cl(cwd, clean_env(), *SWEEP, "tracking=local")[0])
    return sweep_results(cwd / "outputs")[1]


def check_sweep(cwd, uri, local) -> None:
    """One FINISHED parent, two FINISHED children nested under it, results in `cwd`/outputs matching `local`."""
    sweep_dir, results = sweep_results(cwd / "outputs")
    assert sorted(results) == [0, 1] and all(r["status"] == "finished" for r in results.values())
    parents, children = sweep_runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["sweep_dir"].endswith(str(sweep_dir.relative_to(cwd)))
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in results.values()}
    for seed, r in results.items():  # the same numbers as on one machine (one thread each, CPU)
        assert r["acc"] == local[seed]["acc"] and r["metrics"]["final/avg_acc"] == local[seed]["metrics"]["final/avg_acc"]


def check_down(p, seconds, uri, where: str) -> None:
    """Cluster down: one line naming it, exit non-zero, quickly, and the sweep's parent closed (not RUNNING)."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("cl-run: error:"), p.stderr
    assert where in lines[0] and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert seconds < 30, seconds
    parents, _ = sweep_runs(uri, include_deleted=True)
    assert len(parents) == 1 and parents[0].info.status == "FAILED", [r.info.status for r in parents]


# ---------------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    needs_ray()
    head = RayHead(tmp_path_factory.mktemp("ray_head"))
    yield head
    head.stop()


@pytest.fixture(scope="module")
def ray_sweeps(ray_head, tmp_path_factory):
    """The sweep through launcher=ray, from a folder of its own per address form, with no other override;
    outputs relative to the driver's folder and MLflow in a temporary SQLite database given by the shell."""
    out = {}
    for form, address in (("auto", "auto"), ("host:port", ray_head.address)):
        cwd = tmp_path_factory.mktemp("ray_driver")
        uri = f"sqlite:///{cwd / 'tracking.db'}"
        p, seconds = run_cl(cwd, clean_env(MLFLOW_TRACKING_URI=uri), *SWEEP, "launcher=ray",
                            f"launcher.address={address}")
        TIMINGS[f"ray sweep, launcher.address={form}"] = seconds
        out[form] = (cwd, uri, ok(p))
    return out


@pytest.mark.parametrize("form", ["auto", "host:port"])
def test_ray_sweep_nests_under_its_parent_and_matches_local(ray_sweeps, local_sweep, form):
    cwd, uri, _ = ray_sweeps[form]
    check_sweep(cwd, uri, local_sweep)


def test_ray_jobs_ran_as_tasks_of_the_cluster(ray_head, ray_sweeps):
    from ray.util.state import list_tasks

    tasks = list_tasks(address=ray_head.address, filters=[("func_or_class_name", "=", "_run_in_folder")])
    assert [t.state for t in tasks] == ["FINISHED"] * 4, tasks  # 2 jobs x 2 sweeps
    assert not list((ray_head.folder / "outputs").glob("**/results.json"))  # nothing where `ray start` ran


def test_ray_relaunch_skips_finished_jobs(ray_head, ray_sweeps):
    cwd, uri, _ = ray_sweeps["host:port"]
    p, seconds = run_cl(cwd, clean_env(MLFLOW_TRACKING_URI=uri), *SWEEP, "launcher=ray",
                        f"launcher.address={ray_head.address}")
    TIMINGS["ray relaunch (both jobs skipped)"] = seconds
    assert ok(p).stdout.count("skipped: this config") == 2, p.stdout
    parents, children = sweep_runs(uri)
    assert len(parents) == 2 and len(children) == 2  # no job ran again; the new parent reports the old runs
    newest = max(parents, key=lambda r: r.info.start_time)
    assert newest.info.status == "FINISHED" and newest.data.tags.get("cl_runner.reused_runs")


@pytest.mark.parametrize("form", ["auto", "host:port"])
def test_ray_cluster_down_is_one_line(tmp_path, form):
    """Nothing listens on the port: `auto` finds it through RAY_ADDRESS (as after a `ray start` elsewhere)."""
    needs_ray()
    dead = f"127.0.0.1:{free_port()}"
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    extra = {"RAY_ADDRESS": dead} if form == "auto" else {}
    p, seconds = run_cl(tmp_path, clean_env(MLFLOW_TRACKING_URI=uri, **extra), *SWEEP, "launcher=ray",
                        f"launcher.address={'auto' if form == 'auto' else dead}", timeout=120)
    TIMINGS[f"ray cluster down ({form})"] = seconds
    check_down(p, seconds, uri, "Ray cluster at " + (dead if form == "host:port" else ""))
    assert dead.split(":")[1] in p.stderr  # auto: Ray names this host by its address, not 127.0.0.1


# -------------------------------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm():
    needs_slurm()
    cluster = Slurm()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def slurm_sweep(slurm, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("slurm_driver")
    uri = f"sqlite:///{cwd / 'tracking.db'}"
    p, seconds = run_cl(cwd, clean_env(MLFLOW_TRACKING_URI=uri, SLURM_CONF=slurm.conf), *SWEEP, "launcher=slurm")
    TIMINGS["slurm sweep"] = seconds
    return cwd, uri, ok(p)


def test_slurm_sweep_nests_under_its_parent_and_matches_local(slurm_sweep, local_sweep):
    cwd, uri, _ = slurm_sweep
    check_sweep(cwd, uri, local_sweep)


def test_slurm_jobs_are_in_sacct(slurm, slurm_sweep):
    cwd, _, _ = slurm_sweep
    sweep_dir, _ = sweep_results(cwd / "outputs")
    ids = [yaml.safe_load(f.read_text())["hydra"]["job"]["id"] for f in sweep_dir.glob("*/.hydra/hydra.yaml")]
    assert len(ids) == 2 and all("_" in i for i in ids), ids  # SLURM array tasks: <job>_<task>
    assert slurm.sacct(*ids) == {i: "COMPLETED" for i in ids}


def test_slurm_job_killed_by_the_cluster_closes_the_parent_as_killed(slurm, tmp_path):
    """scancel of a running job: one line, exit 1, the parent KILLED (a relaunch would skip what finished)."""
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    env = clean_env(MLFLOW_TRACKING_URI=uri, SLURM_CONF=slurm.conf)
    proc = subprocess.Popen([*_cl(), *SWEEP[:1], "method=finetune", "seed=5", "method.epochs=200", "progress=off",
                             "launcher=slurm"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job = _wait_running(env, proc)
        subprocess.run(["scancel", job], env=env, check=True, timeout=30)
        t = time.perf_counter()
        out, err = proc.communicate(timeout=180)
        TIMINGS["slurm: scancel to cl-run's exit"] = time.perf_counter() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "did not finish" in lines[0], err
    parents, _ = sweep_runs(uri, include_deleted=True)
    assert [r.info.status for r in parents] == ["KILLED"]


def test_slurm_controller_down_is_one_line(tmp_path, slurm):
    """A slurm.conf whose controller port has nothing behind it (the real cluster keeps running)."""
    conf = tmp_path / "slurm.conf"
    port = free_port()
    text = open(slurm.conf).read()
    conf.write_text("\n".join(f"SlurmctldPort={port}" if ln.startswith("SlurmctldPort=") else ln
                              for ln in text.splitlines()) + "\n")
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    p, seconds = run_cl(tmp_path, clean_env(MLFLOW_TRACKING_URI=uri, SLURM_CONF=str(conf)), *SWEEP,
                        "launcher=slurm", timeout=120)
    TIMINGS["slurm controller down"] = seconds
    check_down(p, seconds, uri, f"SLURM controller at 127.0.0.1:{port}")


def _cl():
    from conftest import cli

    return [cli(), "-m"]


def _wait_running(env, proc, timeout=120) -> str:
    """The id of the first job of ours that SLURM runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        q = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], env=env, capture_output=True, text=True)
        if q.stdout.split():
            return q.stdout.split()[0]
        time.sleep(1)
    pytest.fail("no job of the sweep started on the SLURM cluster")
