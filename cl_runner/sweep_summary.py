"""What a sweep's parent MLflow run holds once the sweep ends, so that opening it tells the sweep's result:

- every job of the grid: its children, and for each job a relaunch skipped (skip_finished) the finished run
  it reused, listed in the parent's `cl_runner.reused_runs` tags (`cl-report --parent <id>` reads them too);
- as metrics, per group of runs (a `cl-report` row: method × dataset × scenario × swept values) the mean of
  each final figure under the children's own name (`final/avg_acc`), its std (ddof=1) as `<name>_std` and the
  number of runs as `runs`; with more than one group each name is prefixed by the group's label
  (`sel 10/final/avg_acc`). With one group the parent also carries the mean over its runs of each per-task
  accuracy curve (`acc/task_<t>`, `acc/avg`, ...), so that a collapsed sweep is one line in the UI's charts;
- as artifacts, `cl-report`'s table (Markdown, CSV) and figure in `sweep_report/`;
- as its description (Overview page) the table and the list of jobs with links to their runs;
- the children's dataset inputs.
"""
from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from pathlib import Path

from .report import COLUMNS, TASK_IL_COLUMNS, Row, sweep_report
from .tracking import mlflow_store, summary
from .tracking.records import TASK_IL, collect_from_mlflow, reused_tags
from .tracking.results import write_json_atomic

log = logging.getLogger("cl_runner")
SKIPPED = "skipped.json"  # in a skipped job's folder: the finished run it stands for
PARENT_FILE = "mlflow_parent.json"
CURVES = ("acc/", "acc_til/")  # per-step metrics a one-group parent carries as the mean over its runs


# ------------------------------------------------------------------------------------ skipped jobs
def record_skip(job_dir: Path, sweep_dir: Path, config_hash: str, found: dict) -> None:
    """A job skipped because a run with its config finished before: which run, for the sweep's parent."""
    parent = sweep_dir / PARENT_FILE
    parent_id = json.loads(parent.read_text()).get("run_id") if parent.is_file() else None
    write_json_atomic(job_dir / SKIPPED, {"parent_run_id": parent_id, "config_hash": config_hash,
                                          "run_dir": found.get("run_dir"), "mlflow_run_id": found.get("mlflow_run_id")})


def skipped_jobs(sweep_dir: Path, parent_id: str) -> list[dict]:
    """The skip records this launch's jobs wrote (a sweep folder used again keeps older launches' ones)."""
    out = []
    for f in sorted(Path(sweep_dir).rglob(SKIPPED)):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("parent_run_id") == parent_id:
            out.append({**rec, "job": f.parent.name})
    return out


# ----------------------------------------------------------------------------------------- metrics
def group_labels(rows: list[Row]) -> list[str]:
    """Per row, what tells it from the other rows (method, dataset, scenario, swept values), in characters
    MLflow allows in a metric name; "" when there is one row."""
    if len(rows) < 2:
        return [""] * len(rows)
    parts = []
    for r in rows:
        p = [("method", r.method), ("dataset", r.dataset), ("scenario", r.scenario)]
        parts.append(p + [(k, f"{k.split('.')[-1]} {v}") for k, v in r.swept.items()])
    varying = [i for i in range(len(parts[0])) if len({p[i][1] for p in parts}) > 1]
    labels = [" ".join(p[i][1] for i in varying) for p in parts]
    return [re.sub(r"\s+", " ", re.sub(r"[^\w.\- :]", " ", s)).strip() for s in labels]


def parent_metrics(rows: list[Row]) -> dict[str, float]:
    """Mean, std and number of runs of each row's columns under the children's metric names (see above)."""
    out = {}
    for label, r in zip(group_labels(rows), rows):
        prefix = f"{label}/" if label else ""
        columns = TASK_IL_COLUMNS if r.scenario == TASK_IL else COLUMNS
        for column, name in columns.items():
            ms = r.stats.get(column)
            if ms is None:
                continue
            out[prefix + name] = ms[0]
            if not math.isnan(ms[1]):
                out[f"{prefix}{name}_std"] = ms[1]
        out[prefix + "runs"] = float(r.n)
    return out


