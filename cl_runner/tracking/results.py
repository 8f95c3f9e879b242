"""results.json: a run's record in its folder, rewritten atomically after every task whatever the tracking
backend, so a dead tracking server or a killed run loses nothing already finished.

Schema version 1 (fields added later are optional for readers):
  schema_version, status         1; running | finished | failed
  config, config_hash            resolved config; identity.config_hash of the composed config
  choices, overrides             Hydra group choices (method: static_sparse, ...) and command-line overrides
  run_dir, mlflow_run_id         where the run lives
  tasks_done, n_tasks            progress
  acc, acc_til                   class-IL / task-IL matrices R[i][j], null = task j not seen after task i
  metrics                        final figures under their MLflow names (names.py)
  capacity                       per task: {layer: {quantity: value}} (methods that allocate capacity)
  method_metrics                 per task: {name: value}, what the method's fit_task returned (method/<name>)
  timings                        total_s, task_s (list), start_unix
  threads                        torch's intra-op threads in this job
  started, updated               ISO times
  error, mlflow_error            failure message; why MLflow stopped being used, if it did
  nonfinite_loss                 null, or where the training loss first became NaN/inf ("task 2, epoch 1")
  resumed, mlflow_synced         times the run was resumed; the last `cl-report --sync` (uri, run_id, time)
  git_commit, entry_point, user  the code's commit; what started the run (cl-run, a script); who ran it
  run_name                       the MLflow run's name (mlflow_store.run_name: a sweep job's swept values first)
  dataset                        name, digest, source, profile (the task split), schema: the MLflow dataset input
"""
from __future__ import annotations

import getpass
import json
import math
import os
import time
from datetime import datetime, timezone
from glob import glob
from pathlib import Path

from ..errors import UserError

SCHEMA_VERSION = 1
FILE = "results.json"


class ResultsError(UserError):
    """A results.json that cannot be read as a run's record (one line naming the file)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def current_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return None


def new_record(config: dict, config_hash: str, choices: dict, overrides: list, run_dir: Path,
               git_commit: str, entry_point: str | None = None) -> dict:
    """A new run's results.json, before its first task."""
    now = now_iso()
    return {"schema_version": SCHEMA_VERSION, "status": "running", "config": config, "config_hash": config_hash,
            "choices": choices, "overrides": overrides, "run_dir": str(run_dir), "mlflow_run_id": None,
            "tasks_done": 0, "n_tasks": None, "acc": [], "acc_til": [], "metrics": {}, "capacity": [],
            "method_metrics": [], "timings": {"task_s": [], "start_unix": time.time()}, "threads": None,
            "started": now, "updated": now, "error": None, "nonfinite_loss": None, "git_commit": git_commit,
            "entry_point": entry_point, "user": current_user(), "run_name": None, "dataset": None}


def _nan_to_null(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, list):
        return [_nan_to_null(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan_to_null(v) for k, v in x.items()}
    return x


def write_json_atomic(path: Path, data) -> None:
    """NaN is written as null (JSON has no NaN). Readers see the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_nan_to_null(data), indent=1))
    os.replace(tmp, path)


def read_results(path: Path) -> dict:
    """A run's record; ResultsError (one line) when the file is unreadable, not JSON or not a run's."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ResultsError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ResultsError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ResultsError(f"{path} is not a cl_runner results file (no config)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(f"{path}: schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return data


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"method.lr": "0.01", ...}, values as str() like MLflow params."""
    out = {}
    for k, v in config.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)})
    return out


# ----------------------------------------------------------------------------- finding run folders
NOT_RUNS = {"artifacts", "server", "cache", "mlartifacts"}


def _under(folder: Path) -> list[Path]:
    """Every run's results.json below `folder`. A run's `artifacts/` folder, MLflow's artifact store (whose
    copies of results.json sit in <run>/artifacts/: counted beside their run folders they would double every
    seed), hidden folders (.hydra, .submitit) and what `outputs/` holds beside runs (the tracking server's
    database cluster, the data cache, MLflow's artifact store) hold no run and are not entered."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in NOT_RUNS and not d.startswith("."))
        if FILE in files:
            found.append(Path(root) / FILE)
    return found


def run_files(paths: list[str]) -> list[Path]:
    """results.json files: those named, the runs' ones in the folders named, and quoted patterns the shell
    did not expand. A name that matches nothing is a UserError."""
    files = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += _under(path)
        elif path.is_file():
            files.append(path)
        elif any(c in p for c in "*?["):
            for f in map(Path, sorted(glob(p, recursive=True))):
                files += _under(f) if f.is_dir() else [f] if f.name == FILE and f.parent.name != "artifacts" else []
        else:
            raise UserError(f"no such file or folder: {p}")
    return list(dict.fromkeys(files))


def runs_with_hash(outputs: Path, config_hash: str) -> list[tuple[Path, dict]]:
    """(results.json, its record) of the runs under `outputs` with this config hash, newest first. Every job
    of a sweep looks before it starts, so a file is parsed only when its text holds the hash (2000 runs of
    10 KB: 0.06 s, against 0.9 s parsing every file; BENCHMARKS.md). Unreadable files are not runs here."""
    found = []
    for p in _under(Path(outputs)) if Path(outputs).is_dir() else []:
        try:
            text = p.read_text()
            if config_hash in text:
                r = json.loads(text)
                if isinstance(r, dict) and r.get("config_hash") == config_hash:
                    found.append((p.stat().st_mtime, p, r))
        except (OSError, ValueError):  # a half-written or foreign file is not a run
            continue
    return [(p, r) for _, p, r in sorted(found, key=lambda f: f[0], reverse=True)]


def make_folder(path: Path, what: str, hint: str = "point paths.outputs (or $CL_RUNNER_OUTPUTS) at a writable folder") -> None:
    """Create `path` (and its parents) or stop in one UserError line (Hydra and the trackers would fail later,
    in a traceback)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UserError(f"{what} {path} cannot be written ({e.strerror or e}); {hint}") from None
