"""Sweeps on clusters (launcher=ray, launcher=slurm): reach the cluster, give the jobs the driver's setting,
or say in one line why not.

The sweep callback calls `install(config)` before Hydra builds the launcher; it replaces the Ray plugin's
launch and wraps submitit's SLURM launch (as sweep.py wraps Optuna's sweep), because as released they
- pass `object_store_memory` to `ray.init` always, which Ray refuses when it joins an existing cluster;
- run Ray jobs with the environment and working folder of the node's `ray start`, not the driver's, so the
  jobs wrote to another `outputs/` and another MLflow database, and nothing nested under the sweep's parent;
- wait minutes on a cluster that is down (Ray retries the GCS; sbatch retries the controller), then fail
  in a traceback, leaving the parent run RUNNING.
Here the cluster is probed first, within `launcher.connect_timeout_s`; every failure becomes a ClusterError,
which cl-run prints in one line after closing the sweep's parent run (sweep.abort_sweep). A relaunch skips
the jobs that finished (skip_finished), as on one machine.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ClusterError, ClusterJobError

log = logging.getLogger("cl_runner")

# what a job's process needs from the driver's environment besides paths and tracking (set by job_env):
# thread settings (cl-run sets OMP_WAIT_POLICY; the user may pin OMP/MKL threads) and cl_runner's own variables
FORWARDED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# a private Ray instance's object store, in bytes: the plugin's value (Ray's default, 30 % of memory, does
# not fit a small container's /dev/shm); jobs return a float, so it is never short
PRIVATE_OBJECT_STORE = 78_643_200
RAY_PORT, RAY_CLIENT_PORT, SLURMCTLD_PORT = 6379, 10001, 6817  # the defaults of `ray start` and slurm.conf


def install(config: DictConfig) -> None:
    """Take over the Ray launcher / wrap the SLURM launcher when this sweep uses one (no-op otherwise)."""
    target = str(config.hydra.launcher.get("_target_", ""))
    if target.endswith("hydra_ray_launcher.ray_launcher.RayLauncher"):
        from hydra_plugins.hydra_ray_launcher import ray_launcher

        ray_launcher.RayLauncher.launch = ray_launch
    elif target.endswith("hydra_submitit_launcher.submitit_launcher.SlurmLauncher"):
        from hydra_plugins.hydra_submitit_launcher import submitit_launcher

        cls = submitit_launcher.SlurmLauncher
        if not getattr(cls.launch, "cl_runner_wrapped", False):  # one wrapper, however many sweeps run
            cls.launch = slurm_launch(cls.launch)


def job_env(config: DictConfig) -> dict[str, str]:
    """The variables a job on another node needs to write where the driver reads: absolute outputs and data
    folders, the tracking URI that holds the sweep's parent run, and thread settings."""
    env = {k: v for k, v in os.environ.items() if k.startswith("CL_RUNNER_") or k in FORWARDED}
    env["CL_RUNNER_OUTPUTS"] = str(Path(config.paths.outputs).resolve())
    env["CL_RUNNER_DATA"] = str(Path(config.paths.data).resolve())
    if config.tracking == "mlflow":
        from .tracking.mlflow_store import tracking_uri

        env["MLFLOW_TRACKING_URI"] = tracking_uri(config.mlflow.uri, config.paths.outputs)
    return env


