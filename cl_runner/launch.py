"""Launch presets (conf/launcher/): the torch threads of a job that shares the machine's cores with
other jobs, the plugin each preset needs, and Optuna's conditional search space for SpaceNet.

Parallel jobs on one machine each get cores ÷ jobs threads (at least 1): on 2 cores, two jobs left at
torch's default of 2 threads each ran ~20x slower than one job. The threads are set in the job's
environment before torch is imported (OpenMP reads OMP_NUM_THREADS once, at load) and again with
`torch.set_num_threads` in `train.set_threads`; an explicit `hardware.threads` wins. Nothing here
imports torch.
"""
from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger("cl_runner")

# preset -> (module of the Hydra plugin it selects, the cl-runner extra that installs it)
PLUGINS = {"local_parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
           "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
           "slurm_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
           "ray": ("hydra_plugins.hydra_ray_launcher", "ray")}
SWEEP_PLUGINS = {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna")}

_plan = (None, 1)  # (threads pinned for the current job or None, jobs sharing the cores)


def cores() -> int:
    """CPU cores this process may run on (a SLURM or taskset allocation, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def jobs_at_once(launcher) -> int:
    """Jobs sharing this machine's cores: local_parallel's n_jobs (joblib: -1 = one per core,
    -2 = all cores but one), else 1 (the basic launcher runs jobs one by one; SLURM and Ray give
    each job its own allocation)."""
    if launcher is None or launcher.get("name") != "local_parallel":
        return 1
    n = int(launcher["n_jobs"])
    return max(1, n if n > 0 else cores() + 1 + n)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


# A training step at least this big (multiply-adds of one forward pass over a minibatch) keeps every core
# even on a small machine. Measured on 2 cores: CLNP's 784-2000-2000 MLP at batch 256 (1.4 G) took 60 s per
# task with 2 threads and 87-95 s with 1; the 784-400-400 MLP at batch 128 (61 M) gained nothing from a
# second thread, and SpaceNet's small steps lost much (README, Speed).
WIDE_STEP_MACS = 500_000_000


def sampling_sweeper() -> bool:
    """Whether this multirun's sweeper draws its configs (Optuna, Nevergrad, Ax) rather than listing them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    target = str(HydraConfig.get().sweeper.get("_target_", ""))
    return bool(target) and not target.endswith("BasicSweeper")


def default_threads(step_macs: int = 0) -> int | None:
    """A lone job's threads: 1 on a machine (or allocation) of at most 2 cores, where a second thread
    waiting passively buys nothing on small steps, unless a step is wide (`step_macs` >= WIDE_STEP_MACS);
    else torch's default (all cores)."""
    return 1 if cores() <= 2 and step_macs < WIDE_STEP_MACS else None


def pin_threads(cfg, multirun: bool | None = None) -> None:
    """In the job, before torch is imported: OMP/MKL threads = cores ÷ jobs when jobs share the cores
    (hardware.threads, when set, instead). Leaves the environment alone for a lone job, and for a
    single run (no -m) whatever the launcher. `multirun`: None = ask Hydra."""
    global _plan
    if multirun is None:
        multirun = is_multirun()
    try:
        jobs = jobs_at_once(cfg.launcher if "launcher" in cfg else None) if multirun else 1
        explicit = int(cfg.hardware.threads) if "hardware" in cfg else 0
    except Exception:  # noqa: BLE001 - a malformed value is reported by validation, one line
        _plan = (None, 1)
        return
    threads = explicit if explicit > 0 else (max(1, cores() // jobs) if jobs > 1 else None)
    _plan = (threads, jobs)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def planned_threads() -> int | None:
    """The threads `pin_threads` chose for this job (None: keep torch's default)."""
    return _plan[0]


def jobs_sharing() -> int:
    """Jobs `pin_threads` counted on this machine's cores at once (1 for a lone job)."""
    return _plan[1]


def log_threads(threads: int) -> None:
    log.info("threads: %d (cores %d / jobs %d)", threads, cores(), _plan[1])


def missing_plugin(group: str, option: str) -> str | None:
    """One line naming the extra to install when `launcher=<option>` / `sweep=<option>` needs an absent plugin."""
    if group == "launcher":
        entry = PLUGINS.get(option)
    else:  # sweep presets are named <sweeper>_<what>
        entry = next((v for k, v in SWEEP_PLUGINS.items() if option.startswith(f"{k}_")), None)
    if entry is None or importlib.util.find_spec(entry[0]) is not None:
        return None
    module, extra = entry
    return f"{group}={option} needs the {module.split('.')[-1]} plugin: pip install 'cl-runner[{extra}]'"


def spacenet_spec(cfg, trial) -> None:
    """Optuna `custom_search_space` for conf/sweep/optuna_spacenet.yaml: spec is drawn in [1, sel] of
    the same trial, since SpaceNet reserves spec of the sel neurons it picked (spec > sel is a config
    error that would end the study). A spec given on the command line is left as it is."""
    if "method.spec" in trial.params or "method.spec" in trial.user_attrs:
        return
    sel = int(trial.params["method.sel"])
    trial.suggest_int("method.spec", 1, sel)
