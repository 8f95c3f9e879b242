"""Accuracy matrices and the standard CL metrics.

R[i][j] = accuracy (percent) on task j's test set after training task i (0-based); NaN where task j
has not been seen yet. Class-IL accuracy takes the argmax over every label seen so far; task-IL takes
the argmax over task j's own labels.
"""
from __future__ import annotations

import math

import torch

from .tracking import names


@torch.no_grad()
def evaluate_tasks(method, stream, task_ids: list, seen_ids: list, batch_size: int) -> tuple[list, list]:
    """Class-IL and task-IL accuracy (percent) on each task in `task_ids`.

    `seen_ids` defines the labels a class-IL prediction may choose from. `method.predict_pair` gives
    both logits from one forward pass where the method allows it.
    """
    model = method.model
    was_training = model.training
    model.eval()
    seen = torch.zeros(stream.n_outputs, dtype=torch.bool, device=method.device)
    for j in seen_ids:
        seen[stream.tasks[j].classes] = True
    counts = []  # per task: (correct class-IL, correct task-IL, n) as device tensors, one sync at the end
    for j in task_ids:
        task = stream.tasks[j]
        lo, hi = task.classes[0], task.classes[-1] + 1
        x, y = task.test.x, task.test.y
        c_cil = torch.zeros((), dtype=torch.long, device=method.device)
        c_til = torch.zeros_like(c_cil)
        for s in range(0, len(y), batch_size):
            xb, yb = x[s:s + batch_size], y[s:s + batch_size]
            logits, logits_til = method.predict_pair(xb, j)
            c_cil += (logits.masked_fill(~seen, float("-inf")).argmax(1) == yb).sum()
            c_til += (logits_til[:, lo:hi].argmax(1) + lo == yb).sum()
        counts.append(torch.stack([c_cil, c_til, torch.tensor(len(y), device=method.device)]))
    model.train(was_training)
    if not counts:
        return [], []
    c = torch.stack(counts).double().cpu()
    acc = (100.0 * c[:, :2] / c[:, 2:3]).tolist()
    return [a[0] for a in acc], [a[1] for a in acc]


# --------------------------------------------------------------------------------------- metrics
def _nanmean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def average_accuracy(R: list) -> float:
    """Mean over tasks of the last row."""
    return _nanmean(R[-1])


def backward_transfer(R: list) -> float:
    """BWT = mean over j < T-1 of R[T-1][j] - R[j][j] (Lopez-Paz & Ranzato 2017). NaN with one row."""
    T = len(R)
    if T < 2:
        return float("nan")
    return _nanmean(R[T - 1][j] - R[j][j] for j in range(T - 1))


def forgetting(R: list) -> float:
    """Mean over j < T-1 of (best accuracy on j in rows j..T-2) - final accuracy on j (Chaudhry et al. 2018).

    Only rows where task j had been trained count, so unseen (NaN) entries never act as zeros.
    """
    T = len(R)
    if T < 2:
        return float("nan")
    drops = []
    for j in range(T - 1):
        earlier = [R[i][j] for i in range(j, T - 1) if not math.isnan(R[i][j])]
        if earlier and not math.isnan(R[T - 1][j]):
            drops.append(max(earlier) - R[T - 1][j])
    return _nanmean(drops)


def forward_transfer(before: list, random_init: list) -> float:
    """FWT = mean over j >= 1 of (accuracy on j just before training it) - (random-init accuracy on j)."""
    return _nanmean(b - r for b, r in zip(before[1:], random_init[1:]))


def summary(R: list, R_til: list) -> dict:
    """The end-of-run CL metrics of both matrices, under their metric names."""
    return {names.final(name + suffix): fn(M) for suffix, M in (("", R), ("_til", R_til))
            for name, fn in (("avg_acc", average_accuracy), ("bwt", backward_transfer), ("forgetting", forgetting))}
