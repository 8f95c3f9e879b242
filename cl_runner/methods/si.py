"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017) as van de Ven & Tolias 2019 run it (`preprints`:
train.py, continual_learner.py; ../shared/specs/baselines.md). After every optimizer step the running path
integral W_i −= g_i Δθ_i, g the gradient of the total loss (the surrogate included) and Δθ the step's change;
at the end of a task Ω_i += W_i / ((θ_i − θ_i^start)² + ξ) and the surrogate loss c Σ_i Ω_i (θ_i − θ*_i)² pulls
towards θ* = the parameters after it (θ^start: after the previous task, or the initial ones).
"""
from __future__ import annotations

import torch

from . import METHODS
from .penalty import ParamBuffers, QuadraticPenalty
from .schemas import SIConfig


@METHODS.register("si", SIConfig)
class SI(QuadraticPenalty):
    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.strength = self.hp.c
        # W (this task's path integral), θ before the current step, θ at the start of this task
        self.w, self.prev, self.start = ParamBuffers(model), ParamBuffers(model), ParamBuffers(model)
        with torch.no_grad():
            torch._foreach_copy_(self.start.list(), self.params)  # a resumed run loads its own over these

    @torch.no_grad()
    def begin_task(self, task) -> None:
        super().begin_task(task)
        torch._foreach_zero_(self.w.list())
        torch._foreach_copy_(self.prev.list(), self.params)

    @torch.no_grad()
    def after_step(self, task) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        delta = torch._foreach_sub(self.params, self.prev.list())
        torch._foreach_mul_(delta, grads)
        torch._foreach_sub_(self.w.list(), delta)  # W −= g Δθ
        torch._foreach_copy_(self.prev.list(), self.params)

    @torch.no_grad()
    def consolidate(self, task) -> None:
        for omega, centre, w, start, p in zip(self.prec.list(), self.centre.list(), self.w.list(),
                                              self.start.list(), self.params):
            omega += w / ((p - start) ** 2 + self.hp.xi)
            centre.copy_(p)
            start.copy_(p)
