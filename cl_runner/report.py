"""`cl-report`: finished runs as a paper-style table, mean ± std over seeds, one row per experiment.

    cl-report outputs/runs                     # every results.json under a folder (tracking=local)
    cl-report --experiment cl_runner --ref     # MLflow, beside the published numbers in references.yaml
    cl-report --parent <sweep run id> --metrics capacity/fc1/units_used_pct --csv table.csv
    cl-report --sync outputs --tracking-uri http://127.0.0.1:5000   # upload what a dead server missed
    cl-report outputs/reproduce-baselines --ref --plot accuracy.png  # + average accuracy after each task

A row is a method × dataset (config names) × scenario (task-IL when the model has a head per task,
model.head=multi; else class-IL) plus every identity key (identity.py) that takes more than one value within
that method × dataset × scenario (the swept keys), so seeds are what a row averages over. A config and seed
that ran more than once counts once, with its newest run: a row's n is its number of seeds. BWT and
forgetting are those of the row's scenario; --ref compares a task-IL row's task-IL accuracy with the paper's
task-IL number, a class-IL row's class-IL accuracy with its class-IL one.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .identity import is_identity_key
from .references import band_label, lands, load_references
from .tracking import names
from .tracking.records import (TASK_IL, RunRecord, collect_from_mlflow, collect_from_results,  # noqa: F401
                               resolve_tracking_uri)

# column label -> metric name (the same names in MLflow and in results.json); a task-IL row's BWT and
# forgetting are the task-IL ones
COLUMNS = {"acc (class-IL)": names.final("avg_acc"), "acc (task-IL)": names.final("avg_acc_til"),
           "BWT": names.final("bwt"), "forgetting": names.final("forgetting"), "time (s)": names.TOTAL_TIME}
TASK_IL_COLUMNS = {**COLUMNS, "BWT": names.final("bwt_til"), "forgetting": names.final("forgetting_til")}
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
DASH = "–"


@dataclass
class Row:
    method: str
    dataset: str
    scenario: str  # class-IL | task-IL (records.scenario_of)
    swept: dict[str, str]
    n: int
    stats: dict[str, tuple[float, float] | None]  # column label -> (mean, std); std is NaN for one run
    statuses: Counter  # status -> number of runs
    paper: str | None = None  # None: references not requested
    flag: str | None = None
    older: int = 0  # runs left out: an older run of a config and seed that ran again
    runs: list[RunRecord] = field(default_factory=list)  # the n runs averaged (one per seed)


# ------------------------------------------------------------------------------------ summarising
def swept_keys(records: list[RunRecord]) -> list[str]:
    """Identity keys (seed aside) with more than one value within a method × dataset × scenario. A key that
    some runs lack (older runs, before the method had it) is swept only if the runs that have it disagree."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.method, r.dataset, r.scenario), []).append(r)
    keys = set()
    for runs in groups.values():
        for k in set().union(*(r.params for r in runs)):
            if k != "seed" and is_identity_key(k) and len({r.params[k] for r in runs if k in r.params}) > 1:
                keys.add(k)
    return sorted(keys)


def _compare(row: Row, refs: dict) -> None:
    row.paper = row.flag = DASH
    entry = (refs.get(row.method) or {}).get(row.dataset) or {}
    til = ("acc_til", "std_til", "band_til")
    if row.scenario == TASK_IL:  # a head per task: the paper's task-IL number (or band), if it gives one
        (ref_key, std_key, band_key), note = til, ""
    elif "acc" in entry or "band" in entry:
        (ref_key, std_key, band_key), note = ("acc", "std", "band"), ""
    else:  # one shared head, but the paper gives a task-aware number only (CLNP's pMNIST)
        (ref_key, std_key, band_key), note = til, " task-IL"
    ref, ref_std, band = entry.get(ref_key), entry.get(std_key), entry.get(band_key)
    if ref is None and band is None:
        return
    row.paper = (DASH if ref is None else _fmt((ref, math.nan if ref_std is None else ref_std))) + note
    label = "acc (task-IL)" if ref_key == "acc_til" else "acc (class-IL)"
    if row.stats.get(label):
        mean, std = row.stats[label]
        row.flag = ("✓" if lands(mean, std, row.n, ref, ref_std, band) else "✗ outside") + (
            f" ({band_label(band)})" if band is not None else "")


def _mean_std(values: list) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan  # ddof=1


