"""A memory of real training samples for methods that replay them, kept as indices so it rides in a
checkpoint as one fixed-size buffer: rows (task, index in that task's training split, label), -1 = empty."""
from __future__ import annotations

import torch


def empty_memory(size: int, device) -> torch.Tensor:
    return torch.full((size, 3), -1, dtype=torch.long, device=device)


@torch.no_grad()
def store_balanced(memory: torch.Tensor, task, seen_classes: list, gen: torch.Generator) -> None:
    """Random class-balanced memory (continuum's RehearsalMemory, herding "random"): after `task`, every seen
    class keeps len(memory) // (classes seen) samples: the task's own classes a random draw of theirs, old
    classes the first of the samples they had."""
    old = memory[memory[:, 0] >= 0]
    quota, rows = len(memory) // len(seen_classes), []
    for c in seen_classes:
        if c in task.classes:
            pool = (task.train.y == c).nonzero().squeeze(1)
            pick = pool[torch.randperm(len(pool), generator=gen)[:quota].to(pool.device)]
            rows.append(torch.stack([torch.full_like(pick, task.id), pick, torch.full_like(pick, c)], 1))
        else:
            rows.append(old[old[:, 2] == c][:quota])
    rows = torch.cat(rows)
    memory.fill_(-1)[:len(rows)] = rows


def gather(memory: torch.Tensor, tasks: list) -> tuple:
    """The stored samples as tensors (x, y) on the data's device; (None, None) when the memory is empty."""
    kept = memory[memory[:, 0] >= 0]
    if not len(kept):
        return None, None
    ids = kept[:, 0].unique().tolist()
    parts = [(tasks[j].train, kept[kept[:, 0] == j][:, 1]) for j in ids]
    return torch.cat([s.x[i] for s, i in parts]), torch.cat([s.y[i] for s, i in parts])


class Replayer:
    """Minibatches of the stored samples (x, y) in reshuffled passes, indexed on the device: no host sync."""

    def __init__(self, x: torch.Tensor | None, y: torch.Tensor | None, batch_size: int, gen: torch.Generator):
        self.x, self.y, self.bs, self.gen = x, y, batch_size, gen
        self.order, self.at = None, 0

    def __bool__(self) -> bool:
        return self.x is not None

    def next(self) -> tuple:
        if self.order is None or self.at >= len(self.order):
            self.order, self.at = torch.randperm(len(self.y), device=self.y.device, generator=self.gen), 0
        idx = self.order[self.at:self.at + self.bs]
        self.at += self.bs
        return self.x[idx], self.y[idx]


@torch.no_grad()
def herding_order(features: torch.Tensor, m: int, mu: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of `m` rows of `features` [N, d] chosen by herding (Welling 2009; iCaRL, Rebuffi et al. 2017,
    Alg. 4): the k-th pick is the row that brings the mean of the picks closest to μ (default: the mean of all
    rows; iCaRL with normalised features: that mean normalised),
    argmin_n ‖(f_n + S_k)/(k + 1) − μ‖ with S_k the sum of the picks so far; a row is picked once. The norm is
    expanded (‖f + S − (k+1)μ‖² = ‖f‖² + 2 f·(S − (k+1)μ) + const): one matrix-vector product per pick, and the
    picks stay on the device (no host sync)."""
    n = len(features)
    m = min(m, n)
    mu = features.mean(0) if mu is None else mu
    sq = (features * features).sum(1)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    picks = torch.empty(m, dtype=torch.long, device=features.device)
    s = torch.zeros_like(mu)
    for k in range(m):
        score = (sq + 2 * features @ (s - (k + 1) * mu)).masked_fill(taken, float("inf"))
        i = score.argmin().view(1)  # a 1-element index tensor: indexing with it never reads it on the host
        picks[k:k + 1] = i
        taken.index_fill_(0, i, True)
        s += features.index_select(0, i)[0]
    return picks
