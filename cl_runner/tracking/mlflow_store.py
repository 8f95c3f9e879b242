"""MLflow plumbing, once: which tracking URI, whether it can be used (checked before any data is loaded),
the client, the experiment, and the tags and params a run gets (live or synced afterwards).

MLflow is imported only inside these functions: its import costs seconds, and `tracking=local` never pays it.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from ..errors import TrackingError
from .results import flat_config

log = logging.getLogger("cl_runner")


def short(e: BaseException) -> str:
    """An exception as one short line (MLflow's messages run to pages)."""
    text = (getattr(e, "message", None) or str(e)).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def tracking_uri(uri: str | None, outputs: Path | str) -> str:
    """The URI given (mlflow.uri, --tracking-uri), else $MLFLOW_TRACKING_URI, else <outputs>/mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(outputs).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> str:
    return uri[len("sqlite:///"):].split("?")[0]  # absolute paths keep their leading '/'


def check_usable(uri: str, timeout: float, must_exist: bool = False) -> None:
    """Fail fast, in one line: an http(s) server that does not accept a connection within `timeout` (MLflow's
    own retries would take minutes), a SQLite database whose folder is missing or read-only (MLflow would
    fail later with a traceback), or with `must_exist` (reading, not logging) a database that is not there
    (MLflow would create an empty one). Other schemes are checked by `client`."""
    u = urlparse(uri)
    if u.scheme in ("http", "https"):
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
            socket.create_connection((u.hostname, port), timeout=timeout).close()
        except (OSError, ValueError) as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({getattr(e, 'strerror', None) or e}); "
                                "start it, or point MLFLOW_TRACKING_URI elsewhere (cl-run: or tracking=local)") from None
    elif u.scheme == "sqlite":
        db = sqlite_path(uri)
        if not db or db == ":memory:":
            return
        if must_exist and not Path(db).is_file():
            raise TrackingError(f"no MLflow database at {db} (pass --tracking-uri, or results.json paths)")
        folder = Path(db).parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow database {uri}: no folder {folder} to hold it (create it, or point "
                                "MLFLOW_TRACKING_URI / mlflow.uri elsewhere)")
        if not os.access(folder, os.W_OK) and not must_exist:
            raise TrackingError(f"MLflow database {uri}: the folder {folder} is not writable")


def client(uri: str):
    """An MlflowClient for `uri`; a URI MLflow cannot use is a TrackingError (one line), not its traceback."""
    # bound MLflow's HTTP retries (its defaults back off for minutes on a dead server)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) are noise on stderr
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - an unknown scheme, a database that cannot be created, ...
        raise TrackingError(f"MLflow cannot use the tracking URI {uri}: {short(e)}") from None


def ensure_experiment(c, name: str, uri: str, outputs: Path) -> str:
    """Get or create the experiment; local backends keep artifacts in <outputs>/mlartifacts."""
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if urlparse(uri).scheme not in ("http", "https"):
            location = (Path(outputs).resolve() / "mlartifacts").as_uri()
        try:
            return c.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created meanwhile by a parallel job
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"MLflow at {uri} is not usable: {short(e)}") from None


def live_run(c, run_id: str | None):
    """The run with this id, or None when the store has no such run (another store's id) or it was deleted."""
    if not run_id:
        return None
    try:
        run = c.get_run(run_id)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST, whatever the backend raises
        return None
    return run if run.info.lifecycle_stage != "deleted" else None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=2, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(res: dict) -> dict[str, str]:
    """The tags of a run's MLflow record, from its results.json (the tracker and sync tag alike). `method` is
    the chosen config name, so variants (static_sparse) group apart from their class (method_class)."""
    cfg, choices = res["config"], res.get("choices") or {}
    tags = {"method": choices.get("method") or cfg["method"]["name"], "method_class": cfg["method"]["name"],
            "dataset": choices.get("dataset") or cfg["dataset"]["name"], "model": cfg["model"]["name"],
            "seed": str(cfg["seed"]), "git_commit": res.get("git_commit") or "unknown",
            "run_dir": str(res.get("run_dir")), "config_hash": str(res.get("config_hash")),
            "overrides": " ".join(res.get("overrides") or [])}
    if res.get("nonfinite_loss"):
        tags["nonfinite_loss"] = res["nonfinite_loss"]
    return {**tags, **source_tags(res.get("entry_point"), tags["git_commit"], res.get("user"))}


def source_tags(entry_point: str | None, commit: str, user: str | None) -> dict[str, str]:
    """MLflow's own tags for the UI's Source and "Created by" fields: the entry point (cl-run), its commit."""
    tags = {"mlflow.source.name": entry_point or "cl-run", "mlflow.source.type": "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if user:
        tags["mlflow.user"] = user
    return tags


def _short(key: str, value: str) -> str:
    """A swept override as a run name shows it: seed=1 -> s1, method=ewc -> ewc, method.sel=10 -> sel=10."""
    if key == "seed":
        return f"s{value}"
    if key in ("method", "dataset", "model"):
        return value
    return f"{key.split('.')[-1]}={value}"


def run_name(tags: dict, swept: list | tuple = ()) -> str:
    """Short enough for the UI's run list, what tells runs apart first: a sweep job's swept values (from its
    overrides), then the method and dataset not already named, e.g. `s1 · spacenet split_digits`,
    `sel=10 s0 · spacenet split_mnist`; a single run: `spacenet s0 · split_digits`."""
    job = dict(o.lstrip("+~").split("=", 1) for o in tags.get("overrides", "").split() if "=" in o)
    first = [_short(k, job[k]) for k in swept if k in job]
    if not first:
        return f"{tags['method']} s{tags['seed']} · {tags['dataset']}"
    rest = [tags[k] for k in ("method", "dataset") if k not in swept]
    return " ".join(first) + (" · " + " ".join(rest) if rest else "")


def dataset_input(info: dict):
    """A run's dataset record (data/describe.py; results.json `dataset`) as an MLflow DatasetInput."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=info["name"], digest=info["digest"], source_type="local",
                 source=json.dumps({"uri": info.get("source", "")}),
                 schema=json.dumps(info.get("schema") or {}), profile=json.dumps(info.get("profile") or {}))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train and test")])


def params(config: dict, have: dict | None = None) -> list:
    """The flattened config as mlflow Params (values cut to MLflow's 6000 characters), less those in `have`."""
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in flat_config(config).items() if k not in (have or {})]


def log_batches(c, run_id: str, metrics: list = (), params_: list = ()) -> None:
    """log_batch within MLflow's limits (1000 metrics, 100 params per call)."""
    for i in range(0, len(params_), 100):
        c.log_batch(run_id, params=params_[i:i + 100])
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000])