def mean_curves(client, run_ids: list[str]) -> list:
    """Per-step accuracy metrics (acc/*, acc_til/*) averaged over the runs, step by step (mlflow Metrics)."""
    from mlflow.entities import Metric

    values: dict[tuple[str, int], list[float]] = {}
    for run_id in run_ids:
        for key in [k for k in client.get_run(run_id).data.metrics if k.startswith(CURVES)]:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
            by_step = {m.step: m.value for m in history}  # a step logged again (resume): its newest value
            for step, v in by_step.items():
                values.setdefault((key, step), []).append(v)
    ts = int(time.time() * 1000)
    return [Metric(k, sum(v) / len(v), ts, step) for (k, step), v in sorted(values.items())]


# ------------------------------------------------------------------------------------- description
def _link(run) -> str:
    name = (run.info.run_name or run.info.run_id).replace("|", "/").replace("]", ")")
    return f"[{name}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"


def describe(table_md: str, children: list, reused: list, skipped: list, swept: list, command: str) -> str:
    """The parent's Overview note: the command, the table, every job with a link to its run."""
    def job(run) -> str:
        over = dict(o.lstrip("+~").split("=", 1) for o in run.data.tags.get("overrides", "").split() if "=" in o)
        return " ".join(f"{k}={over[k]}" for k in swept if k in over) or run.data.tags.get("overrides", "")

    lines = [f"**Sweep** `{command}`: {len(children) + len(skipped)} jobs, {len(children)} run in this sweep, "
             f"{len(skipped)} skipped (a run with the same config had finished: skip_finished).", "",
             "**Mean ± std over seeds**, as in this run's metrics and `sweep_report/` (`cl-report --parent <run id> "
             "--ref`):", "", table_md.strip(), "", "**Jobs**", "", "| job | run | status |", "|:---|:---|:---|"]
    lines += [f"| {job(r)} | {_link(r)} | {r.info.status.lower()} in this sweep |" for r in children]
    folder = {s.get("mlflow_run_id"): s["job"] for s in skipped}  # a reused run's own overrides are another job's
    lines += [f"| {folder.get(r.info.run_id) or job(r)} | {_link(r)} | finished before, reused |" for r in reused]
    missing = [s for s in skipped if s.get("mlflow_run_id") not in {r.info.run_id for r in reused}]
    lines += [f"| {s['job']} | {s.get('run_dir')} | finished before; not in this store (cl-report --sync uploads it) |"
              for s in missing]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the end
def finish_parent(client, uri: str, parent_id: str, exp_id: str, sweep_dir: Path, swept: list,
                  command: str) -> int:
    """Give the parent run the sweep's result (module docstring); returns how many jobs it stands for."""
    children = list(client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000))
    skipped = skipped_jobs(sweep_dir, parent_id)
    reused = [r for r in (mlflow_store.live_run(client, s.get("mlflow_run_id")) for s in skipped) if r is not None]
    reused = list({r.info.run_id: r for r in reused if r.info.run_id not in {c.info.run_id for c in children}}.values())
    for k, v in reused_tags([r.info.run_id for r in reused]).items():
        client.set_tag(parent_id, k, v)
    records = collect_from_mlflow(parent=parent_id, tracking_uri=uri, curves=True)
    table_md = "No job of this sweep finished."
    if records:
        with tempfile.TemporaryDirectory() as folder:
            rows = sweep_report(records, f"MLflow run {parent_id}: its children and the runs it reused", Path(folder))
            table_md = (Path(folder) / "table.md").read_text(encoding="utf-8")
            client.log_artifacts(parent_id, folder, "sweep_report")
        from mlflow.entities import Metric

        step, ts = max(len(r.curve or []) for r in records), int(time.time() * 1000)  # the children's last step
        metrics = [Metric(k, v, ts, step) for k, v in parent_metrics(rows).items()]
        if len(rows) == 1:
            metrics += mean_curves(client, [r.source for r in records])
        mlflow_store.log_batches(client, parent_id, metrics=metrics)
    inputs = {(d.dataset.name, d.dataset.digest): d for r in children + reused for d in r.inputs.dataset_inputs}
    if inputs:
        client.log_inputs(parent_id, datasets=list(inputs.values()))
    client.set_tag(parent_id, summary.DESCRIPTION_TAG, describe(table_md, children, reused, skipped, swept, command))
    return len(children) + len(skipped)