def newest_per_seed(runs: list[RunRecord]) -> list[RunRecord]:
    """One run per seed within a row (the same config and seed ran again: the same experiment, not another
    sample): a finished run before an unfinished one, then the newest. Runs without a seed all count."""
    best: dict = {}
    for i, r in enumerate(runs):
        k = i if r.seed is None else r.seed
        if k not in best or (r.status == "finished", r.time) > (best[k].status == "finished", best[k].time):
            best[k] = r
    return list(best.values())


def summarise(records: list[RunRecord], metrics: list[str] = (), refs: dict | None = None) -> list[Row]:
    keys = swept_keys(records)
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.method, r.dataset, r.scenario, *(r.params.get(k, DASH) for k in keys)), []).append(r)
    rows = []
    for key in sorted(groups, key=lambda key: [_natural(v) for v in key]):
        runs = newest_per_seed(groups[key])
        columns = {**(TASK_IL_COLUMNS if key[2] == TASK_IL else COLUMNS), **{m: m for m in metrics}}
        stats = {label: _mean_std([r.metrics.get(name) for r in runs]) for label, name in columns.items()}
        row = Row(key[0], key[1], key[2], dict(zip(keys, key[3:])), len(runs), stats,
                  Counter(r.status for r in runs), older=len(groups[key]) - len(runs), runs=runs)
        if refs is not None:
            _compare(row, refs)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- printing
_NUM = re.compile(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def _natural(v: str) -> list:
    """Sort key where numbers sort as numbers, inside text too: "2" < "10", "[80, 80]" < "[120, 120]"."""
    return [(0, float(tok), "") if i % 2 else (1, 0.0, tok) for i, tok in enumerate(_NUM.split(str(v))) if tok]


def _fmt(mean_std: tuple[float, float] | None) -> str:
    if mean_std is None:
        return DASH
    mean, std = mean_std
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _table(rows: list[Row], split: bool) -> tuple[list[str], list[list[str]]]:
    """Header and cells; `split` gives mean and std their own (numeric) columns, for CSV."""
    first, show_status = rows[0], any(set(r.statuses) != {"finished"} for r in rows)
    head = ["method", "dataset", "scenario", *first.swept, "n"]
    head += [f"{c} {s}" for c in first.stats for s in ("mean", "std")] if split else list(first.stats)
    head += ["paper", "vs paper"] if first.flag is not None else []
    head += ["status"] if show_status else []
    body = []
    for r in rows:
        cells = [r.method, r.dataset, r.scenario, *r.swept.values(), str(r.n)]
        for ms in r.stats.values():
            if not split:
                cells.append(_fmt(ms))
            else:  # empty, not "–", so that spreadsheets and pandas read a missing number
                cells += ["" if ms is None or math.isnan(x) else f"{x:.4f}" for x in (ms or (0, 0))]
        cells += [r.paper, r.flag] if r.flag is not None else []
        cells += [", ".join(f"{n} {s}" for s, n in sorted(r.statuses.items()))] if show_status else []
        body.append(cells)
    return head, body


def to_markdown(rows: list[Row]) -> str:
    head, body = _table(rows, split=False)
    numeric = {"n", "paper", *rows[0].stats}
    lines = [head, ["---:" if h in numeric else ":---" for h in head], *body]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines)


def to_csv(rows: list[Row]) -> str:
    head, body = _table(rows, split=True)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([head, *body])
    return out.getvalue()


# ---------------------------------------------------------------------------------------- figures
def curve_lines(rows: list[Row]) -> list[tuple[str, str, list[list[float]]]]:
    """What `plots.seen_accuracy_figure` draws, in row order: ("<dataset>, <scenario>", label, its seeds' curves)
    for the rows whose runs have curves. A label is the method, plus the swept values that tell that method's
    rows in the same dataset and scenario apart."""
    rows = [r for r in rows if any(run.curve for run in r.runs)]
    lines = []
    for r in rows:
        same = [o for o in rows if (o.method, o.dataset, o.scenario) == (r.method, r.dataset, r.scenario)]
        differ = ", ".join(f"{k.removeprefix('method.')}={v}" for k, v in r.swept.items()
                           if len({o.swept[k] for o in same}) > 1)
        lines.append((f"{r.dataset}, {r.scenario}", f"{r.method} ({differ})" if differ else r.method,
                      [run.curve for run in r.runs if run.curve]))
    return lines


