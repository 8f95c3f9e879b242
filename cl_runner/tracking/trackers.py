"""The trackers the engine reports to: `LocalTracker` keeps results.json up to date; `MlflowTracker` also
logs the same figures to MLflow. results.json is written before MLflow hears of a task, so a tracking server
that dies mid-run costs nothing: the run goes on with the file, and `cl-report --sync` uploads it later.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ..errors import TrackingError
from . import mlflow_store, names, summary, ui
from .results import FILE, now_iso, read_results, write_json_atomic

log = logging.getLogger("cl_runner")


class LocalTracker:
    """Keeps `results.json` in the run folder up to date."""

    def __init__(self, run_dir: Path, record: dict | None):
        """`record`: a new run's results (results.new_record), or None to continue the run of this folder."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / FILE
        if record is None:  # resume: keep the folder's record; restore() sets the rows from the checkpoint
            record = read_results(self.path)
            record.update(status="running", error=None)
            record.setdefault("resumed", []).append(now_iso())
        self.state = record

    @property
    def mlflow_run_id(self) -> str | None:
        return self.state["mlflow_run_id"]

    def start(self, threads: int, dataset: dict | None = None) -> None:
        """`dataset`: what the run trains and tests on (data/describe.py), kept as results.json `dataset`."""
        self.state["threads"] = threads
        if dataset is not None:
            self.state["dataset"] = dataset
        self._save()

    def ui_line(self) -> str | None:
        """The line that says where the run is seen in a UI (None: results.json only)."""
        return None

    def restore(self, acc: list, acc_til: list, capacity: list, method_metrics: list, task_s: list) -> None:
        """Resume: the rows, capacity snapshots, method diagnostics and timings as of the checkpoint."""
        s = self.state  # copies: log_task appends to these lists, and the engine keeps its own
        s.update(acc=list(acc), acc_til=list(acc_til), capacity=list(capacity), method_metrics=list(method_metrics),
                 tasks_done=len(task_s))
        s["timings"]["task_s"] = list(task_s)
        self._save()

    def _save(self) -> None:
        self.state["updated"] = now_iso()
        write_json_atomic(self.path, self.state)

    def mark(self, field: str, value: str) -> None:
        """Something to know about the run that is not a number (e.g. nonfinite_loss: "task 2, epoch 1")."""
        self.state[field] = value
        self._save()

    def log_task(self, i: int, acc: list, acc_til: list, capacity: dict | None, method_metrics: dict,
                 task_s: float) -> dict:
        """Record row i (matrices so far), its capacity snapshot and the method's diagnostics; returns the
        metrics of this step (names.task_metrics)."""
        s = self.state
        s.update(acc=acc, acc_til=acc_til, tasks_done=i + 1, n_tasks=len(acc[0]))
        s["timings"]["task_s"].append(task_s)
        if capacity is not None:
            s["capacity"].append(capacity)
        s["method_metrics"].append(method_metrics)
        self._save()
        return names.task_metrics(acc[i], acc_til[i], capacity, method_metrics)

    def finish(self, metrics: dict, artifacts: dict, status: str = "finished", error: str | None = None) -> None:
        self.state["metrics"].update(metrics)
        self.state["timings"]["total_s"] = metrics.get(names.TOTAL_TIME)
        self.state["status"], self.state["error"] = status, error
        self._save()


