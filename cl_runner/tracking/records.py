"""Finished runs as records for tables: from results.json files (the one finder) or from an MLflow
experiment / sweep parent. `cl-report` summarises them; `RunRecord` is what both sources give.

A record's `curve` is the average accuracy over the tasks seen so far after each task, in the run's scenario
(what `cl-report --plot` draws). From results.json it is computed from the scenario's matrix (`acc` or
`acc_til`, the mean of each row's seen entries); from MLflow it is the metric history `acc/avg` or
`acc_til/avg` (logged at step = tasks trained, the same mean; `cl-report --sync` rebuilds it), read only
when asked (one call per run), so no artifact has to be downloaded."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import TrackingError, UserError
from . import mlflow_store, names
from .results import ResultsError, flat_config, read_results, run_files


@dataclass
class RunRecord:
    method: str  # config names (Hydra choices), e.g. "static_sparse" although method.name is "spacenet"
    dataset: str
    seed: int | None
    params: dict[str, str]  # flattened resolved config, dotted keys
    metrics: dict[str, float]
    status: str = "finished"
    source: str = ""  # results.json path or MLflow run id
    time: float = 0.0  # when the run last changed (Unix seconds): the newest of a config and seed counts
    curve: list[float] | None = None  # [t - 1]: mean accuracy over tasks 1..t after task t, in `scenario`

    @property
    def scenario(self) -> str:
        return scenario_of(self.params)


CLASS_IL, TASK_IL = "class-IL", "task-IL"


def scenario_of(params: dict[str, str]) -> str:
    """task-IL when the model has a head per task (model.head=multi, e.g. +experiment=vdv_split_mnist_til: the
    task's units alone in training and test), else class-IL (one head over all classes)."""
    return TASK_IL if params.get("model.head") == "multi" else CLASS_IL


def seen_average(matrix: list) -> list[float]:
    """Per row of an accuracy matrix R[i][j] (null / NaN = task j not seen after task i): the mean of the seen
    entries, NaN for a row with none."""
    out = []
    for row in matrix or []:
        seen = [v for v in row or [] if isinstance(v, (int, float)) and not math.isnan(v)]
        out.append(sum(seen) / len(seen) if seen else math.nan)
    return out


def record_of(path: Path) -> RunRecord:
    """A results.json as a RunRecord; ResultsError (one line) when it is not a run's record."""
    data = read_results(path)
    try:
        cfg, choices = data["config"], data.get("choices") or {}
        metrics = {k: float(v) for k, v in (data.get("metrics") or {}).items() if isinstance(v, (int, float))}
        if names.TOTAL_TIME not in metrics and (data.get("timings") or {}).get("total_s") is not None:
            metrics[names.TOTAL_TIME] = float(data["timings"]["total_s"])
        updated = data.get("updated")
        when = datetime.fromisoformat(updated).timestamp() if updated else path.stat().st_mtime
        params = flat_config(cfg)
        matrix = data.get("acc_til" if scenario_of(params) == TASK_IL else "acc")
        return RunRecord(method=choices.get("method") or cfg["method"]["name"],
                         dataset=choices.get("dataset") or cfg["dataset"]["name"], seed=cfg.get("seed"),
                         params=params, metrics=metrics, status=str(data.get("status")),
                         source=str(path), time=when, curve=seen_average(matrix) or None)
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        raise ResultsError(f"{path} is not a cl_runner results file ({type(e).__name__}: {e})") from None


def collect_from_results(paths: list[str], all_runs: bool = False,
                         problems: list[str] | None = None) -> list[RunRecord]:
    """The runs in these results.json files / folders. A file that cannot be read is left out and its one-line
    reason appended to `problems` (when given; else it is raised)."""
    records = []
    for f in run_files(paths):
        try:
            records.append(record_of(f))
        except ResultsError as e:
            if problems is None:
                raise
            problems.append(str(e))
    return [r for r in records if all_runs or r.status == "finished"]


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the database cl-run writes by default."""
    return mlflow_store.tracking_uri(uri, os.environ.get("CL_RUNNER_OUTPUTS", "outputs"))  # = paths.outputs


# a sweep parent's tags listing the finished runs its relaunch reused instead of running a job again (skip_finished):
# run ids, comma-separated, REUSED_PER_TAG to a tag (MLflow keeps 8000 characters of a tag value)
REUSED_TAG = "cl_runner.reused_runs"
REUSED_PER_TAG = 200


def reused_tags(run_ids: list[str]) -> dict[str, str]:
    """The tags that list a sweep parent's reused runs: cl_runner.reused_runs, then _1, _2, ... when many."""
    chunks = [run_ids[i:i + REUSED_PER_TAG] for i in range(0, len(run_ids), REUSED_PER_TAG)]
    return {REUSED_TAG + (f"_{i}" if i else ""): ",".join(c) for i, c in enumerate(chunks)}


def reused_runs(tags: dict) -> list[str]:
    return [r for k, v in sorted(tags.items()) if k.startswith(REUSED_TAG) for r in v.split(",") if r]


def collect_from_mlflow(experiment: str = "cl_runner", parent: str | None = None, filter_string: str = "",
                        tracking_uri: str | None = None, all_runs: bool = False,
                        curves: bool = False) -> list[RunRecord]:
    """The runs of an experiment, or a sweep parent's: its children and the finished runs a relaunch of the
    sweep reused for jobs it skipped (the parent's cl_runner.reused_runs tags); `curves`: with each run's
    `curve`."""
    uri = resolve_tracking_uri(tracking_uri)
    mlflow_store.check_usable(uri, 2, must_exist=True)
    filters = []
    try:
        client = mlflow_store.client(uri)
        reused = []
        if parent:  # the sweep's children live in the parent's experiment, whatever --experiment says
            parent_run = client.get_run(parent)
            exp_id = parent_run.info.experiment_id
            filters.append(f"tags.mlflow.parentRunId = '{parent}'")
            reused = reused_runs(parent_run.data.tags)
        else:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                known = ", ".join(e.name for e in client.search_experiments()) or "none"
                raise TrackingError(f"no MLflow experiment {experiment!r} at {uri} (known: {known})")
            exp_id = exp.experiment_id
        if not all_runs:
            filters.append("attributes.status = 'FINISHED'")
        if filter_string:
            filters.append(filter_string)
        page = client.search_runs([exp_id], " and ".join(filters))
        runs = list(page)
        while page.token:  # more than one page (1000 runs each)
            page = client.search_runs([exp_id], " and ".join(filters), page_token=page.token)
            runs += page
        have = {r.info.run_id for r in runs}
        for run_id in reused:
            run = None if run_id in have else mlflow_store.live_run(client, run_id)  # may be deleted
            if run is not None and (all_runs or run.info.status == "FINISHED"):
                runs.append(run)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the backend raises (MLflow, SQLAlchemy, requests)
        raise TrackingError(f"MLflow at {uri}: {mlflow_store.short(e)}") from None
    records = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if tags.get("cl_runner.sweep_parent") == "true":  # holds the sweep, no results of its own
            continue
        seed = tags.get("seed", params.get("seed"))
        records.append(RunRecord(
            method=tags.get("method") or params.get("method.name", "?"),
            dataset=tags.get("dataset") or params.get("dataset.name", "?"),
            seed=int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
            params=dict(params), metrics=dict(run.data.metrics), status=run.info.status.lower(),
            source=run.info.run_id, time=(run.info.end_time or run.info.start_time or 0) / 1000))
        if curves:
            records[-1].curve = _history_curve(client, records[-1], uri)
    return records


def _history_curve(client, record: RunRecord, uri: str) -> list[float] | None:
    """The run's acc/avg (class-IL) or acc_til/avg (task-IL) history as a curve: index step - 1, the newest
    value of a step (a resumed run may log a step again), NaN for a step never logged."""
    key = names.ACC_TIL_AVG if record.scenario == TASK_IL else names.ACC_AVG
    try:
        history = client.get_metric_history(record.source, key)
    except Exception as e:  # noqa: BLE001 - whatever the backend raises
        raise TrackingError(f"MLflow at {uri}: {key} of run {record.source}: {mlflow_store.short(e)}") from None
    by_step = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp) if m.step >= 1}
    return [by_step.get(t, math.nan) for t in range(1, max(by_step) + 1)] if by_step else None