def plot(rows: list[Row], path: Path) -> None:
    """Average accuracy over the tasks seen after each task, a line per row (mean ± std over its seeds)."""
    from . import plots

    lines = curve_lines(rows)
    if not lines:
        raise UserError(f"no accuracy matrix in these runs to plot into {path}")
    try:
        plots.seen_accuracy_figure(lines, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def caption(records: list[RunRecord], rows: list[Row], where: str) -> str:
    older = sum(r.older for r in rows)
    return (f"Runs: {len(records) - older}, rows: {len(rows)} (mean ± std over seeds); source: {where}"
            + (f"\n{older} older run(s) of a config and seed that ran again left out (the newest of each counts)"
               if older else ""))


def sweep_report(records: list[RunRecord], where: str, folder: Path) -> list[Row]:
    """A sweep's table beside the published numbers (table.md, table.csv) and its figure (accuracy.png), what
    `cl-report --parent <id> --ref --csv --plot` gives, into `folder`; the sweep's parent run logs them as its
    artifacts and the rows' means and stds as its metrics (sweep_summary.py)."""
    rows = summarise(records, refs=load_references())
    (folder / "table.md").write_text(f"{caption(records, rows, where)}\n\n{to_markdown(rows)}\n", encoding="utf-8")
    (folder / "table.csv").write_text(to_csv(rows), encoding="utf-8")
    if curve_lines(rows):
        plot(rows, folder / "accuracy.png")
    return rows


# ------------------------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cl-report", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", help="results.json files or folders to search; none: read MLflow")
    p.add_argument("--experiment", default="cl_runner", help="MLflow experiment name")
    p.add_argument("--parent", help="only the children of this sweep parent run id")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.`method.lr` = '0.1'\"")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db")
    p.add_argument("--metrics", nargs="+", default=[],
                   help="extra metric columns, names as in MLflow (a,b or a b; put paths before --metrics)")
    p.add_argument("--csv", help="also write the table to this CSV file (mean and std in separate columns)")
    p.add_argument("--ref", action="store_true", help="compare with the published numbers (references.yaml)")
    p.add_argument("--plot", metavar="FILE", help="also draw average accuracy over the tasks seen after each "
                   "task, a line per row with a mean ± std band (.png, .pdf or .svg)")
    p.add_argument("--all", action="store_true", help="include unfinished runs (shown in a status column)")
    p.add_argument("--sync", action="store_true", help="upload to MLflow (--tracking-uri) what these runs' "
                   "results.json hold and the server missed (default: outputs/); see cl_runner/tracking/sync.py")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.sync:
        from .tracking.sync import main as sync

        return sync(args.paths, resolve_tracking_uri(args.tracking_uri))
    metrics = list(dict.fromkeys(m for arg in args.metrics for m in arg.split(",") if m))
    problems: list[str] = []  # results.json files that could not be read: warned about, the rest reported
    try:
        if args.plot and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
            raise UserError(f"--plot {args.plot}: the file name must end in {', '.join(PLOT_SUFFIXES)}")
        if args.paths:
            records = collect_from_results(args.paths, args.all, problems)
            where = "results.json files in " + ", ".join(args.paths)
        else:
            records = collect_from_mlflow(args.experiment, args.parent, args.filter, args.tracking_uri,
                                          args.all, curves=bool(args.plot))
            what = f"children of run {args.parent}" if args.parent else f"experiment {args.experiment!r}"
            where = f"MLflow {what} at {resolve_tracking_uri(args.tracking_uri)}"
        if not records:  # nothing to show: the reason is the unreadable file, if that is all there was
            raise UserError(problems[0] + (f" (and {len(problems) - 1} more unreadable)" if problems[1:] else "")
                            if problems else f"no {'' if args.all else 'finished '}runs found in {where}")
        rows = summarise(records, metrics, load_references() if args.ref else None)
        if args.csv:
            try:
                Path(args.csv).write_text(to_csv(rows), encoding="utf-8")
            except OSError as e:
                raise UserError(f"cannot write {args.csv}: {e}") from None
        if args.plot:
            plot(rows, Path(args.plot))
    except UserError as e:
        print(f"cl-report: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"cl-report: warning: {p}; left out", file=sys.stderr)
    print(caption(records, rows, where))
    print()
    print(to_markdown(rows))
    if args.plot:
        print(f"\nFigure: {args.plot}")
    return 0
