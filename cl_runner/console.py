"""What a run prints on the terminal: a progress bar (or one line per task) and the final matrices."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from .tracking import names

log = logging.getLogger("cl_runner")


class Progress:
    """A rich progress bar on a terminal; one log line per task otherwise."""

    def __init__(self, mode: str, n_tasks: int):
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=True)
            self.bar.start()
        self.quiet, self.n_tasks = mode == "off", n_tasks

    def task(self, i: int, steps: int):
        if self.bar is None:
            return lambda: None
        bar_id = self.bar.add_task(f"task {i + 1}/{self.n_tasks}", total=steps)
        return lambda: self.bar.advance(bar_id)

    def done(self, i: int, row: list, row_til: list, seconds: float) -> None:
        if self.quiet:
            return
        fmt = lambda r: " ".join("  -  " if math.isnan(v) else f"{v:5.1f}" for v in r)  # noqa: E731
        msg = f"task {i + 1}/{self.n_tasks} done in {seconds:.1f}s | class-IL {fmt(row)} | task-IL {fmt(row_til)}"
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            log.info(msg)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_summary(acc, acc_til, metrics, run_dir: Path, ui_line: str | None = None) -> None:
    """The matrices (tasks numbered from 1, as in every figure), the final figures, where the results are and,
    with MLflow, the one line giving the run's address in the UI."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True, width=max(100, Console().width))
    for title, R in (("class-IL accuracy (%)", acc), ("task-IL accuracy (%)", acc_til)):
        table = Table(title=f"{title}  (row: after training task Ti, column: on task Tj; tasks from T1)",
                      title_justify="left")
        table.add_column("after")
        for j in range(len(R[0])):
            table.add_column(f"T{j + 1}", justify="right")
        for i, r in enumerate(R):
            after = "all" if len(R) == 1 < len(R[0]) else f"T{i + 1}"  # a joint run: one row, every task at once
            table.add_row(after, *("-" if math.isnan(v) else f"{v:.2f}" for v in r))
        console.print(table)
    f = lambda k: "n/a" if math.isnan(metrics.get(names.final(k), float("nan"))) else f"{metrics[names.final(k)]:.2f}"  # noqa: E731
    console.print(f"final avg acc: class-IL {f('avg_acc')} | task-IL {f('avg_acc_til')} | "
                  f"BWT {f('bwt')} | forgetting {f('forgetting')} | {metrics[names.TOTAL_TIME]:.1f}s")
    console.print(f"results: {run_dir / 'results.json'}")
    if ui_line:
        console.print(ui_line, markup=False, overflow="ignore", crop=False)
