"""Where a run is seen in the MLflow UI: the one line `cl-run` prints at the end of a run (a sweep: of its
parent run), with the run's address and, for a local database, the command that starts the UI.

The address opens the run in MLflow 3's "Model training" view: the UI starts in its GenAI view unless the
page's query says `workflowType=machine_learning` (MLflow 3.17's sidebar toggle reads that parameter
first, then the browser's last choice; the experiment tag `mlflow.experimentKind` no longer decides it).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from urllib.parse import urlparse

# what `make ui` serves (the Makefile's PORT) and what `mlflow ui` serves by default
LOCAL_UI = "http://127.0.0.1:5000"
MODEL_TRAINING = "workflowType=machine_learning"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page under a UI at `base` (http://host:port, with any path prefix a proxy adds)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"


def _make_ui_serves(db: Path, cwd: Path) -> bool:
    """Whether `make ui` in `cwd` serves the database `db`: this repository's Makefile serves
    $CL_RUNNER_OUTPUTS/mlflow.db, else outputs/mlflow.db, as cl-run writes them by default."""
    makefile = cwd / "Makefile"
    if not makefile.is_file() or "\nui:" not in makefile.read_text(errors="replace"):
        return False
    outputs = Path(os.environ.get("CL_RUNNER_OUTPUTS") or "outputs")
    return (cwd / outputs).resolve() / "mlflow.db" == db.resolve()


def ui_line(uri: str, experiment_id: str, run_id: str, what: str = "run", cwd: Path | None = None) -> str:
    """One line: `MLflow UI (<what>): <address>` and how to start that UI when the store is a file here."""
    u = urlparse(uri)
    if u.scheme in ("http", "https"):
        return f"MLflow UI ({what}): {run_url(uri, experiment_id, run_id)}"
    if u.scheme == "sqlite":
        cwd = Path.cwd() if cwd is None else cwd
        db = Path(uri[len("sqlite:///"):].split("?")[0])
        start = "make ui" if _make_ui_serves(db, cwd) else f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
        return f"MLflow UI ({what}): {run_url(LOCAL_UI, experiment_id, run_id)}  (start the UI with: {start})"
    return f"MLflow {what} {run_id} (experiment {experiment_id}) in {uri}: mlflow ui --backend-store-uri {uri}"
