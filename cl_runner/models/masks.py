"""Masked layers: which task owns each connection and each unit. One ownership model for every method.

`make_masked(layer)` turns a built `nn.Linear` / `nn.Conv2d` into its masked version in place (same
parameters, same forward) and adds two registered buffers:

    owner       [out, in] int16  FREE, CUT, SPARE, or t: the connection (a conv's k×k kernel) belongs to task t
    unit_owner  [out]     int16  FREE, CANDIDATE, or t: the unit (neuron / feature map) is reserved
                                 (stable, committed) by task t

Connection states: FREE (-1) = absent, nobody's, may be allocated or grown into; CUT (-2) = held at 0 for
good (CLNP's interference weights); SPARE (-3) = present but no task's yet (NISPA's plastic connections
between tasks, taken over by the next one). Unit states: FREE = plastic; CANDIDATE (-2) = proposed for reservation by
the running task (NISPA's candidate stable units); t >= 0 = reserved / stable by task t.
Everything else derives from them ("trainable now", "frozen", "free", capacity; see MaskedNet). The
forward pass needs no mask: a position nobody owns holds an exact 0, which the methods keep so.

The compact fast path (`MaskedLinear.restrict`) runs an MLP layer on the live part of the network
only; `grow_out` / `grow_in` add units to a layer (dynamic expansion, DGM) with fresh FREE ownership.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FREE, CUT, SPARE, CANDIDATE = -1, -2, -3, -2


class Masked:
    """Mixin for nn.Linear / nn.Conv2d: the ownership buffers and what derives from them."""

    owner: torch.Tensor
    unit_owner: torch.Tensor
    live: torch.Tensor | None = None  # MaskedLinear leaf mode: the trained block as a tensor of its own
    run_out: torch.Tensor | None = None  # MaskedLinear: output units computed while restricted

    def commit(self) -> None:
        """Write a trained block back into the weight (MaskedLinear leaf mode; nothing to do otherwise)."""

    def restrict(self, *args, **kwargs) -> None:
        """Only linear layers have the compact path; a conv always runs whole."""

    def _init_ownership(self) -> None:
        out, inp = self.weight.shape[:2]
        dev = self.weight.device
        self.register_buffer("owner", torch.full((out, inp), FREE, dtype=torch.int16, device=dev))
        self.register_buffer("unit_owner", torch.full((out,), FREE, dtype=torch.int16, device=dev))

    # -- shapes ----------------------------------------------------------------------------------
    def expand(self, m: torch.Tensor) -> torch.Tensor:
        """A [out, in] connection mask/score broadcast to the weight's shape."""
        return m.view(*m.shape, *([1] * (self.weight.dim() - 2))).expand_as(self.weight)

    def as_weight(self, m: torch.Tensor) -> torch.Tensor:
        """A [out, in] mask viewed to broadcast against the weight ([out, in, 1, 1] for a conv)."""
        return m.view(*m.shape, *([1] * (self.weight.dim() - 2)))

    def per_connection(self, w: torch.Tensor) -> torch.Tensor:
        """Weight-shaped tensor summed over each connection's elements -> [out, in]."""
        return w if w.dim() == 2 else w.sum(dim=tuple(range(2, w.dim())))

    # -- derived masks ---------------------------------------------------------------------------
    def owned_by(self, t: int) -> torch.Tensor:
        return self.owner == t

    def frozen(self, t: int) -> torch.Tensor:
        """Connections of earlier tasks (cut ones are held at 0 as well: see `held`)."""
        return (self.owner >= 0) & (self.owner < t)

    def held(self, t: int) -> torch.Tensor:
        """Everything task t must not change: earlier tasks' connections and cut ones."""
        return self.frozen(t) | (self.owner == CUT)

    def free(self) -> torch.Tensor:
        return self.owner == FREE

    def free_units(self) -> torch.Tensor:
        return self.unit_owner == FREE

    def reserved_units(self) -> torch.Tensor:
        return self.unit_owner >= 0

    def used_units(self) -> torch.Tensor:
        """Units with at least one incoming connection of any task."""
        return (self.owner >= 0).any(1)

    # -- dynamic expansion -------------------------------------------------------------------------
    @torch.no_grad()
    def grow_out(self, n: int, init=nn.init.zeros_) -> None:
        """Add n output units (rows / channels), FREE, their weights drawn by `init`, biases 0. Existing
        entries keep their values and owners; optimizers over this layer must be rebuilt."""
        w = torch.empty(n, *self.weight.shape[1:], device=self.weight.device, dtype=self.weight.dtype)
        init(w)
        self.weight = nn.Parameter(torch.cat([self.weight, w]))
        if self.bias is not None:
            self.bias = nn.Parameter(torch.cat([self.bias, self.bias.new_zeros(n)]))
        self.owner = torch.cat([self.owner, self.owner.new_full((n, self.owner.shape[1]), FREE)])
        self.unit_owner = torch.cat([self.unit_owner, self.unit_owner.new_full((n,), FREE)])
        self._set_width(out=self.weight.shape[0])

    @torch.no_grad()
    def grow_in(self, n: int) -> None:
        """Add n input columns (the previous layer grew), FREE and exactly 0, so no old unit reads them."""
        w = self.weight
        self.weight = nn.Parameter(torch.cat([w, w.new_zeros(w.shape[0], n, *w.shape[2:])], 1))
        self.owner = torch.cat([self.owner, self.owner.new_full((self.owner.shape[0], n), FREE)], 1)
        self._set_width(inp=self.weight.shape[1])

    def _set_width(self, out: int | None = None, inp: int | None = None) -> None:
        if isinstance(self, nn.Linear):
            self.out_features, self.in_features = out or self.out_features, inp or self.in_features
        else:
            self.out_channels, self.in_channels = out or self.out_channels, inp or self.in_channels


