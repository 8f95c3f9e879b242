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


def capacity_plot(capacity: list, path: Path) -> None:
    """One panel per layer: every reported quantity against the number of tasks trained."""
    plt = _plt()
    layers = list(capacity[-1])
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3), squeeze=False)
    steps = range(1, len(capacity) + 1)
    for ax, layer in zip(axes[0], layers):
        for q in capacity[-1][layer]:
            ax.plot(steps, [c.get(layer, {}).get(q, float("nan")) for c in capacity], marker="o", label=q)
        ax.set(title=layer, xlabel="tasks trained", xticks=list(steps))
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.3 / len(layers), right=0.98, bottom=0.16, top=0.9, wspace=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
