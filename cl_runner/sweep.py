"""A sweep's parent MLflow run, made and closed by a Hydra callback (conf/config.yaml: hydra.callbacks).

Before any job starts: the database, the experiment and the parent run, named after what the sweep varies
(`spacenet split_mnist: method.sel x seed`), with the swept keys and their values as params; its id and the
swept keys go to `<sweep dir>/mlflow_parent.json` for the jobs (which may run in other processes; a job's run
name starts with its swept values). When the sweep ends the parent gets the sweep's result (sweep_summary.py)
and `cl-run` prints one line with the parent's address in the MLflow UI.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("cl_runner")
NAMED = ("method", "dataset")  # named in the parent's name; swept, their values are
_active = None  # the SweepCallback of the sweep under way, for abort_sweep


def swept(config: DictConfig) -> dict[str, str]:
    """The keys a sweep varies -> their values as given: the command line's sweep overrides (seed=0,1,
    method.sel=range(10,40,10)), then a sweep preset's or a search sweeper's hydra.sweeper.params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = {}
    for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if o.is_sweep_override():
            out[o.key_or_group] = o.input_line.split("=", 1)[1]
    for k, v in (config.hydra.sweeper.get("params") or {}).items():
        out.setdefault(str(k), str(v))
    return out


def parent_name(config: DictConfig, keys: dict[str, str]) -> str:
    """`<method> <dataset>: <swept key> x <swept key>`; a swept method or dataset shows its values."""
    choices = config.hydra.runtime.choices
    what = [keys.get(k) or choices.get(k) or str(config[k].name) for k in NAMED]
    rest = [k for k in keys if k not in NAMED]
    return f"{' '.join(what)}: {' x '.join(rest) if rest else 'sweep'}"


