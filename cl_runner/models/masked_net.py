"""A model's masked layers together: what trains in a phase, gradient masking, the compact fast path,
statistics on the trained block, and capacity in one vocabulary.

A method says *what* learns (`train_only`: a connection mask and a bias mask per layer, plus any other
(parameter, mask) pairs such as BatchNorm's), and the mechanism makes it so for any optimizer:
- after backward, gradients outside the masks are zeroed (`mask_grads`); a float mask scales them
  instead (HAT-style soft plasticity);
- with `hold=True` the masked-out entries are also put back after each step (`restore`): momentum,
  weight decay and Adam's moments move entries whose gradient is 0, and frozen weights must stay
  bit-identical;
- parameters with nothing to learn get no gradient at all (requires_grad off for the phase).
With `live_out` on an MLP, only the live part runs (MaskedLinear.restrict): the output units that
matter, and backwards from them the units with a connection into what is kept. With `leaf=True`
(stateless SGD) the trained rows become tensors of their own, so gradients and optimizer steps are
compact too; `block(l)` hands a method the trained block of layer l either way.

Capacity vocabulary (per layer, every quantity a count unless it ends in `_pct`, a percentage):
    conn_task<t>   connections owned by task t (from 1)   conn_free  absent   conn_cut  held at 0 for good
    conn_spare     present, no task's yet
    conn_used_pct  100 · owned / all positions
    units_reserved reserved / stable units            units_new  reserved by the newest task
    units_shared   unreserved units with incoming connections of some task
    units_free     the rest (reserved + shared + free = width)   units_used_pct  100 · reserved / width
    units_reused   units of earlier tasks that the newest task's connections in the next layer read
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .masks import CUT, FREE, SPARE, MaskedLinear, make_masked


@dataclass
class Block:
    """The trained part of weight layer l: rows (and columns; None = all) and its gradient [rows, cols]."""
    rows: torch.Tensor
    cols: torch.Tensor | None
    grad: torch.Tensor


class MaskedNet:
    def __init__(self, model: nn.Module, layers: list, names: list):
        self.model, self.layers, self.names = model, layers, names
        # neuron layers 0..L: inputs, then each weight layer's outputs; group[l] = input columns per unit of
        # weight layer l's input (a dense layer after convs reads C·h·w columns, h·w per feature map)
        self.sizes = [layers[0].weight.shape[1]] + [m.weight.shape[0] for m in layers]
        self.group = [m.weight.shape[1] // self.sizes[l] for l, m in enumerate(layers)]
        self.compact = all(isinstance(m, MaskedLinear) for m in layers)
        self.entries: list = []  # (param, bool mask | None, float mask | None, values to put back | None)
        self.rows: list = [None] * len(layers)  # rows of each layer holding trainable connections
        self._in_backward: set = set()

    @classmethod
    def of(cls, model: nn.Module) -> "MaskedNet":
        """Every weight layer of `model` masked in place, in order: its convs (`conv1`...), dense layers (`fc1`...)
        and output layer (`out`); `layers[l]` writes hidden layer l, the last one the outputs."""
        convs, hidden = list(getattr(model, "convs", [])), list(model.hidden)
        names = [f"conv{i + 1}" for i in range(len(convs))] + [f"fc{i + 1}" for i in range(len(hidden))] + ["out"]
        return cls(model, [make_masked(m) for m in (*convs, *hidden, model.out)], names)

    def cols(self, l: int, units: torch.Tensor) -> torch.Tensor:
        """A per-unit vector of weight layer l's input units, one entry per input column."""
        return units.repeat_interleave(self.group[l]) if self.group[l] > 1 else units

    # -- what trains ---------------------------------------------------------------------------------
    def train_only(self, weights: list, biases: list, extra=(), *, hold: bool, live_out=None,
                   leaf: bool = False) -> None:
        """weights[l]: [out, in] mask of weight layer l's trainable connections (bool, or float to scale the
        gradient); biases[l]: [out] (None: the layer has no bias). extra: more (param, mask | None) pairs.
        live_out: bool [outputs] that reach the loss (enables the compact path on MLPs); leaf: see above."""
        self.release()
        self.entries = []
        pairs = [(m.weight, m.as_weight(w)) for m, w in zip(self.layers, weights)]
        pairs += [(m.bias, b) for m, b in zip(self.layers, biases) if m.bias is not None and b is not None]
        for p, mask in [*pairs, *extra]:
            self._add(p, mask, hold)
        self.rows = [w.bool().any(1).nonzero().squeeze(1) for w in weights]
        if live_out is not None and self.compact:
            self._restrict(weights, live_out, leaf)
        # weights whose gradient the compact path masks in backward already (restricted, not leaf)
        self._in_backward = {id(m.weight) for m in self.layers if m.run_out is not None and m.live is None}
        trained = {id(p) for p, *_ in self.entries}
        for p in self.model.parameters():  # no gradient at all for what cannot change
            p.requires_grad_(id(p) in trained)

    def _add(self, p: torch.Tensor, mask, hold: bool) -> None:
        if mask is None or (mask.dtype == torch.bool and bool(mask.all())):  # wholly trainable
            self.entries.append((p, None, None, None))
        elif bool(mask.any()):
            binary = mask.dtype == torch.bool
            self.entries.append((p, mask if binary else None, mask.float(),
                                 p.detach().clone() if hold and binary else None))

    def _restrict(self, weights: list, live_out: torch.Tensor, leaf: bool) -> None:
        """Outputs in `live_out` with connections, then, layer by layer backwards, the units with a connection
        into the part kept (the rest cannot change the loss); each layer runs its trainable rows + the rest."""
        L = len(self.layers)
        need = [None] * L  # need[l]: outputs of weight layer l that reach the loss
        need[-1] = (self.layers[-1].owner >= 0).any(1) & live_out
        for l in range(L - 1, 0, -1):
            need[l - 1] = (self.layers[l].owner[need[l]] >= 0).any(0)
        run_in = None
        for l, m in enumerate(self.layers):
            mine = weights[l].bool().any(1)
            m.restrict(run_in, (need[l] & mine).nonzero().squeeze(1), (need[l] & ~mine).nonzero().squeeze(1),
                       m.as_weight(weights[l]).expand_as(m.weight).float(), full_out=l == L - 1, leaf=leaf)
            run_in = m.run_out

    def release(self) -> None:
        """The whole network runs again (trained blocks written back); masks stay until the next phase."""
        for m in self.layers:
            m.restrict()

    def end_phase(self) -> None:
        self.release()
        self.entries = []
        for p in self.model.parameters():
            p.requires_grad_(True)

    @property
    def restricted(self) -> bool:
        return self.layers[0].run_out is not None

    def params(self) -> list:
        """What an optimizer updates now: live blocks in leaf mode, else the trained parameters."""
        out = [m.live for m in self.layers if m.live is not None]
        return out + [p for p, *_ in self.entries if not any(p is m.weight for m in self.layers if m.live is not None)]

    # -- the minibatch loop's hooks ------------------------------------------------------------------
    def mask_grads(self) -> None:
        """After backward: gradients outside the masks to 0 (or scaled). A restricted non-leaf layer has
        masked its weight gradient in backward already; a leaf block is masked with its block mask."""
        for m in self.layers:
            if m.live is not None:
                m.live.grad.mul_(m.block_mask)
        for p, _, maskf, _ in self.entries:
            if maskf is not None and p.grad is not None and id(p) not in self._in_backward:
                p.grad.mul_(maskf)

    @torch.no_grad()
    def restore(self) -> None:
        """After a step (hold=True): every masked-out entry back to its value at the start of the phase."""
        for p, mask, _, held in self.entries:
            if held is not None:
                torch.where(mask, p, held, out=p.data)

    def block(self, l: int) -> Block:
        """The trained block of weight layer l and its (masked) gradient after backward."""
        m = self.layers[l]
        if m.live is not None:
            return Block(m.rows, m.run_in, m.live.grad)
        return Block(self.rows[l], None, m.weight.grad.index_select(0, self.rows[l]))

    def block_weight(self, l: int) -> torch.Tensor:
        """The current values of the trained block of layer l (a copy)."""
        m = self.layers[l]
        if m.live is not None:
            return m.live.detach().clone()
        return m.weight.detach().index_select(0, self.rows[l])

    @torch.no_grad()
    def redraw(self, l: int, weights: torch.Tensor, biases, draw) -> None:
        """Fresh values for weight layer l where `weights` ([out, in]) and `biases` ([out]; None: keep all)
        say, drawn by draw(w, b) into new tensors of the layer's shapes; the rest keep theirs (CLNP's weights
        into free neurons, NISPA's non-stable ones at the end of a task)."""
        m = self.layers[l]
        fresh = torch.empty_like(m.weight)
        fresh_b = None if m.bias is None or biases is None else torch.empty_like(m.bias)
        draw(fresh, fresh_b)
        m.weight.copy_(torch.where(m.as_weight(weights), fresh, m.weight))
        if fresh_b is not None:
            m.bias.copy_(torch.where(biases, fresh_b, m.bias))

    # -- capacity ----------------------------------------------------------------------------------
    @torch.no_grad()
    def capacity(self, n_tasks: int, newest: int, units: int | None = None) -> dict:
        """{layer name: {quantity: number}} in the vocabulary above; unit figures for the first `units`
        layers (default: every layer but the output)."""
        units = len(self.layers) - 1 if units is None else units
        out = {}
        for l, (name, m) in enumerate(zip(self.names, self.layers)):
            counts = torch.bincount(m.owner.flatten().long() + 3, minlength=n_tasks + 3).tolist()
            c = {f"conn_task{k + 1}": counts[k + 3] for k in range(n_tasks)}  # tasks named from 1
            c["conn_free"] = counts[FREE + 3]
            for quantity, state in (("conn_cut", CUT), ("conn_spare", SPARE)):
                if counts[state + 3]:
                    c[quantity] = counts[state + 3]
            c["conn_used_pct"] = 100.0 * sum(counts[3:]) / m.owner.numel()
            if l < units:
                reserved, width = m.reserved_units(), len(m.unit_owner)
                shared = ~reserved & m.used_units()
                c.update(units_reserved=int(reserved.sum()), units_shared=int(shared.sum()),
                         units_free=int((~reserved & ~shared).sum()), units_used_pct=100.0 * int(reserved.sum()) / width,
                         units_new=int((m.unit_owner == newest).sum()), units_reused=self._reused(l, newest))
            out[name] = c
        return out

    def _reused(self, l: int, t: int) -> int:
        """Units of layer l reserved before task t that task t's connections in weight layer l + 1 read."""
        nxt, T = self.layers[l + 1], self.layers[l].unit_owner
        read = nxt.owned_by(t).any(0)
        read = read.view(len(T), -1).any(1) if self.group[l + 1] > 1 else read
        return int(((T >= 0) & (T < t) & read).sum())


