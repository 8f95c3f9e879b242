"""A run at a glance, for people: the per-task table (tasks.csv artifact) and the run's MLflow description
(the Markdown note on its Overview page: the final figures and that table). Tasks are numbered from 1 here,
as in every figure and printed table (names.py: a metric key's index is R[i][j]'s 0-based j).
Built from a results.json record, so a run tracked live and one synced afterwards read the same.
"""
from __future__ import annotations

import math

from . import names

# MLflow's tag for a run's description (shown and edited on the run's Overview page)
DESCRIPTION_TAG = "mlflow.note.content"
HEAD = ["task", "classes", "seconds", "class-IL after it (%)", "class-IL at the end (%)", "task-IL after it (%)",
        "task-IL at the end (%)"]


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _after(R: list, t: int) -> float:
    """Accuracy on task t right after training it: row t, when that row saw tasks 0..t only (a joint run's
    single row saw every task at once: no such value)."""
    if t >= len(R) or any(not math.isnan(_num(v)) for v in R[t][t + 1:]):
        return math.nan
    return _num(R[t][t])


def task_rows(res: dict) -> list[list]:
    """One row per task of the run's stream: [task (1-based), classes, seconds, then class-IL and task-IL
    accuracy right after training the task and after the last task trained]; NaN where there is none."""
    acc, til = res.get("acc") or [], res.get("acc_til") or []
    if not acc:
        return []
    task_s = (res.get("timings") or {}).get("task_s") or []
    classes = ((res.get("dataset") or {}).get("profile") or {}).get("classes") or []
    rows = []
    for t in range(len(acc[0])):
        seconds = task_s[t] if t < len(task_s) and len(task_s) == len(acc) else math.nan
        rows.append([t + 1, " ".join(map(str, classes[t])) if t < len(classes) else "", _num(seconds),
                     _after(acc, t), _num(acc[-1][t]), _after(til, t), _num(til[-1][t])])
    return rows


def _cell(v, digits: int = 2) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def tasks_csv(res: dict) -> str:
    lines = [",".join(HEAD)] + [",".join(_cell(v, 4) for v in row) for row in task_rows(res)]
    return "\n".join(lines) + "\n"


def _markdown(head: list, rows: list) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    out += ["| " + " | ".join(_cell(v) or "–" for v in row) + " |" for row in rows]
    return "\n".join(out)


def run_description(res: dict) -> str:
    """The run's Overview note: what ran, its final figures, the per-task table."""
    cfg, choices, m = res["config"], res.get("choices") or {}, res.get("metrics") or {}

    def f(k: str, unit: str = "") -> str:
        v = _num(m.get(names.final(k)))
        return "n/a" if math.isnan(v) else f"{v:.2f}{unit}"

    total = m.get(names.TOTAL_TIME)
    done = f"{res.get('tasks_done')}/{res.get('n_tasks')} tasks" + (f", {total:.1f} s" if total is not None else "")
    method, dataset = choices.get("method") or cfg["method"]["name"], choices.get("dataset") or cfg["dataset"]["name"]
    lines = [f"**{method}** on **{dataset}**, seed {cfg.get('seed')}, {res.get('status')} ({done})",
             "",
             f"Final average accuracy: class-IL **{f('avg_acc', ' %')}**, task-IL **{f('avg_acc_til', ' %')}**; "
             f"BWT {f('bwt')}, forgetting {f('forgetting')} (class-IL, points); task-IL BWT {f('bwt_til')}, "
             f"forgetting {f('forgetting_til')}.",
             ""]
    rows = task_rows(res)
    if rows:
        lines += ["Per task (numbered from 1, as in the metric names; also `tasks.csv`):", "",
                  _markdown(HEAD, rows)]
    if res.get("error"):
        lines += ["", f"Error: {res['error']}"]
    return "\n".join(lines)
