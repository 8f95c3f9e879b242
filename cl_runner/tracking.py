"""Results that survive a crash: `results.json` in the run folder, and MLflow on top of it.

`results.json` (layout below, `SCHEMA_VERSION`) is rewritten atomically after every task, whatever the
tracking backend, so a dead tracking server or a killed run loses nothing already finished.
`tracking=local` uses it alone and never imports MLflow. `tracking=mlflow` also logs to MLflow: the
server is checked before training with a short connect (MLflow's own retries would hang for minutes),
and if it goes away mid-run the run goes on with the results file only.

results.json (schema_version 1): status (running|finished|failed), config (resolved), config_hash,
choices (config-group names), overrides, run_dir, mlflow_run_id, tasks_done, n_tasks, acc and acc_til
(matrices, null = not evaluated), metrics (final values, MLflow names), capacity (one entry per task),
timings {total_s, task_s: [...], start_unix}, threads (torch's, in this job), started / updated (ISO times),
error (message when failed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf

from .errors import TrackingError
from .launch import torch_threads

SCHEMA_VERSION = 1
log = logging.getLogger("cl_runner")
# keys that do not change what a run computes (ignored by the config hash used for resume/skip)
HASH_IGNORED = ("resume", "skip_finished", "checkpoint", "hardware", "tracking", "progress", "launcher", "paths",
                "mlflow")


def config_hash(cfg) -> str:
    """Hash of the composed config (as Hydra made it, before validation) without the HASH_IGNORED keys."""
    c = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in HASH_IGNORED}
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _clean(x):
    """NaN -> None (JSON null), recursively."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1))
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=2, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class LocalTracker:
    """Keeps `results.json` in the run folder up to date."""

    def __init__(self, cfg, run_dir: Path, info: dict):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "results.json"
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if info.get("resume"):  # continuing this folder's run: keep its record, the checkpoint sets the rows
            self.state = json.loads(self.path.read_text())
            self.state.update(status="running", error=None)
            self.state.setdefault("resumed", []).append(now)
            self.mlflow_run_id = self.state.get("mlflow_run_id")
            return
        self.state = {
            "schema_version": SCHEMA_VERSION, "status": "running",
            "config": OmegaConf.to_container(cfg, resolve=True), "config_hash": info.get("config_hash") or config_hash(cfg),
            "choices": info.get("choices", {}), "overrides": info.get("overrides", []),
            "run_dir": str(self.run_dir), "mlflow_run_id": None, "tasks_done": 0, "n_tasks": None,
            "acc": [], "acc_til": [], "metrics": {}, "capacity": [], "timings": {"task_s": [], "start_unix": time.time()},
            "started": now, "updated": now, "error": None, "git_commit": git_commit(), "threads": torch_threads(),
        }
        self.mlflow_run_id = None

    def start(self) -> None:
        self._save()

    def restore(self, acc: list, acc_til: list, capacity: list, task_s: list) -> None:
        """Resume: the rows, capacity snapshots and timings as of the checkpoint."""
        s = self.state
        s["acc"], s["acc_til"], s["capacity"], s["timings"]["task_s"] = acc, acc_til, capacity, list(task_s)
        s["tasks_done"] = len(task_s)
        self._save()

    def _save(self) -> None:
        self.state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(self.path, self.state)

    def log_task(self, i: int, acc: list, acc_til: list, capacity: dict | None, task_s: float,
                 extra: dict) -> dict:
        """Record row i; returns the metrics of this step (MLflow names)."""
        s = self.state
        s["acc"], s["acc_til"], s["tasks_done"], s["n_tasks"] = acc, acc_til, i + 1, len(acc[0])
        s["timings"]["task_s"].append(task_s)
        if capacity is not None:
            s["capacity"].append(capacity)
        row, row_til = acc[i], acc_til[i]
        step = {f"acc/task_{j}": v for j, v in enumerate(row) if not math.isnan(v)}
        step.update({f"acc_til/task_{j}": v for j, v in enumerate(row_til) if not math.isnan(v)})
        seen = [v for v in row if not math.isnan(v)]
        seen_til = [v for v in row_til if not math.isnan(v)]
        step["acc/avg"], step["acc_til/avg"] = sum(seen) / len(seen), sum(seen_til) / len(seen_til)
        for layer, q in (capacity or {}).items():
            step.update({f"capacity/{layer}/{name}": float(v) for name, v in q.items()})
        step.update(extra)
        self._save()
        return step

    def finish(self, metrics: dict, artifacts: dict, status: str = "finished", error: str | None = None) -> None:
        self.state["metrics"].update(metrics)
        self.state["timings"]["total_s"] = metrics.get("time/total_s")
        self.state["status"], self.state["error"] = status, error
        self._save()


