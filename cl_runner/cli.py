"""Entry points: `cl-run` (Hydra app) and the sweep callback that makes one parent MLflow run per sweep."""
from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .errors import UserError

log = logging.getLogger("cl_runner")
GROUPS = ("method", "dataset", "model", "hardware", "experiment")


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


@hydra.main(version_base="1.3", config_path="pkg://cl_runner.conf", config_name="config")
def _hydra_app(cfg: DictConfig) -> float:
    from .train import run  # torch is imported here, after Hydra has parsed the command line

    try:
        return run(cfg)
    except UserError as e:
        sys.stderr.write(f"cl-run: error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # results.json already holds every finished task (status "failed")
        sys.stderr.write("cl-run: interrupted; the tasks finished so far are in the run folder's results.json\n")
        sys.exit(130)


def main() -> None:
    precheck(sys.argv[1:])
    # OpenMP threads that spin while waiting collapse when another process shares the cores (measured
    # here on 2 cores: 0.5 s -> 16 s per epoch); passive waiting costs little when the machine is idle.
    # Set before torch loads (it is imported by the job), so sweep workers inherit it too.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _hydra_app()


class SweepCallback(Callback):
    """Before a multirun's jobs start: create the MLflow database, experiment and a parent run, and
    leave the parent's id in the sweep folder for the jobs (which may run in other processes)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.tracking != "mlflow":
            return
        from .errors import TrackingError
        from .tracking import check_reachable, ensure_experiment, git_commit, mlflow_client, tracking_uri

        try:
            uri = tracking_uri(config)
            check_reachable(uri, config.mlflow.connect_timeout_s)
            client = mlflow_client(uri)
            exp_id = ensure_experiment(client, config.mlflow.experiment, uri, Path(config.paths.outputs))
            sweep_dir = Path(config.hydra.sweep.dir)
            overrides = " ".join(config.hydra.overrides.task)
            run = client.create_run(exp_id, run_name=f"sweep {sweep_dir.name}", tags={
                "cl_runner.sweep_parent": "true", "sweep_dir": str(sweep_dir), "overrides": overrides,
                "git_commit": git_commit()})
        except TrackingError as e:
            sys.stderr.write(f"cl-run: error: {e}\n")
            sys.exit(e.exit_code)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "mlflow_parent.json").write_text(json.dumps({"run_id": run.info.run_id, "uri": uri}))
        self.client, self.run_id = client, run.info.run_id
        log.info("sweep parent MLflow run %s (experiment %s)", self.run_id, config.mlflow.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if getattr(self, "run_id", None):
            try:
                self.client.set_terminated(self.run_id, "FINISHED")
            except Exception as e:  # noqa: BLE001 - the jobs' results are safe in their results.json
                log.warning("could not close the sweep parent run: %s", e)
