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


def per_sample_sum(method: Method, task, x: torch.Tensor, objective, reduce, chunk: int = 1024,
                   func: bool = False) -> list:
    """Σ_n reduce(g_n), one entry per trainable parameter, g_n the gradient of `objective(active logits)[n]` for
    sample n alone (objective: [N, k] -> [N] per-sample values; reduce: torch.square or torch.abs), `chunk`
    samples at a time. Per-sample gradients are vectorised with torch.func (vmap of grad of functional_call);
    a model whose trainable parameters all sit in nn.Linear layers takes the exact shortcut of `_linear_sum`
    (unless `func`): on the 784-400-400-10 MLP the torch.func path costs ~4 s per 1000 samples on one CPU
    core (it writes every sample's 478k gradients), the shortcut a fraction of a training step."""
    linear = None if func else _linear_layers(method.model)
    chunk = chunk if linear else min(chunk, 64)  # torch.func: [chunk, *shape] per parameter in memory
    total = None
    for s in range(0, len(x), chunk):
        part = _linear_sum(method, task, x[s:s + chunk], objective, reduce, linear) if linear else \
            _func_sum(method, task, x[s:s + chunk], objective, reduce)
        total = part if total is None else [t + p for t, p in zip(total, part)]
    return total


def _func_sum(method, task, x, objective, reduce) -> list:
    from torch.func import functional_call, grad, vmap

    model = method.model
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(params, xi):
        logits = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        return objective(method.active(logits, task)[0]).sum()

    g = vmap(grad(one), in_dims=(None, 0))(params, x)  # {name: [N, *shape]}
    return [reduce(g[n]).sum(0) for n in params]


def _linear_layers(model: nn.Module) -> list | None:
    """The model's nn.Linear layers in parameter order when they hold every trainable parameter, else None."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owned = {id(p) for m in layers for p in m.parameters()}
    if not layers or any(id(p) not in owned for p in model.parameters() if p.requires_grad):
        return None
    return layers


def _linear_sum(method, task, x, objective, reduce, layers) -> list:
    """The same sums without materialising per-sample gradients: for a linear layer z = W a + b, sample n's
    gradient is δ_n a_nᵀ (δ_n = ∂objective_n/∂z_n), and for reduce = square or abs f(δ a) = f(δ) f(a), so
    Σ_n f(g_n) = f(δ)ᵀ f(a) (a matmul) and Σ_n f(δ_n) for the bias. δ_n comes from one backward of Σ_n objective_n
    (samples do not interact in an eval-mode forward pass)."""
    inputs, outputs = {}, {}

    def hook(mod, args, out):  # each layer runs once per forward pass
        inputs[mod] = args[0].detach().flatten(0, -2)  # a: [N, in]
        outputs[mod] = out  # z: [N, out]

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            out = objective(method.active(method.model(x), task)[0]).sum()
            deltas = torch.autograd.grad(out, [outputs[m] for m in layers])
    finally:
        for h in handles:
            h.remove()
    sums = {}
    for m, d in zip(layers, deltas):
        d, a = reduce(d.flatten(0, -2)), reduce(inputs[m])
        sums[id(m.weight)] = d.T @ a
        if m.bias is not None:
            sums[id(m.bias)] = d.sum(0)
    return [sums[id(p)] for p in method.model.parameters() if p.requires_grad]
