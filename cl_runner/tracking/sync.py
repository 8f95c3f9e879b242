"""`cl-report --sync`: upload to MLflow what a run's `results.json` holds and the tracking store missed.

When the tracking server dies mid-run, the run goes on with `results.json` only (trackers.MlflowTracker);
`tracking=local` runs never reach MLflow at all. Syncing a run folder, with the server back up:

- its MLflow run (results.json's `mlflow_run_id`, an earlier sync's run, or a run tagged with this
  `run_dir`) gets only what it lacks: params, metric steps absent from the run's history, artifacts not
  yet listed, and the final status;
- a run with no MLflow run gets a new one, tagged as the tracker tags its runs (and as a child of the
  sweep's parent run when the sweep folder has one on this server);
- results.json records `mlflow_synced: {uri, run_id, time}`; syncing again changes nothing;
- a sweep's parent run left RUNNING (the server was down when the sweep ended) is closed once every job
  of that sweep folder has a finished or failed results.json.

The metrics are rebuilt from results.json with the function the tracker logs them with (names.task_metrics),
so a run tracked live and the same run synced afterwards hold the same (key, step, value) entries. Runs still
`running` are skipped (their tracker rewrites results.json), and so is a file that cannot be read, with a
warning: the other runs still sync.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from . import mlflow_store, names, summary
from .results import ResultsError, now_iso, read_results, run_files, write_json_atomic

MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED"}


def _ms(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


def expected_metrics(res: dict) -> dict[str, dict[int, tuple[float, int]]]:
    """{key: {step: (value, timestamp ms)}} that MlflowTracker logs for this results.json (as read from the
    file, or a tracker's state in memory)."""
    out: dict[str, dict[int, tuple[float, int]]] = {}

    def put(metrics: dict, step: int, ts: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v == v:  # null (a NaN in results.json) is never logged
                out.setdefault(k, {})[step] = (float(v), ts)

    task_s = res["timings"].get("task_s") or []
    capacity, method_metrics = res.get("capacity") or [], res.get("method_metrics") or []
    t = _ms(res.get("started")) or 0
    for i in range(res["tasks_done"]):  # LocalTracker.log_task: row i at step i + 1
        t += int(1000 * (task_s[i] if i < len(task_s) else 0))  # ~ when that task was logged
        cap = capacity[i] if len(capacity) == res["tasks_done"] else None
        diag = method_metrics[i] if len(method_metrics) == res["tasks_done"] else None
        put(names.task_metrics(res["acc"][i], res["acc_til"][i], cap, diag), i + 1, t)
    final = {k: v for k, v in (res.get("metrics") or {}).items() if not names.is_per_task(k)}  # MlflowTracker.finish
    put(final, res["tasks_done"], _ms(res.get("updated")) or t)
    return out


def missing_metrics(client, run, res: dict) -> list:
    """The metric values (mlflow Metric) results.json holds that the MLflow `run` lacks, by (key, step)."""
    from mlflow.entities import Metric

    metrics = []
    for key, by_step in expected_metrics(res).items():
        have = {m.step for m in client.get_metric_history(run.info.run_id, key)} if key in run.data.metrics else set()
        metrics += [Metric(key, v, ts, step) for step, (v, ts) in sorted(by_step.items()) if step not in have]
    return metrics


def _find_run(client, res: dict, uri: str, exp_id: str):
    synced = res.get("mlflow_synced") or {}
    for run_id in (synced.get("run_id") if synced.get("uri") == uri else None, res.get("mlflow_run_id")):
        run = mlflow_store.live_run(client, run_id)
        if run is not None:
            return run
    run_dir = str(res.get("run_dir") or "")
    if run_dir and "'" not in run_dir:  # created by a sync that stopped before it could write results.json
        found = client.search_runs([exp_id], f"tags.run_dir = '{run_dir}'", max_results=10)
        found = [r for r in found if r.data.tags.get("config_hash") == res.get("config_hash")]
        if found:
            return found[0]
    return None


def _create_run(client, res: dict, path: Path, exp_id: str):
    """A new MLflow run tagged as MlflowTracker.start tags one."""
    tags = {**mlflow_store.run_tags({**res, "run_dir": res.get("run_dir") or path.parent}), "cl_runner.synced": "true"}
    parent_file = _parent_file(path)
    if parent_file is not None:
        parent = json.loads(parent_file.read_text()).get("run_id")
        if mlflow_store.live_run(client, parent) is not None:
            tags["mlflow.parentRunId"] = parent
    return client.create_run(exp_id, start_time=_ms(res.get("started")), tags=tags,
                             run_name=res.get("run_name") or mlflow_store.run_name(tags))


def _parent_file(path: Path) -> Path | None:
    """The sweep's mlflow_parent.json above a job's results.json, if any: <sweep dir>/<job>/results.json,
    deeper when a job folder is named after an override holding '/'."""
    return next((f for f in (d / "mlflow_parent.json" for d in path.parents[1:4]) if f.is_file()), None)


def close_parent(client, parent_file: Path) -> str | None:
    """Close a sweep parent run still RUNNING once every job of its sweep folder is over (FINISHED, as
    cl-run's sweep callback closes it); a line saying so, or None when there is nothing to do."""
    run = mlflow_store.live_run(client, json.loads(parent_file.read_text()).get("run_id"))
    if run is None or run.info.status != "RUNNING":
        return None
    jobs = []
    for f in run_files([str(parent_file.parent)]):
        try:
            jobs.append(read_results(f))
        except ResultsError:  # already reported by the run's own sync; it says nothing of the sweep's end
            continue
    if not jobs or any(j.get("status") not in MLFLOW_STATUS for j in jobs):
        return None  # a job still runs (or never wrote results.json): the sweep may not be over
    end = max((_ms(j.get("updated")) or 0 for j in jobs), default=0) or None
    client.set_terminated(run.info.run_id, "FINISHED", end_time=end)
    return f"{parent_file.parent}: sweep parent run {run.info.run_id}: RUNNING -> FINISHED ({len(jobs)} jobs)"


def _remote_files(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _remote_files(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def sync_run(client, path: Path, uri: str, outputs: Path) -> tuple[str, str]:
    """Bring one run's MLflow record up to date with its results.json: (created|updated|up to date|skipped,
    one line saying what changed)."""
    res = read_results(path)
    where = res.get("run_dir") or str(path.parent)
    if res.get("status") not in MLFLOW_STATUS:
        return "skipped", f"{where}: skipped, status {res.get('status')!r} (a live run rewrites its results.json)"
    exp_id = mlflow_store.ensure_experiment(client, res["config"]["mlflow"]["experiment"], uri, outputs)
    run = _find_run(client, res, uri, exp_id)
    created = run is None
    if created:
        run = _create_run(client, res, path, exp_id)
    run_id = run.info.run_id

    params = mlflow_store.params(res["config"], have=run.data.params)
    metrics = missing_metrics(client, run, res)
    mlflow_store.log_batches(client, run_id, metrics=metrics, params_=params)
    added = _add_missing_labels(client, run, res)

    remote = _remote_files(client, run_id)
    art_dir = path.parent / "artifacts"
    local = sorted(f for f in art_dir.rglob("*") if f.is_file()) if art_dir.is_dir() else []
    missing = [f for f in local if f.relative_to(art_dir).as_posix() not in remote]
    for f in missing:
        sub = f.parent.relative_to(art_dir).as_posix()
        client.log_artifact(run_id, str(f), None if sub == "." else sub)
    n_art = len(missing) + ("results.json" not in remote)

    status, old_status = MLFLOW_STATUS[res["status"]], run.info.status
    if old_status != status:
        client.set_terminated(run_id, status, end_time=_ms(res.get("updated")))
    if not (created or params or metrics or n_art or added or old_status != status):
        return "up to date", f"{where}: up to date (run {run_id})"

    res["mlflow_synced"] = {"uri": uri, "run_id": run_id, "time": now_iso()}
    if not res.get("mlflow_run_id"):  # an id from another store (the run's own tracking URI) is kept
        res["mlflow_run_id"] = run_id
    if "results.json" not in remote:  # the copy in MLflow is the final one, sync record included
        with tempfile.TemporaryDirectory() as tmp:
            write_json_atomic(Path(tmp) / "results.json", res)
            client.log_artifact(run_id, str(Path(tmp) / "results.json"))
    write_json_atomic(path, res)
    what = "created run" if created else "run"
    st = status if created or old_status == status else f"{old_status} -> {status}"
    return ("created" if created else "updated"), (f"{where}: {what} {run_id}: +{len(metrics)} metric values, "
                                                   f"+{len(params)} params, +{n_art} artifacts, {st}")


def _add_missing_labels(client, run, res: dict) -> int:
    """What the run's page shows beside its numbers, when the MLflow run lacks it (synced from a results.json
    written before runs had them, or by a sync): the dataset input, the source tags, the description. How many
    were added."""
    n = 0
    if res.get("dataset") and not run.inputs.dataset_inputs:
        client.log_inputs(run.info.run_id, datasets=[mlflow_store.dataset_input(res["dataset"])])
        n += 1
    labels = mlflow_store.source_tags(res.get("entry_point"), res.get("git_commit") or "unknown", res.get("user"))
    labels[summary.DESCRIPTION_TAG] = summary.run_description(res)  # sync skips a run still running
    for k, v in labels.items():
        if k not in run.data.tags:
            client.set_tag(run.info.run_id, k, v)
            n += 1
    return n


def _outputs_for(uri: str) -> Path:
    """Where a local store's experiment keeps artifacts: beside the SQLite file, as cl-run does."""
    if urlparse(uri).scheme == "sqlite":
        return Path(mlflow_store.sqlite_path(uri)).parent
    return Path(os.environ.get("CL_RUNNER_OUTPUTS", "outputs")).resolve()


def main(paths: list[str], uri: str) -> int:
    """`cl-report --sync [PATHS] [--tracking-uri URI]`; exit code 0, 1 if a run failed to sync, 2 on usage.
    An unreadable results.json is a warning (it is no run to sync), not a failure."""
    try:
        paths = paths or [os.environ.get("CL_RUNNER_OUTPUTS", "outputs")]
        files = run_files(paths)
        if not files:
            raise UserError(f"no results.json under {', '.join(paths)}")
        mlflow_store.check_usable(uri, 2)  # a local SQLite file is created if missing
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our line names the run
        client = mlflow_store.client(uri)
    except UserError as e:
        print(f"cl-report: {e}", file=sys.stderr)
        return 2
    counts = {"created": 0, "updated": 0, "up to date": 0, "skipped": 0, "unreadable": 0, "failed": 0}
    for f in files:
        try:
            kind, line = sync_run(client, f, uri, _outputs_for(uri))
        except ResultsError as e:
            print(f"cl-report: warning: {e}; left out", file=sys.stderr)
            counts["unreadable"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - whatever MLflow raises; the other runs still sync
            print(f"cl-report: {f}: {mlflow_store.short(e)}", file=sys.stderr)
            counts["failed"] += 1
            continue
        counts[kind] += 1
        print(line)
    for parent_file in sorted({p for p in map(_parent_file, files) if p is not None}):
        try:
            line = close_parent(client, parent_file)
        except Exception as e:  # noqa: BLE001 - the jobs are synced; the parent's status is cosmetic
            print(f"cl-report: {parent_file}: {mlflow_store.short(e)}", file=sys.stderr)
            counts["failed"] += 1
            continue
        if line:
            counts["parents closed"] = counts.get("parents closed", 0) + 1
            print(line)
    print(f"synced {len(files)} run(s) to {uri}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    return 1 if counts["failed"] else 0
