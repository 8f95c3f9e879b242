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
    """Side-by-side heatmaps of the class-IL and task-IL accuracy matrices, tasks numbered from 1 (a joint
    run's single row, every task trained at once, is labelled "all")."""
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
        rows = ["all"] if len(R) == 1 < len(R[0]) else [str(i + 1) for i in range(len(R))]
        ax.set(title=f"{title} accuracy (%)", xlabel="evaluated on task", ylabel="after training task",
               xticks=range(len(R[0])), xticklabels=[str(j + 1) for j in range(len(R[0]))],
               yticks=range(len(R)), yticklabels=rows)
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


def _label(quantity: str) -> str:
    """A legend entry: conn_task<t> (tasks named from 1) reads "task t"."""
    t = quantity.removeprefix("conn_task")
    return f"task {t}" if quantity.startswith("conn_task") and t.isdigit() else quantity


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
    each reported quantity against the number of tasks trained. Shares are percentages: `*_pct` as they are,
    `*_frac` (0-1) times 100, under a "(%)" title; a task's connections are labelled from task 1."""
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
                ax.plot(steps, [scale * c.get(layer, {}).get(q, math.nan) for c in capacity], marker="o", label=_label(q))
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


def mean_std_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per number of tasks trained t (index t - 1): mean and std (ddof=1, as the report's table; NaN from one
    value) over the curves that have a value there. A curve shorter than the longest (an unfinished run) or
    with a NaN counts where it has values."""
    mean, std = [], []
    for t in range(max((len(c) for c in curves), default=0)):
        vals = [c[t] for c in curves if t < len(c) and c[t] is not None and not math.isnan(c[t])]
        m = sum(vals) / len(vals) if vals else math.nan
        mean.append(m)
        std.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan)
    return mean, std


def seen_accuracy_figure(lines: list[tuple[str, str, list[list[float]]]], path: Path) -> None:
    """The figure papers show for a table: average accuracy over the tasks seen so far (%) after each task.
    `lines`: (panel title, label, one curve per seed), a subplot per title (a dataset × scenario, in sorted
    order), a line per label with a mean ± std band over its seeds. A label keeps its colour and style across
    panels; the legend, in the order of `lines`, sits beside the panels so that it covers no line."""
    plt = _plt()
    panels: dict[str, list] = {title: [] for title in sorted({title for title, _, _ in lines})}
    for title, label, curves in lines:
        panels[title].append((label, curves))
    labels = list(dict.fromkeys(label for _, label, _ in lines))
    colours = plt.get_cmap("tab10").colors  # past 10 labels the colours repeat with another dash and marker
    style = {label: (colours[i % 10], ("-", "--", ":", "-.")[i // 10 % 4], "osD^"[i // 10 % 4])
             for i, label in enumerate(labels)}
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    handles = {}
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        n_tasks = max(len(c) for _, curves in lines for c in curves)
        low = 100.0  # the panel's lowest band edge: its y axis starts at a multiple of 10, 2 points or more below
        for label, curves in lines:
            mean, std = mean_std_curve(curves)
            steps = list(range(1, len(mean) + 1))
            colour, dash, marker = style[label]
            if len(mean) == 1 < n_tasks:  # trained once on every task (joint): its level, drawn across
                steps, mean, std, marker, dash = [1, n_tasks], mean * 2, std * 2, "", (0, (1, 1))
                label_shown = f"{label} (all tasks at once)"
            else:
                label_shown = label
            handles[label], = ax.plot(steps, mean, color=colour, linestyle=dash, marker=marker, markersize=3.5,
                                      linewidth=1.4, label=label_shown, clip_on=False)  # 100 % stays whole
            lo = [m - s if not math.isnan(s) else m for m, s in zip(mean, std)]
            hi = [m + s if not math.isnan(s) else m for m, s in zip(mean, std)]
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
            low = min([low, *lo])
        ax.set(title=title, xlabel="tasks trained", ylabel="average accuracy on tasks seen (%)",
               xticks=list(range(1, n_tasks + 1)), xlim=(0.8, n_tasks + 0.2),
               ylim=(max(0, 10 * math.floor((low - 2) / 10)), 100))  # task-IL panels: ~70-100, not 0-100
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    legend = [handles[label] for label in labels]
    fig.legend(legend, [h.get_label() for h in legend], loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8, title="mean ± std over seeds", title_fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend sits outside the axes: keep it in the file
    plt.close(fig)
