"""What the replay and distillation baselines share (er, lwf, icarl, dgr; ../shared/specs/baselines.md), as
van de Ven & Tolias 2019 run them (`preprints` branch: train.py, encoder.py `train_a_batch`, utils.py):

- `FrozenCopy`: the model as it was after the previous task (the "previous model" whose outputs label or
  distil replayed inputs), a submodule so that checkpoints carry it;
- `kd_loss`: distillation with temperature T, the old model's probabilities padded with zeros for the
  classes it never saw, × T²;
- `replayed_loss`: the loss on replayed inputs against the previous model's outputs, hard (its argmax) or
  soft (kd_loss) targets, over the seen classes (class-IL) or each previous task's own units, averaged
  over the previous tasks (task-IL);
- `mix`: (1/t)·current + (1 − 1/t)·replayed on task t (1-based; the authors' `rnt`), or
  current + replay_lambda·replayed.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class FrozenCopy(nn.Module):
    """A copy of `model` that never trains: no gradients, always in eval mode; `update` copies the weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FrozenCopy":  # the engine's model.train() never reaches it
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.net.load_state_dict(model.state_dict())


def kd_loss(scores: torch.Tensor, target_scores: torch.Tensor, T: float) -> torch.Tensor:
    """−Σ_c q_c log p_c averaged over the batch, × T² (Hinton et al. 2015; utils.loss_fn_kd): p = softmax(scores/T),
    q = softmax(target_scores/T) padded with zeros up to the width of `scores` (classes the old model never saw)."""
    log_p = F.log_softmax(scores / T, dim=1)
    q = F.softmax(target_scores / T, dim=1)
    if q.shape[1] < scores.shape[1]:
        q = F.pad(q, (0, scores.shape[1] - q.shape[1]))
    return -(q * log_p).sum(1).mean() * T * T


def _targets_loss(scores: torch.Tensor, old: torch.Tensor, targets: str, T: float) -> torch.Tensor:
    if targets == "hard":  # the previous model's argmax over its classes, a prefix of `scores`' columns
        return F.cross_entropy(scores, old.argmax(1))
    return kd_loss(scores, old, T)


def replayed_loss(method, out: torch.Tensor, old: torch.Tensor, task, targets: str, T: float) -> torch.Tensor:
    """Loss of the current model's logits `out` on replayed inputs, whose previous-model logits are `old`.

    Task-incremental (a head per task): per previous task j, its own units only; the mean over j < t.
    Otherwise: the units `method.active` trains on task t (class-IL: the classes seen so far), against the
    previous model's scores for the classes seen before task t."""
    if method.multi_head or method.hp.active_outputs == "task":
        losses = []
        for prev in method.stream.tasks[:task.id]:
            lo, hi = prev.classes[0], prev.classes[-1] + 1
            losses.append(_targets_loss(out[:, lo:hi], old[:, lo:hi], targets, T))
        return sum(losses) / len(losses)
    active, lo = method.active(out, task)
    return _targets_loss(active, old[:, lo:lo + method._seen_width(task.id - 1)], targets, T)


def mix(current: torch.Tensor, replayed: torch.Tensor, task, hp) -> torch.Tensor:
    """The loss of a step with replay: hp.weighting `vdv` = (1/t)·current + (1 − 1/t)·replayed on task t
    (1-based), `sum` = current + hp.replay_lambda·replayed."""
    if hp.weighting == "vdv":
        t = task.id + 1
        return current / t + (1 - 1 / t) * replayed
    return current + hp.replay_lambda * replayed