class SweepCallback(Callback):
    """Before a multirun's jobs start: the MLflow database, experiment and parent run; after: its result."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _active
        _active = self
        self._guard_empty_study(config)
        from .clusters import install

        install(config)  # launcher=ray|slurm: probe the cluster, hand the jobs the driver's settings
        if config.tracking != "mlflow":
            return
        from .errors import TrackingError
        from .tracking import mlflow_store
        from .tracking.results import current_user

        keys = swept(config)
        try:
            uri = mlflow_store.tracking_uri(config.mlflow.uri, config.paths.outputs)
            mlflow_store.check_usable(uri, config.mlflow.connect_timeout_s)
            client = mlflow_store.client(uri)
            exp_id = mlflow_store.ensure_experiment(client, config.mlflow.experiment, uri, Path(config.paths.outputs))
            sweep_dir = Path(config.hydra.sweep.dir)
            overrides = " ".join(config.hydra.overrides.task)
            tags = {"cl_runner.sweep_parent": "true", "sweep_dir": str(sweep_dir), "overrides": overrides,
                    "git_commit": mlflow_store.git_commit(),
                    **mlflow_store.source_tags("cl-run -m", mlflow_store.git_commit(), current_user())}
            tags.update({k: str(config.hydra.runtime.choices.get(k)) for k in NAMED if k not in keys})
            run = client.create_run(exp_id, run_name=parent_name(config, keys), tags=tags)
            mlflow_store.log_batches(client, run.info.run_id, params_=_params(keys))
        except TrackingError as e:
            sys.stderr.write(f"cl-run: error: {e}\n")
            sys.exit(e.exit_code)
        except Exception as e:  # noqa: BLE001 - the store answered, but refused the parent run
            sys.stderr.write(f"cl-run: error: MLflow at {uri} refused the sweep's parent run: {mlflow_store.short(e)}\n")
            sys.exit(2)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "mlflow_parent.json").write_text(json.dumps({"run_id": run.info.run_id, "uri": uri,
                                                                  "swept": list(keys)}))
        self.client, self.run_id, self.exp_id, self.uri = client, run.info.run_id, exp_id, uri
        self.sweep_dir, self.keys, self.command = sweep_dir, list(keys), f"cl-run -m {overrides}"
        log.info("sweep parent MLflow run %r (%s, experiment %s)", run.info.run_name, self.run_id,
                 config.mlflow.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        jobs = self._log_report()
        self._close("FINISHED", keep=jobs != 0)
        if jobs and getattr(self, "run_id", None):
            from .tracking import ui

            what = f"sweep parent, {jobs} jobs" if jobs > 0 else "sweep parent"
            print(ui.ui_line(self.uri, self.exp_id, self.run_id, what=what), flush=True)

    def _log_report(self) -> int:
        """The sweep's result on the parent (sweep_summary.finish_parent); the number of jobs it stands for.
        A failure there is one warning line: the jobs' own runs and results.json stand."""
        if not getattr(self, "run_id", None):
            return 0
        try:
            from .sweep_summary import finish_parent

            return finish_parent(self.client, self.uri, self.run_id, self.exp_id, self.sweep_dir, self.keys,
                                 self.command)
        except Exception as e:  # noqa: BLE001 - a missing figure must not fail a sweep whose jobs are done
            log.warning("could not add the sweep's table, figure and means to its parent run %s: %s", self.run_id,
                        " ".join(str(e).split())[:300] or type(e).__name__)
            return -1  # unknown: the parent is kept

    def _close(self, status: str, keep: bool = False, quiet: bool = False) -> bool:
        """End the parent run (once); one that stands for no job (every job stopped before its run began) is
        deleted, as it would only clutter the UI. Returns whether it was deleted."""
        if not getattr(self, "run_id", None) or getattr(self, "closed", False):
            return False
        self.closed = True
        try:
            children = self.client.search_runs([self.exp_id], f"tags.mlflow.parentRunId = '{self.run_id}'",
                                               max_results=1)
            self.client.set_terminated(self.run_id, status)
            if not children and not keep:
                self.client.delete_run(self.run_id)
                if not quiet:
                    log.info("no job ran, so the sweep parent MLflow run %s was deleted", self.run_id)
                return True
        except Exception as e:  # noqa: BLE001 - the jobs' results are safe in their results.json
            log.warning("could not close the sweep parent run: %s", e)
        return False

    def _guard_empty_study(self, config: DictConfig) -> None:
        """Optuna: when every trial failed (each already said why in one line), the plugin's `best_trial`
        raises "No trials are completed yet" with a traceback. Say it in one line instead, close the sweep
        parent as FAILED (deleted when no job got a run) and exit 1; the failed jobs' results.json stay."""
        if "optuna" not in str(config.hydra.sweeper.get("_target_", "")):
            return
        from hydra_plugins.hydra_optuna_sweeper import _impl

        impl = _impl.OptunaSweeperImpl
        sweep = getattr(impl.sweep, "__wrapped__", impl.sweep)  # one wrapper, however many sweeps run

        @functools.wraps(sweep)
        def guarded(sweeper, arguments):
            try:
                return sweep(sweeper, arguments)
            except ValueError as e:
                if "No trials are completed" not in str(e):
                    raise
                self._close("FAILED")
                sys.stderr.write(f"cl-run: error: no Optuna trial finished ({sweeper.n_trials} drawn, each failed as "
                                 "said above), so there is no best value; widen the search space or fix the config\n")
                sys.exit(1)

        impl.sweep = guarded


def abort_sweep(status: str, reason: str) -> str:
    """The sweep stopped early (a launcher or cluster error, a killed job, Ctrl-C, a job's exit): end its parent
    run as `status` (FAILED or KILLED) with the reason as a tag, rather than leave it RUNNING (deleted, as
    at a normal end, when no job got a run). Returns what became of it, for the error line ("" if nothing:
    tracking=local, no sweep, already closed)."""
    cb = _active
    if cb is None or not getattr(cb, "run_id", None) or getattr(cb, "closed", False):
        return ""
    try:
        cb.client.set_tag(cb.run_id, "cl_runner.error", reason[:5000])
    except Exception:  # noqa: BLE001 - the status matters more than the tag
        pass
    deleted = cb._close(status, quiet=True)
    return f"sweep parent run {cb.run_id} closed as {status}" + (" and deleted (no job ran)" if deleted else "")


def _params(keys: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in keys.items()]
