"""Per-unit hooks on the hidden layers of a masked network: gates, activity, frozen BatchNorm statistics.

One forward hook per hidden layer l, on the module whose output channels are that layer's units before
the nonlinearity (its BatchNorm when it has one, else the weight layer), applies in order:
1. frozen BatchNorm channels (`hold_norms`): units of earlier tasks are normalised with their committed
   running statistics even in training mode, so new units read exactly the features old tasks compute
   at test time; `restore_norms` undoes each batch's update of those statistics (after the step);
2. activity taps (`mean_activity`): Σ ReLU output per unit (a channel: over batch × H × W), before
   gating, e.g. CLNP's pruning criterion and NISPA's candidate selection;
3. gates (`gates[l]`, [units] float or None): the unit's output times its gate. 0 removes a unit (CLNP's
   simulated pruning and single-head test-time mask), a soft value attenuates it (HAT's sigmoid(s·e)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _chan(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *[1] * (like.dim() - 2))  # per-unit vector against [N, C(, H, W)]


class UnitHooks:
    def __init__(self, modules: list, norms: list, taps: list | None = None):
        """modules[l]: the weight layer writing hidden layer l; norms[l]: its BatchNorm2d or None; taps[l]:
        None, or a module applied to the ReLU output before activity is summed (e.g. the max-pool that follows)."""
        self.norms, self.taps = norms, taps or [None] * len(modules)
        self.gates: list = [None] * len(modules)
        self._held: list = [None] * len(modules)  # (frozen units, running mean, running var)
        self._act = self._count = None
        for l, (mod, norm) in enumerate(zip(modules, norms)):
            (mod if norm is None else norm).register_forward_hook(self._hook(l))

    def _hook(self, l: int):
        def hook(module, inputs, out):
            held = self._held[l]
            if held is not None and module.training:
                frozen, mean, var = held
                fixed = F.batch_norm(inputs[0], mean, var, module.weight, module.bias, False, 0.0, module.eps)
                out = torch.where(_chan(frozen, out), fixed, out)
            if self._act is not None:
                a = torch.relu(out) if self.taps[l] is None else self.taps[l](torch.relu(out))
                self._act[l] += a.sum([d for d in range(a.dim()) if d != 1])
                self._count[l] += a.numel() // a.shape[1]
            g = self.gates[l]
            return out if g is None else out * _chan(g, out)
        return hook

    def hold_norms(self, frozen: list) -> None:
        """frozen[l]: bool [units] of hidden layer l whose BatchNorm statistics must not move (None: none)."""
        self._held = [None if f is None or n is None else (f, n.running_mean.clone(), n.running_var.clone())
                      for f, n in zip(frozen, self.norms)]

    @torch.no_grad()
    def restore_norms(self) -> None:
        for norm, held in zip(self.norms, self._held):
            if held is not None:
                frozen, mean, var = held
                norm.running_mean.copy_(torch.where(frozen, mean, norm.running_mean))
                norm.running_var.copy_(torch.where(frozen, var, norm.running_var))

    def clear(self) -> None:
        self.gates, self._held = [None] * len(self.gates), [None] * len(self.gates)

    def mean_activity(self, passes) -> list:
        """Mean ReLU output of every unit over what `passes()` runs through the model (per hidden layer)."""
        self._act, self._count = [0.0] * len(self.gates), [0] * len(self.gates)
        try:
            passes()
            return [a / n for a, n in zip(self._act, self._count)]
        finally:
            self._act = self._count = None

