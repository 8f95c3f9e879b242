"""NISPA's phases as a run artifact (`nispa_phases.png`): per task, the validation accuracy of every phase,
the phase whose network the task kept, and the connections dropped (and regrown) after each phase."""
from __future__ import annotations

import math
from pathlib import Path

from ..plots import _plt


def phases_figure(history: list, folder: Path) -> None:
    """history[t]: task t's diagnostics as fit_task returned them (phase_<i>/val_acc, /dropped, phases, ...)."""
    if not history:
        return
    plt = _plt()
    cols = min(len(history), 5)
    rows = math.ceil(len(history) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for t, ax in enumerate(axes.flat):
        if t >= len(history):
            ax.set_visible(False)
            continue
        d, n = history[t], int(history[t]["phases"])
        steps = list(range(1, n + 1))
        ax.plot(steps, [d[f"phase_{i}/val_acc"] for i in steps], marker="o", ms=3, label="validation acc (%)")
        kept = max(1, n - 1)  # the last phase broke a stop rule: the one before it is kept
        ax.axvline(kept, color="green", ls="--", lw=1, label=f"kept: phase {kept}, p = {d['final_p']:.0f} %")
        bars = ax.twinx()
        bars.bar([i for i in steps if f"phase_{i}/dropped" in d], [d[f"phase_{i}/dropped"] for i in steps
                 if f"phase_{i}/dropped" in d], color="grey", alpha=0.35)
        bars.set_ylabel("connections dropped = regrown", fontsize=7)
        ax.set_zorder(bars.get_zorder() + 1)  # the accuracy line above the bars
        ax.patch.set_visible(False)
        ax.set(title=f"task {t + 1}: {n} phases", xlabel="phase")
        ax.legend(fontsize=6, loc="lower left")
    fig.subplots_adjust(left=0.07, right=0.93, bottom=0.2 / rows, top=1 - 0.12 / rows, wspace=0.55, hspace=0.5)
    fig.savefig(folder / "nispa_phases.png", dpi=100)
    plt.close(fig)