class MlflowTracker(LocalTracker):
    """LocalTracker + the same figures in MLflow (params, tags, per-task metrics, artifacts)."""

    def __init__(self, run_dir: Path, record: dict | None, *, uri: str, experiment: str, outputs: Path,
                 connect_timeout_s: float, parent_run_id: str | None = None):
        # before any data is loaded: an unreachable server or an unusable store is reported first
        mlflow_store.check_usable(uri, connect_timeout_s)
        super().__init__(run_dir, record)
        self.uri, self.parent_run_id, self.broken = uri, parent_run_id, False
        self.client = mlflow_store.client(uri)
        self.exp_id = mlflow_store.ensure_experiment(self.client, experiment, uri, outputs)

    def start(self, threads: int, dataset: dict | None = None) -> None:
        self.state["threads"] = threads
        if dataset is not None:
            self.state["dataset"] = dataset
        if self.mlflow_run_id and self._reopen():  # resume: the same MLflow run goes on
            return super().start(threads, dataset)
        tags = mlflow_store.run_tags(self.state)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        try:
            run = self.client.create_run(self.exp_id, tags=tags,
                                         run_name=self.state.get("run_name") or mlflow_store.run_name(tags))
        except Exception as e:  # noqa: BLE001 - any failure here is the server's
            raise TrackingError(f"MLflow at {self.uri} refused the run: {mlflow_store.short(e)}") from None
        self.state["mlflow_run_id"] = run.info.run_id
        params = mlflow_store.params(self.state["config"])
        self._call(lambda: mlflow_store.log_batches(self.client, self.mlflow_run_id, params_=params))
        self._log_dataset()
        super().start(threads, dataset)

    def _log_dataset(self) -> None:
        if not self.state.get("dataset"):
            return
        inputs = [mlflow_store.dataset_input(self.state["dataset"])]

        def log() -> None:
            try:
                self.client.log_inputs(self.mlflow_run_id, datasets=inputs)
            except Exception as e:  # noqa: BLE001
                # parallel jobs of a sweep (Ray, SLURM, joblib) log the same dataset: MLflow's SQL store looks
                # it up, then inserts it, and the job that loses the race hits the UNIQUE constraint (seen on a
                # 2-job Ray sweep: that run was left RUNNING). The row exists now, so a second call links it.
                if not any(m in str(e) for m in ("IntegrityError", "UNIQUE constraint", "UniqueViolation")):
                    raise
                self.client.log_inputs(self.mlflow_run_id, datasets=inputs)

        self._call(log)

    def ui_line(self) -> str | None:
        return ui.ui_line(self.uri, self.exp_id, self.mlflow_run_id) if self.mlflow_run_id else None

    def _reopen(self) -> bool:
        try:
            run = self.client.get_run(self.mlflow_run_id)
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - e.g. another tracking server: a new run takes over
            log.warning("resume: MLflow run %s cannot be continued here (%s); logging to a new run",
                        self.mlflow_run_id, mlflow_store.short(e))
            return False
        # a kill between a task's results.json and its MLflow batch left that step out of MLflow: send the
        # restored tasks' values MLflow lacks (the rows restore() set; no final metrics: the run goes on)
        from .sync import missing_metrics

        def backfill() -> None:
            ms = missing_metrics(self.client, run, {**self.state, "metrics": {}})
            mlflow_store.log_batches(self.client, self.mlflow_run_id, metrics=ms)
            if ms:
                log.info("resume: sent %d metric values of the finished tasks that MLflow run %s lacked",
                         len(ms), self.mlflow_run_id)

        self._call(backfill)
        if not run.inputs.dataset_inputs:  # started before runs logged their dataset
            self._log_dataset()
        return True

    def _call(self, fn) -> None:
        """Run an MLflow call; on failure warn once and carry on with results.json only."""
        if self.broken:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.broken = True
            self.state["mlflow_error"] = mlflow_store.short(e)
            log.warning("MLflow stopped answering (%s); the run goes on and results.json keeps "
                        "everything (%s)", mlflow_store.short(e), self.path)

    def mark(self, field: str, value: str) -> None:
        super().mark(field, value)
        if self.mlflow_run_id:
            self._call(lambda: self.client.set_tag(self.mlflow_run_id, field, value))

    def log_task(self, i, acc, acc_til, capacity, method_metrics, task_s) -> dict:
        step = super().log_task(i, acc, acc_til, capacity, method_metrics, task_s)
        self._log_metrics(step, i + 1)
        return step

    def _log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        self._call(lambda: mlflow_store.log_batches(self.client, self.mlflow_run_id, metrics=ms))

    def finish(self, metrics, artifacts, status="finished", error=None) -> None:
        super().finish(metrics, artifacts, status, error)
        if self.mlflow_run_id is None:
            return
        self._log_metrics({k: v for k, v in metrics.items() if not names.is_per_task(k)}, self.state["tasks_done"])
        for sub, folder in artifacts.items():
            self._call(lambda f=folder, s=sub: self.client.log_artifacts(self.mlflow_run_id, str(f), s or None))
        self._call(lambda: self.client.log_artifact(self.mlflow_run_id, str(self.path)))
        self._call(lambda: self.client.set_tag(self.mlflow_run_id, summary.DESCRIPTION_TAG,
                                               summary.run_description(self.state)))
        self._call(lambda: self.client.set_terminated(self.mlflow_run_id, "FINISHED" if status == "finished" else "FAILED"))
        if self.broken:  # keep the reason in the results file too
            self._save()
