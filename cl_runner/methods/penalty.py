"""What the quadratic-penalty methods share (EWC, online EWC, SI, MAS; ../shared/specs/baselines.md):

    L(θ) = L_task(θ) + strength · [ Σ_i P_i (θ_i − μ_i)² + c ]

a precision P, a centre μ and a constant c per parameter, rebuilt by each method's `consolidate` at the end
of a task. One quadratic costs the same per step however many tasks it sums (offline EWC folds its per-task
terms into one: Σ_t F_t (θ − θ*_t)² = P (θ − μ)² + c with P = Σ_t F_t, μ = Σ_t F_t θ*_t / P). Everything lives in
buffers shaped like the model's parameters, so checkpoints and resume carry it.
"""
from __future__ import annotations

import torch
from torch import nn

from . import Method


class ParamBuffers(nn.Module):
    """One buffer per trainable parameter of `model` (same shape, `slots` stacked in front when given), named
    after it ('.' -> '__'); `list()` returns them in the model's parameter order."""

    def __init__(self, model: nn.Module, slots: int | None = None):
        super().__init__()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for n, p in model.named_parameters():
            if p.requires_grad:
                shape = (slots, *p.shape) if slots else p.shape
                self.register_buffer(n.replace(".", "__"), torch.zeros(shape, device=p.device, dtype=p.dtype))

    def list(self) -> list:
        return [getattr(self, n.replace(".", "__")) for n in self.names]


class QuadraticPenalty(Method):
    strength: float  # set by the subclass from its key (λ/2 for EWC, c for SI, λ for MAS)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.prec, self.centre = ParamBuffers(model), ParamBuffers(model)
        self.register_buffer("const", torch.zeros((), device=device))
        self.register_buffer("tasks_consolidated", torch.zeros((), dtype=torch.long, device=device))
        self._active = False  # whether a penalty exists (the buffer above, read once per task: no sync per step)

    def penalty(self) -> torch.Tensor:
        """Σ_i P_i (θ_i − μ_i)² + c, differentiable in θ."""
        return sum((P * (p - m) ** 2).sum() for P, m, p in zip(self.prec.list(), self.centre.list(), self.params)) + self.const

    def loss(self, logits, y, task):
        loss = super().loss(logits, y, task)
        return loss + self.strength * self.penalty() if self._active else loss

    def begin_task(self, task) -> None:
        self._active = bool(self.tasks_consolidated > 0)

    def end_task(self, task) -> None:
        self.model.eval()
        self.consolidate(task)
        self.model.train()
        self.tasks_consolidated += 1

    def consolidate(self, task) -> None:
        raise NotImplementedError


def per_sample_sum(method: Method, task, x: torch.Tensor, objective, reduce, chunk: int = 256) -> list:
    """Σ over the samples of x of reduce(g), one entry per trainable parameter, where g is the gradient of
    `objective(the model's active logits for one sample, [1, k])`: per-sample gradients vectorised with
    torch.func (vmap of grad of functional_call), `chunk` samples at a time; `reduce` e.g. square or abs."""
    from torch.func import functional_call, grad, vmap

    model = method.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(params, xi):
        logits = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        return objective(method.active(logits, task)[0])

    g_fn = vmap(grad(one), in_dims=(None, 0))
    total = [torch.zeros_like(params[n]) for n in names]
    for s in range(0, len(x), chunk):
        g = g_fn(params, x[s:s + chunk])
        for t, n in zip(total, names):
            t += reduce(g[n]).sum(0)
    return total
