"""Metric names, spelled in this one place: the MLflow keys, results.json's `metrics` and cl-report's columns.

Sections are separated by `/` (the MLflow UI groups on them). Tasks are numbered from 1 in every name, as
everywhere a person reads them: `acc/task_1` is the first task (column j = 0 of R[i][j]), and a per-task
metric's step is the number of tasks trained, so "after task t" is step t and forgetting curves start at 1.
Accuracies are percentages (0-100), as are quantities named `*_pct`; a fraction's name ends in `_frac`.
"""
from __future__ import annotations

import math

ACC_AVG = "acc/avg"  # class-IL mean over the tasks seen so far
ACC_TIL_AVG = "acc_til/avg"
TOTAL_TIME = "time/total_s"
# logged at their task's step, so the end-of-run batch leaves them out (results.json keeps their last value);
# a task's seconds are no MLflow metric (T one-point charts): results.json and the run's tasks.csv keep them
PER_TASK = ("acc/", "acc_til/", "capacity/", "method/", "time/task_")


def acc(j: int) -> str:
    return f"acc/task_{j + 1}"  # j: R's 0-based column


def acc_til(j: int) -> str:
    return f"acc_til/task_{j + 1}"


def capacity(layer: str, quantity: str) -> str:
    return f"capacity/{layer}/{quantity}"


def task_time(j: int) -> str:
    return f"time/task_{j + 1}_s"


def method(name: str) -> str:
    """A method's own diagnostic (what `fit_task` returns), e.g. method/theta_fc1."""
    return f"method/{name}"


def final(name: str) -> str:
    """An end-of-run figure, e.g. final/avg_acc, final/bwt_til."""
    return f"final/{name}"


def task_metrics(row: list, row_til: list, capacity_: dict | None, method_: dict | None) -> dict:
    """The metrics of one step (row i of the matrices, logged at step i + 1): accuracies on the tasks seen
    (None / NaN = not seen: left out) and their means, capacity per layer and the method's diagnostics. The
    tracker logs these live and `cl-report --sync` rebuilds them from results.json with this same function."""
    out = {}
    for name_of, avg, r in ((acc, ACC_AVG, row), (acc_til, ACC_TIL_AVG, row_til)):
        seen = {j: v for j, v in enumerate(r) if v is not None and not math.isnan(v)}
        out.update({name_of(j): v for j, v in seen.items()})
        out[avg] = sum(seen.values()) / len(seen)
    for layer, qs in (capacity_ or {}).items():
        out.update({capacity(layer, q): float(v) for q, v in qs.items()})
    out.update({method(k): float(v) for k, v in (method_ or {}).items()})
    return out


def is_per_task(name: str) -> bool:
    return name.startswith(PER_TASK)
