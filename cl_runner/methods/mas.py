"""Memory Aware Synapses (Aljundi et al. 2018, Eq. 2-4): after each task the importance of parameter i is
Ω_i += (1/N) Σ_n |∂ ‖f(x_n)‖² / ∂θ_i| over the task's training set (no labels), f the output units active in
training (`Method.active`), per-sample gradients vectorised with torch.func; then the penalty
λ Σ_i Ω_i (θ_i − θ*_i)² pulls towards θ* = the parameters after the task. Ω accumulates over tasks (the paper).
"""
from __future__ import annotations

import torch

from . import METHODS
from .penalty import QuadraticPenalty, per_sample_sum
from .schemas import MASConfig


@METHODS.register("mas", MASConfig)
class MAS(QuadraticPenalty):
    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.strength = self.hp.lam

    @torch.no_grad()
    def consolidate(self, task) -> None:
        n = len(task.train.y)
        imp = per_sample_sum(self, task, task.train.x, lambda out: (out ** 2).sum(1), torch.abs)
        for omega, centre, i, p in zip(self.prec.list(), self.centre.list(), imp, self.params):
            omega += i / n
            centre.copy_(p)
