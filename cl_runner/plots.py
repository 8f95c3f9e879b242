"""Figures logged as run artifacts (matplotlib, imported lazily, headless backend)."""
from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def accuracy_heatmap(acc: list, acc_til: list, path: Path) -> None:
    """Side-by-side heatmaps of the class-IL and task-IL accuracy matrices."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(acc[0]), 1.5 + 0.6 * len(acc)), squeeze=False)
    for ax, R, title in zip(axes[0], (acc, acc_til), ("class-IL", "task-IL")):
        im = ax.imshow([[float("nan") if v is None else v for v in r] for r in R], vmin=0, vmax=100,
                       cmap="viridis", aspect="auto")
        for i, r in enumerate(R):
            for j, v in enumerate(r):
                if v is not None and not math.isnan(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 60 else "black")
        ax.set(title=f"{title} accuracy (%)", xlabel="evaluated on task", ylabel="after training task",
               xticks=range(len(R[0])), yticks=range(len(R)))
    fig.subplots_adjust(left=0.07, right=0.9, bottom=0.12, top=0.88, wspace=0.25)  # no tight bbox: a 2nd draw
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# capacity quantities by unit, so one axis never mixes a share with a count: (panel title, test on the name)
_UNITS = (
    ("used (%)", lambda q: q.endswith(("_pct", "_frac"))),
    ("accuracy (%)", lambda q: "acc" in q),
    ("connections", lambda q: q.startswith("conn_")),
    ("neurons", lambda q: q.startswith("units_")),
)


def _panels(quantities: list) -> list:
    """[(title, [quantity, ...]), ...]: one panel per unit in _UNITS order, then one per other quantity."""
    panels, rest = [], list(quantities)
    for title, test in _UNITS:
        group = [q for q in rest if test(q)]
        if group:
            panels.append((title, group))
            rest = [q for q in rest if q not in group]
    return panels + [(q, [q]) for q in rest]


def capacity_plot(capacity: list, path: Path) -> None:
    """A row per layer, a panel per unit (share of the layer used, neurons, connections, accuracy, others):
    each reported quantity against the number of tasks trained. Fractions are drawn as percentages."""
    plt = _plt()
    layers = list(capacity[-1])
    rows = [(layer, _panels(list(capacity[-1][layer]))) for layer in layers]
    ncols = max(len(p) for _, p in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.6 * ncols, 2.6 * len(rows)), squeeze=False)
    steps = range(1, len(capacity) + 1)
    for r, (layer, panels) in enumerate(rows):
        for col, ax in enumerate(axes[r]):
            if col >= len(panels):
                ax.set_visible(False)
                continue
            title, quantities = panels[col]
            for q in quantities:
                scale = 100.0 if q.endswith("_frac") else 1.0
                ax.plot(steps, [scale * c.get(layer, {}).get(q, math.nan) for c in capacity], marker="o", label=q)
            if title == "connections":
                ax.set_yscale("symlog", linthresh=1)  # a task's few thousand beside the free hundreds of thousands
            ax.set(title=f"{layer}: {title}", xticks=list(steps))
            if r == len(rows) - 1:
                ax.set_xlabel("tasks trained")
            if len(quantities) > 1:
                ax.legend(fontsize=6)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.35 / len(rows), top=1 - 0.3 / len(rows),
                        wspace=0.3, hspace=0.45)
    fig.savefig(path, dpi=100)
    plt.close(fig)