def probe(host: str, port: int, timeout: float) -> str | None:
    """None when host:port accepts a TCP connection within `timeout` s, else why not."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))


# ----------------------------------------------------------------------------------------------------- Ray
def ray_address(address: str, timeout: float) -> str:
    """The cluster `launcher.address` names, checked to accept connections: `auto` becomes the host:port of
    RAY_ADDRESS or of the last `ray start` on this node (Ray's own lookup); ray:// addresses are kept."""
    client = address.startswith("ray://")
    hostport = address[len("ray://"):] if client else address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            hostport = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise ClusterError("launcher.address=auto found no Ray cluster on this machine (no RAY_ADDRESS, no "
                               "running `ray start`); start one (`ray start --head`) or give launcher.address="
                               "host:port") from None
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        host, port = hostport, str(RAY_CLIENT_PORT if client else RAY_PORT)
    shown = f"{'ray://' if client else ''}{host}:{port}"
    why = probe(host, int(port), timeout)
    if why:
        given = f" (launcher.address={address})" if address != shown else ""
        raise ClusterError(f"the Ray cluster at {shown}{given} did not accept a connection within {timeout:g} s "
                           f"({why}); check that it runs (`ray status` on its head node) and launcher.address")
    return shown


def ray_launch(launcher, job_overrides, initial_job_idx):
    """RayLauncher.launch: join the cluster (or start a private instance), one Ray task per job, running in the
    driver's folder (when the node sees it) with the driver's environment (job_env); results as Hydra's."""
    import ray
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides, setup_globals

    setup_globals()
    config = launcher.config
    init = OmegaConf.to_container(launcher.ray_cfg.init, resolve=True) or {}
    address = init.get("address")
    if address in (None, "local"):
        where = "a private Ray instance on this machine"
        # "local": a new instance even when `ray start` runs here (Ray would join that one, or hang on the
        # address a stopped cluster left in /tmp/ray, and refuse the object store size)
        init["address"] = "local"
        init.setdefault("object_store_memory", PRIVATE_OBJECT_STORE)
    else:
        where = ray_address(str(address), float(config.launcher.connect_timeout_s))
        init["address"] = where  # the address just probed, not Ray's own lookup again
        init.pop("object_store_memory", None)  # Ray refuses it when joining: the cluster sized its store
    runtime_env = dict(init.get("runtime_env") or {})
    runtime_env["env_vars"] = {**job_env(config), **(runtime_env.get("env_vars") or {})}  # the user's win
    init["runtime_env"] = runtime_env
    if not ray.is_initialized():  # a search sweeper launches batch after batch in one process
        try:
            ray.init(**init)
        except Exception as e:  # noqa: BLE001 - Ray's messages run to pages; one line says what to check
            raise ClusterError(f"could not join {where}: {_short(e)}; check `ray status` there, that its Ray "
                               "and Python versions match this machine's, and, if it uses token authentication, "
                               "RAY_AUTH_MODE=token with its token here") from None
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Ray: %d jobs on %s, sweep folder %s", len(job_overrides), where, sweep_dir)
    remote = OmegaConf.to_container(launcher.ray_cfg.remote, resolve=True) or {}
    task = ray.remote(**remote)(_run_in_folder) if remote else ray.remote(_run_in_folder)
    jobs = []
    for num, overrides in enumerate(job_overrides, initial_job_idx):
        described = " ".join(filter_overrides(overrides))
        log.info("\t#%d : %s", num, described)
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"job_id_for_{num}"  # the plugin's; Ray has no scheduler job id
            sweep_config.hydra.job.num = num
        ref = task.remote(os.getcwd(), launcher.hydra_context, sweep_config, launcher.task_function,
                          Singleton.get_state())
        jobs.append((num, described, ref))
    returns, lost = [], []
    for num, described, ref in jobs:  # wait for every job: one lost job must not orphan the others' results
        try:
            returns.append(ray.get(ref))
        except ray.exceptions.RayError as e:
            lost.append((num, described, e))
    if lost:
        num, described, e = lost[0]
        died = not isinstance(e, ray.exceptions.RayTaskError)  # a worker, node or task the cluster stopped
        raise ClusterJobError(
            f"{len(lost)} of {len(jobs)} jobs did not finish on {where}: job #{num} ({described}): "
            f"{type(e).__name__}: {_short(e)}; check `ray status` and the cluster's logs (session_latest/logs "
            "on its nodes); a relaunch skips the finished jobs", status="KILLED" if died else "FAILED")
    return returns


def _run_in_folder(folder: str, hydra_context, sweep_config, task_function, singleton_state):
    """A Ray task: move into the driver's folder when this node sees it (a shared filesystem), so relative
    paths (hydra.sweep.dir, paths.*) mean what they mean on the driver; then Hydra's job runner."""
    if os.path.isdir(folder):
        os.chdir(folder)
    from hydra_plugins.hydra_ray_launcher._launcher_util import _run_job

    return _run_job(hydra_context, sweep_config, task_function, singleton_state)


# --------------------------------------------------------------------------------------------------- SLURM
def slurm_controller() -> str:
    """Where the SLURM controller is, as slurm.conf says ($SLURM_CONF, else /etc/slurm/slurm.conf)."""
    conf = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    keys = {}
    try:
        for line in conf.read_text().splitlines():
            key, _, value = line.split("#", 1)[0].partition("=")
            keys.setdefault(key.strip().lower(), value.strip())
    except OSError:
        raise ClusterError(f"no SLURM configuration: {conf} cannot be read; point SLURM_CONF at the cluster's "
                           "slurm.conf (or run cl-run on a node of the cluster)") from None
    host = keys.get("slurmctldhost") or keys.get("controlmachine") or "?"
    name, _, addr = host.rstrip(")").partition("(")  # SlurmctldHost=name(address)
    return f"{addr or name}:{keys.get('slurmctldport') or SLURMCTLD_PORT} ({conf})"


def check_slurm(timeout: float) -> str:
    """The controller's address when `scontrol ping` finds it up within `timeout` s, else a ClusterError."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise ClusterError("launcher=slurm needs SLURM's commands (sbatch, scontrol, sacct) on PATH and none were "
                           "found; run cl-run on a login node of the cluster (launcher=slurm_local runs the same "
                           "path without one)")
    where = slurm_controller()
    try:  # scontrol's own retries to a controller that is down take a minute or more
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
        said = next((ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip()), f"exit {p.returncode}")
        up = p.returncode == 0 and " is UP" in p.stdout
    except subprocess.TimeoutExpired:
        said, up = f"no answer within {timeout:g} s", False
    if not up:
        raise ClusterError(f"the SLURM controller at {where} is not reachable ({said[:200]}); check that slurmctld "
                           "runs (`scontrol ping`), SLURM_CONF and munge")
    return where


def slurm_launch(launch):
    """SlurmLauncher.launch, after checking the controller; submission and job failures in one line."""

    @functools.wraps(launch)
    def checked(launcher, job_overrides, initial_job_idx):
        from submitit.core.utils import FailedJobError, UncompletedJobError

        where = check_slurm(float(launcher.config.launcher.connect_timeout_s))
        try:
            return launch(launcher, job_overrides, initial_job_idx)
        except UncompletedJobError as e:  # cancelled, timed out, node failure: no result came back
            raise ClusterJobError(f"a SLURM job of the sweep did not finish ({_short(e)}); check `sacct` and its "
                                  f"log in the sweep's .submitit folder (controller {where}); a relaunch skips the "
                                  "finished jobs", status="KILLED") from None
        except FailedJobError as e:  # the job's Python raised; submitit's message ends with the traceback
            raise ClusterJobError(f"a SLURM job of the sweep failed: {_last_line(e)}; see its log in the sweep's "
                                  ".submitit folder", status="FAILED") from None
        except (subprocess.CalledProcessError, OSError) as e:
            raise ClusterError(f"SLURM refused the sweep's jobs ({_short(e)}); check `sbatch` by hand and the "
                               f"launcher.* settings (controller {where})") from None

    checked.cl_runner_wrapped = True
    return checked


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__
