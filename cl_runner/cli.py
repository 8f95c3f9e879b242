"""Entry points: `cl-run` (Hydra app) and its Hydra callback that checks the run or sweep folder before Hydra
writes into it (the sweep's parent MLflow run is sweep.py's callback). Every error a user
can cause ends here in one line: `cl-run: error: ...`, exit code 2 (1 for a run that failed after it started).
"""
from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .errors import CapacityError, ConfigError, TrainingError, UserError
from .launch import is_multirun, missing_plugin, pin_threads, sampling_sweeper

log = logging.getLogger("cl_runner")
GROUPS = ("method", "dataset", "model", "hardware", "launcher", "experiment", "sweep")


def _options(group: str) -> list:
    folder = resources.files("cl_runner.conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def precheck(argv: list) -> None:
    """Unknown config-group options end in one line listing the known ones (Hydra's own message
    runs to a dozen lines and a search-path dump)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key in GROUPS:
            known = _options(key)
            for v in value.split(","):
                if v and v not in known:
                    sys.stderr.write(f"cl-run: error: unknown {key} {v!r}; available: {', '.join(known)}\n")
                    sys.exit(2)
                missing = missing_plugin(key, v)
                if missing:
                    sys.stderr.write(f"cl-run: error: {missing}\n")
                    sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://cl_runner.conf", config_name="config")
def _hydra_app(cfg: DictConfig) -> float:
    pin_threads(cfg)  # parallel jobs split the cores: OMP/MKL threads must be set before torch loads
    done = finished_before(cfg)
    if done is not None:  # a relaunched sweep skips finished jobs before paying for torch and MLflow
        return done
    from .train import run  # torch is imported here, after Hydra has parsed the command line

    try:
        return run(cfg)
    except UserError as e:
        sys.stderr.write(f"cl-run: error: {e}\n")
        if is_multirun() and isinstance(e, (CapacityError, ConfigError, TrainingError)):
            if sampling_sweeper():
                # a search sweeper (Optuna) drew a config that cannot run (sel > layer width) or ran out of
                # capacity: the trial fails and the study goes on (the sweeper catches the job's exception;
                # a NaN return would crash optuna's tell)
                raise TrialFailed(str(e)) from None
            if isinstance(e, (CapacityError, TrainingError)):
                # a job that ran out of capacity or diverged is an outcome (results.json keeps its rows,
                # status "failed"), not a mistake in the sweep: the other jobs go on. A config error in a
                # grid sweep is the user's and stops the sweep.
                return float("nan")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # results.json already holds every finished task (status "failed")
        sys.stderr.write("cl-run: interrupted; the tasks finished so far are in the run folder's results.json\n")
        sys.exit(130)


class TrialFailed(Exception):
    """A sweeper-drawn job that cannot finish; its one line is already printed, the sweeper marks it failed."""


def finished_before(cfg: DictConfig) -> float | None:
    """In a multirun with skip_finished: the final accuracy of a finished run with this job's config
    (results.json under paths.outputs, else the MLflow experiment), or None to run the job."""
    if not cfg.skip_finished or cfg.resume not in (False, None) or not is_multirun():
        return None
    from .checkpoint import find_finished
    from .identity import config_hash

    try:
        h = config_hash(cfg)
    except Exception:  # noqa: BLE001 - a config that does not resolve: the run reports it properly
        return None
    found = find_finished(Path(cfg.paths.outputs), h)
    if found is None and cfg.tracking == "mlflow":
        found = _finished_in_mlflow(cfg, h)
    if found is None:
        return None
    log.info("skipped: this config (hash %s) already finished in %s (skip_finished=false runs it again)",
             h, found.get("run_dir"))
    from hydra.core.hydra_config import HydraConfig

    from .sweep_summary import record_skip

    hc = HydraConfig.get()  # the sweep's parent run reports the run that stands for this job
    try:
        record_skip(Path(hc.runtime.output_dir), Path(hc.sweep.dir), h, found)
    except (OSError, ValueError) as e:  # the parent then lacks this job; the sweep itself is unharmed
        log.warning("could not note the skipped job for the sweep's parent run: %s", e)
    return found.get("metrics", {}).get("final/avg_acc", float("nan"))


def _finished_in_mlflow(cfg: DictConfig, h: str) -> dict | None:
    from .tracking import mlflow_store

    try:
        uri = mlflow_store.tracking_uri(cfg.mlflow.uri, cfg.paths.outputs)
        mlflow_store.check_usable(uri, cfg.mlflow.connect_timeout_s)
        client = mlflow_store.client(uri)
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], f"tags.config_hash = '{h}' and attributes.status = 'FINISHED'", max_results=1)
    except Exception:  # noqa: BLE001 - no answer is no evidence: the job runs (and reports the server)
        return None
    if not runs:
        return None
    r = runs[0]
    return {"run_dir": f"MLflow run {r.info.run_id}", "mlflow_run_id": r.info.run_id, "metrics": r.data.metrics}


def main() -> None:
    precheck(sys.argv[1:])
    # OpenMP threads that spin while waiting collapse when another process shares the cores (measured
    # here on 2 cores: 0.5 s -> 16 s per epoch); passive waiting costs little when the machine is idle.
    # Set before torch loads (it is imported by the job), so sweep workers inherit it too.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _errors_in_one_line()
    _hydra_app()


def _errors_in_one_line() -> None:
    """Hydra reports a config it cannot compose (`method.nonexistent=1` without `+`) in several lines and exit
    1, and a launcher's failure (a cluster down, a job it killed) in a traceback, from inside its own runner
    (hydra._internal.utils.run_and_report, which `hydra.main` looks up when it runs). Wrap that runner so these
    errors end as ours do: one line, exit 2 (1 for a job that did not finish). A sweep that stops early, for
    these or any reason, closes its parent MLflow run as FAILED (KILLED on Ctrl-C or a killed job)."""
    from hydra._internal import utils as hydra_utils
    from hydra.errors import ConfigCompositionException

    from .errors import ClusterError
    from .sweep import abort_sweep

    report = hydra_utils.run_and_report
    if getattr(report, "cl_runner_wrapped", False):
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except ConfigCompositionException as e:
                sys.stderr.write(f"cl-run: error: {composition_error(e)}\n")
                sys.exit(2)
            except ClusterError as e:
                closed = abort_sweep(e.status, str(e))
                sys.stderr.write(f"cl-run: error: {e}{f' ({closed})' if closed else ''}\n")
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                abort_sweep("KILLED", "interrupted (Ctrl-C)")
                raise
            except SystemExit as e:  # a job in this process stopped the sweep (its line is printed already)
                if e.code not in (0, None):
                    abort_sweep("KILLED" if e.code == 130 else "FAILED", f"stopped: exit code {e.code}")
                raise

        return report(guarded)

    run_and_report.cl_runner_wrapped = True
    hydra_utils.run_and_report = run_and_report


def composition_error(e: Exception) -> str:
    """One line for Hydra's composition error: an unknown key names the keys its section knows."""
    cause = e.__cause__
    node = getattr(cause, "parent_node", None)
    if "Could not override" in str(e) and isinstance(node, DictConfig) and getattr(cause, "full_key", None):
        section = node._get_full_key(None)
        known = ", ".join(k for k in node.keys() if k != "hydra")
        of = f" of {section}" + (f" {node.name}" if section == "method" and "name" in node else "") if section else ""
        return f"{cause.full_key} is not a known key{of} (known keys: {known}); a new key needs +{cause.full_key}=..."
    return " ".join(str(e).split("\n")[:1]) + (f" ({str(cause).splitlines()[0]})" if cause is not None else "")


class FolderCheck(Callback):
    """Before Hydra makes the run or sweep folder and writes its .hydra/ files there: a folder that cannot be
    written ends in one line and exit 2 (Hydra would stop in a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, folder: str, key: str) -> None:
        from .tracking.results import make_folder

        try:
            make_folder(Path(config.paths.outputs), "paths.outputs")
            make_folder(Path(folder), f"the {'sweep' if 'sweep' in key else 'run'} folder ({key})",
                        f"point {key} (or paths.outputs) at a writable folder")
        except UserError as e:
            sys.stderr.write(f"cl-run: error: {e}\n")
            sys.exit(e.exit_code)
