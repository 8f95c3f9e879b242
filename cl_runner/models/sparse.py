"""Masked layers with ownership: which task allocated each connection, and which units are reserved.

`make_sparse(layer)` turns an `nn.Linear` / `nn.Conv2d` of a built model into its masked version in
place (same parameters, same forward) and adds two registered buffers:

    owner       [out, in]  int16  -1 = free, t = allocated by task t (a conv's unit is its k×k kernel)
    unit_owner  [out]      int16  -1 = free unit, t = unit (neuron / feature map) reserved by task t

Everything else derives from them: "trainable now" (owner == t), "frozen" (0 <= owner < t), "free"
(owner < 0), free units, and the capacity figures. The forward pass needs no mask: a position that no
task owns holds an exact 0, which the methods keep so (gradient masking, zeroing on drop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FREE = -1


class _Owned:
    """Mixin for nn.Linear / nn.Conv2d: the ownership buffers and what derives from them."""

    owner: torch.Tensor
    unit_owner: torch.Tensor
    live: torch.Tensor | None = None  # SparseLinear leaf mode: the trained block as a tensor of its own

    def commit(self) -> None:
        """Write a trained block back into the weight (SparseLinear leaf mode; nothing to do otherwise)."""

    def _init_ownership(self) -> None:
        out, inp = self.weight.shape[:2]
        dev = self.weight.device
        self.register_buffer("owner", torch.full((out, inp), FREE, dtype=torch.int16, device=dev))
        self.register_buffer("unit_owner", torch.full((out,), FREE, dtype=torch.int16, device=dev))

    # -- shapes ----------------------------------------------------------------------------------
    def expand(self, m: torch.Tensor) -> torch.Tensor:
        """A [out, in] connection mask/score broadcast to the weight's shape."""
        return m.view(*m.shape, *([1] * (self.weight.dim() - 2))).expand_as(self.weight)

    def per_connection(self, w: torch.Tensor) -> torch.Tensor:
        """Weight-shaped tensor summed over each connection's elements -> [out, in]."""
        return w if w.dim() == 2 else w.sum(dim=tuple(range(2, w.dim())))

    # -- derived masks ---------------------------------------------------------------------------
    def owned_by(self, t: int) -> torch.Tensor:
        return self.owner == t

    def frozen(self, t: int) -> torch.Tensor:
        return (self.owner >= 0) & (self.owner < t)

    def free(self) -> torch.Tensor:
        return self.owner < 0

    def free_units(self) -> torch.Tensor:
        return self.unit_owner < 0

    def used_units(self) -> torch.Tensor:
        """Units with at least one incoming connection of any task."""
        return (self.owner >= 0).any(1)

    # -- capacity --------------------------------------------------------------------------------
    def capacity(self, n_tasks: int, units: bool = True) -> dict:
        """Connections per task and free; reserved / shared / free units (each group sums to its total)."""
        counts = torch.bincount((self.owner.flatten().long() + 1), minlength=n_tasks + 1).tolist()
        out = {f"conn_task{k}": counts[k + 1] for k in range(n_tasks)}
        out["conn_free"] = counts[0]
        out["used_frac"] = 1.0 - counts[0] / self.owner.numel()
        if units:
            reserved = ~self.free_units()
            shared = ~reserved & self.used_units()
            out["units_reserved"] = int(reserved.sum())
            out["units_shared"] = int(shared.sum())
            out["units_free"] = int((~reserved & ~shared).sum())
        return out


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


class SparseLinear(_Owned, nn.Linear):
    """A linear layer that can run on the live part of the network only (`restrict`). A task's training
    touches few units; computing just the units that reach a live output gives the same loss and the
    same masked gradients as the full layer at a fraction of the cost. Within that part, the rows that
    hold trainable connections get a weight gradient (masked, in the gather's backward) and the frozen
    rows are a constant block, cached once per plan (their weights cannot change during the task)."""

    run_in: torch.Tensor | None = None  # input units the previous layer delivers (its run_out), in order
    run_out: torch.Tensor | None = None  # output units computed: the trainable rows, then the frozen ones
    full_out: bool = False  # scatter the result back to full width (units not run = their bias)

    def restrict(self, run_in=None, train=None, frozen=None, grad_mask=None, full_out: bool = False,
                 leaf: bool = False) -> None:
        """Run on rows `train` (masked gradient) + `frozen` (constant) of columns `run_in`; None: whole layer.
        leaf=True: the block `weight[train][:, run_in]` becomes a tensor of its own (`live`) that an
        optimizer updates in place of the weight, with a compact gradient (the caller masks it with
        `block_mask`); `commit()` writes it back. Otherwise the weight's own gradient is masked here."""
        self.commit()
        if train is None:
            self.run_in = self.run_out = None
            return
        self.run_in, self.run_out, self.full_out = run_in, torch.cat([train, frozen]), full_out
        self._rows = train
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
            self.weight.index_copy_(0, self._rows, self.live)
        else:
            self.weight.index_put_((self._rows[:, None], self.run_in[None, :]), self.live)
        self.live = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.run_out is None:
            return super().forward(x)
        w = self.live if self.live is not None else _GatherMasked.apply(self.weight, self._rows, self.run_in,
                                                                        self.block_mask)
        y = torch.cat([F.linear(x, w), F.linear(x, self._frozen)], 1) + self.bias.index_select(0, self.run_out)
        if self.full_out:
            y = self.bias.expand(len(x), -1).index_copy(1, self.run_out, y)
        return y


class SparseConv2d(_Owned, nn.Conv2d):
    pass


_SPARSE = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def make_sparse(layer: nn.Module) -> _Owned:
    """Give a built Linear/Conv2d its ownership buffers, keeping its parameters and forward."""
    if isinstance(layer, _Owned):
        return layer
    if type(layer) not in _SPARSE:
        raise TypeError(f"no masked version of {type(layer).__name__}")
    layer.__class__ = _SPARSE[type(layer)]
    layer._init_ownership()
    return layer