class _GatherMasked(torch.autograd.Function):
    """w[rows][:, cols] (cols None: all) whose gradient, times `mask`, lands in a full-size zero tensor."""

    @staticmethod
    def forward(ctx, w, rows, cols, mask):
        ctx.save_for_backward(rows, cols, mask)
        ctx.shape, ctx.all_cols = w.shape, cols is None
        block = w.index_select(0, rows)
        return block if cols is None else block.index_select(1, cols)

    @staticmethod
    def backward(ctx, g):
        rows, cols, mask = ctx.saved_tensors
        g = g * mask
        if not ctx.all_cols:
            g = g.new_zeros(len(rows), ctx.shape[1]).index_copy_(1, cols, g)
        return g.new_zeros(ctx.shape).index_copy_(0, rows, g), None, None, None


class MaskedLinear(Masked, nn.Linear):
    """A linear layer that can run on the live part of the network only (`restrict`). A task's training
    touches few units; computing just the units that reach a live output gives the same loss and the
    same masked gradients as the full layer at a fraction of the cost. Within that part, the rows that
    hold trainable connections get a weight gradient (masked, in the gather's backward) and the frozen
    rows are a constant block, cached once per plan (their weights cannot change during the phase)."""

    run_in: torch.Tensor | None = None  # input units the previous layer delivers (its run_out), in order
    full_out: bool = False  # scatter the result back to full width (units not run = their bias)

    def restrict(self, run_in=None, train=None, frozen=None, grad_mask=None, full_out: bool = False,
                 leaf: bool = False) -> None:
        """Run on rows `train` (masked gradient) + `frozen` (constant) of columns `run_in`; None: whole layer.
        leaf=True: the block `weight[train][:, run_in]` becomes a tensor of its own (`live`) that an
        optimizer updates in place of the weight, with a compact gradient (masked with `block_mask`);
        `commit()` writes it back. Otherwise the weight's own gradient is masked here."""
        self.commit()
        if train is None:
            self.run_in = self.run_out = None
            return
        self.run_in, self.run_out, self.full_out = run_in, torch.cat([train, frozen]), full_out
        self.rows = train
        pick = (lambda w: w) if run_in is None else (lambda w: w.index_select(1, run_in))
        self.block_mask = pick(grad_mask.index_select(0, train))
        self._frozen = pick(self.weight.detach().index_select(0, frozen))
        if leaf:
            self.live = pick(self.weight.detach().index_select(0, train)).requires_grad_()

    @torch.no_grad()
    def commit(self) -> None:
        if self.live is None:
            return
        if self.run_in is None:
            self.weight.index_copy_(0, self.rows, self.live)
        else:
            self.weight.index_put_((self.rows[:, None], self.run_in[None, :]), self.live)
        self.live = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.run_out is None:
            return super().forward(x)
        w = self.live if self.live is not None else _GatherMasked.apply(self.weight, self.rows, self.run_in,
                                                                        self.block_mask)
        y = torch.cat([F.linear(x, w), F.linear(x, self._frozen)], 1) + self.bias.index_select(0, self.run_out)
        if self.full_out:
            y = self.bias.expand(len(x), -1).index_copy(1, self.run_out, y)
        return y


class MaskedConv2d(Masked, nn.Conv2d):
    pass


_MASKED = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}


def make_masked(layer: nn.Module) -> Masked:
    """Give a built Linear/Conv2d its ownership buffers, keeping its parameters and forward."""
    if isinstance(layer, Masked):
        return layer
    if type(layer) not in _MASKED:
        raise TypeError(f"no masked version of {type(layer).__name__}")
    layer.__class__ = _MASKED[type(layer)]
    layer._init_ownership()
    return layer