class BlockSum:
    """A per-connection sum [out, in] (e.g. SpaceNet's Ω) fed each step on the trained block: increments on
    the same block are added up and scattered into the buffer once, when it is next read (`value`). Its row
    and column sums (`track_rows` / `track_cols`) are kept up to date every step from the increments."""

    def __init__(self, buf: torch.Tensor, track_rows: bool = False, track_cols: bool = False):
        self.buf, self.track_rows, self.track_cols = buf, track_rows, track_cols
        self.pending = None  # (rows, cols, summed increments) not yet in buf
        self.resync()

    def add(self, block: Block, inc: torch.Tensor) -> None:
        if self.pending is not None:
            self.pending[2].add_(inc)
        else:
            self.pending = (block.rows, block.cols, inc)  # inc is a fresh tensor each step
        if self.track_rows:
            self.row_sum.index_add_(0, block.rows, inc.sum(1))
        if self.track_cols:
            col = inc.sum(0)
            self.col_sum.add_(col) if block.cols is None else self.col_sum.index_add_(0, block.cols, col)

    def value(self) -> torch.Tensor:
        if self.pending is not None:
            rows, cols, inc = self.pending
            if cols is None:
                self.buf.index_add_(0, rows, inc)
            else:
                self.buf.index_put_((rows[:, None], cols[None, :]), inc, accumulate=True)
            self.pending = None
        return self.buf

    def resync(self) -> None:
        """Settle pending increments and recompute the sums from the buffer (when the block changes)."""
        v = self.value()
        self.row_sum = v.sum(1) if self.track_rows else None
        self.col_sum = v.sum(0) if self.track_cols else None


class PlainSGD:
    """w -= lr·g (no momentum, no decay) over whatever `MaskedNet.params()` is at each step: the tensors
    that train change whenever the trained blocks are re-cut (leaf mode). Stateless, so exact with the
    masks, and without torch.optim, whose first use imports torch._dynamo (1.5 s of a 5 s run)."""

    def __init__(self, params, lr: float):
        self.params, self.param_groups = params, [{"lr": lr}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params() if p.grad is not None]
        torch._foreach_add_(ps, [p.grad for p in ps], alpha=-self.param_groups[0]["lr"])