class MlflowTracker(LocalTracker):
    """LocalTracker + the same figures in MLflow (params, tags, per-task metrics, artifacts)."""

    def __init__(self, cfg, run_dir: Path, info: dict):
        super().__init__(cfg, run_dir, info)
        self.info, self.broken = info, False
        self.uri = tracking_uri(cfg)
        check_reachable(self.uri, cfg.mlflow.connect_timeout_s)  # now, before any data is loaded

    def start(self) -> None:
        cfg, info = self.cfg, self.info
        self.client = mlflow_client(self.uri)  # MLflow's import costs seconds: only once data loaded
        exp_id = ensure_experiment(self.client, cfg.mlflow.experiment, self.uri, Path(cfg.paths.outputs))
        tags = {"method": info["choices"].get("method", cfg.method.name), "method_class": cfg.method.name,
                "dataset": info["choices"].get("dataset", cfg.dataset.name), "model": cfg.model.name,
                "seed": str(cfg.seed), "git_commit": git_commit(), "run_dir": str(self.run_dir),
                "config_hash": self.state["config_hash"], "overrides": " ".join(info.get("overrides", []))}
        parent = info.get("parent_run_id")
        if parent:
            tags["mlflow.parentRunId"] = parent
        name = f"{tags['method']}-{tags['dataset']}-s{cfg.seed}"
        if self.mlflow_run_id and self._reopen():  # resume: the same MLflow run goes on
            return super().start()
        try:
            run = self.client.create_run(exp_id, tags=tags, run_name=name)
        except Exception as e:  # noqa: BLE001 - any failure here is the server's
            raise TrackingError(f"MLflow at {self.uri} refused the run: {_short(e)}") from None
        self.mlflow_run_id = self.state["mlflow_run_id"] = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(self.state["config"]).items()]
        self._call(lambda: [self.client.log_batch(self.mlflow_run_id, params=params[i:i + 100])
                            for i in range(0, len(params), 100)])
        super().start()

    def _reopen(self) -> bool:
        try:
            run = self.client.get_run(self.mlflow_run_id)
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - e.g. another tracking server: a new run takes over
            log.warning("resume: MLflow run %s cannot be continued here (%s); logging to a new run",
                        self.mlflow_run_id, _short(e))
            return False
        # a kill between a task's results.json and its MLflow batch left that step out of MLflow: send the
        # restored tasks' values MLflow lacks (the rows restore() set; no final metrics: the run goes on)
        from .sync import missing_metrics

        def backfill() -> None:
            ms = missing_metrics(self.client, run, {**self.state, "metrics": {}})
            for i in range(0, len(ms), 1000):
                self.client.log_batch(self.mlflow_run_id, metrics=ms[i:i + 1000])
            if ms:
                log.info("resume: sent %d metric values of the finished tasks that MLflow run %s lacked",
                         len(ms), self.mlflow_run_id)

        self._call(backfill)
        return True

    def _call(self, fn) -> None:
        """Run an MLflow call; on failure warn once and carry on with results.json only."""
        if self.broken:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.broken = True
            self.state["mlflow_error"] = _short(e)
            log.warning("MLflow stopped answering (%s); the run goes on and results.json keeps "
                        "everything (%s)", _short(e), self.path)

    def log_task(self, i, acc, acc_til, capacity, task_s, extra) -> dict:
        step = super().log_task(i, acc, acc_til, capacity, task_s, extra)
        self._log_metrics(step, i + 1)
        return step

    def _log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        self._call(lambda: [self.client.log_batch(self.mlflow_run_id, metrics=ms[i:i + 1000])
                            for i in range(0, len(ms), 1000)])

    def finish(self, metrics, artifacts, status="finished", error=None) -> None:
        super().finish(metrics, artifacts, status, error)
        if self.mlflow_run_id is None:
            return
        # per-task times and capacity already went out with their step; the rest are end-of-run figures
        final = {k: v for k, v in metrics.items() if not k.startswith(("time/task_", "capacity/"))}
        self._log_metrics(final, self.state["tasks_done"])
        for sub, folder in artifacts.items():
            self._call(lambda f=folder, s=sub: self.client.log_artifacts(self.mlflow_run_id, str(f), s or None))
        self._call(lambda: self.client.log_artifact(self.mlflow_run_id, str(self.path)))
        self._call(lambda: self.client.set_terminated(self.mlflow_run_id, "FINISHED" if status == "finished" else "FAILED"))
        if self.broken:  # keep the reason in the results file too
            self._save()


# ------------------------------------------------------------------------------------- helpers
def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def tracking_uri(cfg) -> str:
    if cfg.mlflow.uri:
        return cfg.mlflow.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.paths.outputs).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float) -> None:
    """Fail fast, in one line, when an http(s) tracking server does not accept connections."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({e.strerror or e}); start it, "
                            "point MLFLOW_TRACKING_URI elsewhere, or run with tracking=local") from None


def mlflow_client(uri: str):
    # bound MLflow's HTTP retries (its defaults back off for minutes on a dead server)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) are noise on stderr
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, uri: str, outputs: Path) -> str:
    """Get or create the experiment; local backends keep artifacts in <outputs>/mlartifacts."""
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if urlparse(uri).scheme not in ("http", "https"):
            location = (outputs.resolve() / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created meanwhile by a parallel job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"MLflow at {uri} is not usable: {_short(e)}") from None
