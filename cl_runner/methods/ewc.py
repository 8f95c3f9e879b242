"""EWC (Kirkpatrick et al. 2017) as van de Ven & Tolias 2019 run it (`preprints` branch: continual_learner.py,
train.py; ../shared/specs/baselines.md). Offline: one penalty per task,

    L = L_task + λ/2 · Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²,

θ*_t the parameters after task t, F_t the diagonal Fisher on task t's training set, one sample at a time,
with the model's own predicted label, softmax over the classes active in training (`Method.active`).
online_ewc.py keeps one running Fisher instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import METHODS
from .penalty import ParamBuffers, QuadraticPenalty, per_sample_sum
from .schemas import EWCConfig


@METHODS.register("ewc", EWCConfig)
class EWC(QuadraticPenalty):
    online = False

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.strength = self.hp.lam / 2
        slots = 1 if self.online else len(stream.tasks)  # offline: every task's (θ*_t, F_t) is kept
        self.fisher, self.anchor = ParamBuffers(model, slots), ParamBuffers(model, slots)

    @torch.no_grad()
    def fisher_diag(self, task) -> list:
        """F_i = Σ_n (∂ −log p(ŷ_n | x_n) / ∂θ_i)² / (N − 1), ŷ_n = the model's argmax over the active classes.
        ÷ (N − 1), not N: the 2019 code divides by the last sample's index (estimate_fisher)."""
        def nll(active):  # per sample; the argmax label is a constant (no gradient through it)
            return F.cross_entropy(active, active.argmax(1), reduction="none")

        n = len(task.train.y)
        return [f / max(n - 1, 1) for f in per_sample_sum(self, task, task.train.x, nll, torch.square)]

    @torch.no_grad()
    def consolidate(self, task) -> None:
        t = int(self.tasks_consolidated)
        new = self.fisher_diag(task)
        for f_buf, a_buf, f, p in zip(self.fisher.list(), self.anchor.list(), new, self.params):
            self.store(f_buf, f)
            a_buf[0 if self.online else t] = p
        self.fold(t + 1)

    def store(self, f_buf: torch.Tensor, f: torch.Tensor) -> None:
        f_buf[int(self.tasks_consolidated)] = f

    def fold(self, n: int) -> None:
        """P, μ, c of the penalty from the n stored tasks: Σ_t F_t (θ − θ*_t)² = P (θ − μ)² + c, in float64
        (one task: μ = θ* and c = 0 exactly)."""
        const = torch.zeros((), dtype=torch.float64, device=self.device)
        for P, mu, f_buf, a_buf in zip(self.prec.list(), self.centre.list(), self.fisher.list(), self.anchor.list()):
            f, a = f_buf[:n].double(), a_buf[:n].double()
            p_sum, s = f.sum(0), (f * a).sum(0)
            m = torch.where(p_sum > 0, s / p_sum.clamp_min(1e-300), a[-1])
            const += (f * a * a).sum() - (p_sum * m * m).sum()
            P.copy_(p_sum)
            mu.copy_(m)
        self.const.copy_(const)
