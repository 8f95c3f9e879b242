"""Helpers of tests/test_clusters.py: a Ray head started with `ray start --head --block` (stopped through its
own process group, never `ray stop`, which would stop every Ray on the machine), the one-node SLURM of
scripts/slurm.sh, running cl-run as a user would, and reading one sweep back from MLflow."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli

REPO = Path(__file__).resolve().parents[1]
# the cheapest real sweep: finetune on the bundled digits, 1 epoch per task, 2 seeds, one thread per job
SWEEP = ("-m", "method=finetune", "seed=0,1", "method.epochs=1", "progress=off", "hardware=cpu")
# what the driver's shell must not hand to a cluster's nodes itself (the launcher has to)
DRIVER_ONLY = ("CL_RUNNER_", "MLFLOW_", "RAY_ADDRESS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(DRIVER_ONLY)}
    # Ray 2.60 turns token authentication on for `ray start` when ~/.ray/auth_token exists (a private
    # instance, as in test_launchers, writes one) but a driver sends the token only with RAY_AUTH_MODE=token:
    # the same mode on both sides keeps these tests independent of what ran on the machine before
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"} | extra


class RayHead:
    """`ray start --head --num-cpus=2 --port=<free>` in its own folder and session; `stop()` ends the session."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--head", "--block", "--num-cpus=2", f"--port={self.port}", "--disable-usage-stats",
               f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        self.log = folder / "ray.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=folder, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ray start did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the session (`--block` then drains and stops its processes), SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.5)


class Slurm:
    """The one-node cluster of scripts/slurm.sh (configured under outputs/slurm, kept between runs)."""

    def __init__(self):
        self.script = REPO / "scripts" / "slurm.sh"
        p = subprocess.run(["bash", str(self.script), "start"], cwd=REPO, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            self.stop()
            pytest.fail(f"scripts/slurm.sh start failed:\n{p.stdout}\n{p.stderr}")
        self.conf = str(REPO / "outputs" / "slurm" / "slurm.conf")

    def stop(self) -> None:
        subprocess.run(["bash", str(self.script), "stop"], cwd=REPO, capture_output=True, text=True, timeout=120)

    def sacct(self, *job_ids: str) -> dict[str, str]:
        """{job id: state} of these jobs (array tasks as 12_0), from SLURM's accounting."""
        p = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                           env=clean_env(SLURM_CONF=self.conf), capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return dict(line.split("|")[:2] for line in p.stdout.split())


def run_cl(cwd: Path, env: dict, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """cl-run in `cwd` with `env`; the finished process and its wall time in seconds."""
    t = time.perf_counter()
    p = subprocess.run([cli(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.perf_counter() - t


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"cl-run exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
    return p


def sweep_results(outputs: Path) -> tuple[Path, dict[int, dict]]:
    """The one sweep folder under outputs/multirun and its jobs' results.json by seed."""
    dirs = [d for d in (outputs / "multirun").glob("*/*") if d.is_dir()]
    assert len(dirs) == 1, dirs
    results = [json.loads(f.read_text()) for f in dirs[0].glob("*/results.json")]
    return dirs[0], {r["config"]["seed"]: r for r in results}


def sweep_runs(uri: str, include_deleted: bool = False) -> tuple[list, list]:
    """(parent runs, child runs) of the experiment cl_runner in the store at `uri`."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cl_runner")
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    runs = client.search_runs([exp.experiment_id], run_view_type=view) if exp else []
    parents = [r for r in runs if r.data.tags.get("cl_runner.sweep_parent") == "true"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]
