"""SpaceNet (Sokar, Mocanu, Pechenizkiy 2021): sparse connections per task, compacted by adaptive sparse
training, and neurons reserved per task. Read beside ../shared/specs/spacenet.md; [release] marks the
authors' code where the paper is vague, and each such choice is a key in conf/method/spacenet.yaml.

Per task t (spec steps): 1 allocate `n_l` connections among `sel` random free neurons per layer (Alg. 2);
2 train only task-t weights (Eq. 1); 3 connection importance Ω += |Δw·g| (Eqs. 2-3) and neuron
importance a (Eq. 4, accumulated every step [release]); 4 drop the fraction r of least important
task-t connections and grow as many where G = a_out·a_inᵀ is largest (Eq. 5, Alg. 3); 5 reserve the
`spec` most important neurons (Alg. 4); 6 set the task's classifier rows aside (Alg. 1 l. 14-15).
Variants by config: static_sparse (rewire=false), spacenet_rehearsal (rehearsal=true), the CNN (a
connection is a k×k kernel, a neuron a feature map).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig, key
from ..data import Split
from ..errors import CapacityError, ConfigError
from ..models.sparse import FREE, SparseLinear, make_sparse
from . import METHODS, Method, spacenet_plots


@dataclass
class SpaceNetConfig(MethodConfig):
    init: str = key(choices=("xavier", "model"))
    sel: List[int] = key(ge=0, per_layer="hidden")  # 0 = every free neuron
    spec: List[int] = key(ge=0, per_layer="hidden")
    budget_unit: str = key(choices=("selected", "layer", "count"))
    budget: List[float] = key(gt=0, per_layer="weights")
    rewire: bool = key()
    r: float = key(ge=0, lt=1)
    rewire_output: bool = key()
    rewire_last_epoch: bool = key()
    grow: str = key(choices=("top", "sample"))
    neuron_importance: str = key(choices=("cumulative", "sum"))
    importance_reset: str = key(choices=("task", "epoch"))
    train_bias: str = key(choices=("free", "selected", "none"))
    out_bias: str = key(choices=("task", "seen"))
    set_aside: bool = key()
    rehearsal: bool = key()
    memory: int = key(ge=0)  # stored samples per old task; 0 = all its training data
    figures: bool = key()


def _widths(model_cfg) -> list:
    return [*model_cfg.get("channels", []), *model_cfg.hidden]


def _fit(cfg, l: int, n_in: int, n_out: int, total: int, name: str) -> int:
    """n_l for weight layer l (`total` connections, `n_in × n_out` positions between selected neurons);
    a budget that cannot fit those positions is a one-line ConfigError."""
    b, unit = cfg.method.budget[l], cfg.method.budget_unit
    if unit == "count" and b != int(b):
        raise ConfigError(f"method.budget[{l}]={b} must be a whole number of connections (budget_unit=count)")
    if unit != "count" and b > 1:
        raise ConfigError(f"method.budget[{l}]={b} must be a fraction <= 1 (budget_unit={unit})")
    n = int(b) if unit == "count" else max(1, round(b * (total if unit == "layer" else n_in * n_out)))
    if n > n_in * n_out:
        raise ConfigError(f"method.budget[{l}]={b:g} asks for {n} connections in {name} but only "
                          f"{n_in} x {n_out} = {n_in * n_out} positions join its selected neurons "
                          "(lower method.budget or raise method.sel)")
    return n


class PlainSGD:
    """w -= lr·g, the release's optimizer (no momentum, no decay), without torch.optim: its first use
    imports torch._dynamo, 1.5 s of a 5 s run. `params` is a callable: the tensors that train change
    whenever the trained block is re-cut (SparseLinear leaf mode)."""

    def __init__(self, params, lr: float):
        self.params, self.param_groups = params, [{"lr": lr}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params() if p.grad is not None]
        torch._foreach_add_(ps, [p.grad for p in ps], alpha=-self.param_groups[0]["lr"])


@METHODS.register("spacenet", SpaceNetConfig)
class SpaceNet(Method):
    @staticmethod
    def check_config(cfg) -> None:
        m, widths = cfg.method, _widths(cfg.model)
        for i, (w, s, p) in enumerate(zip(widths, m.sel, m.spec)):
            if s > w:
                raise ConfigError(f"method.sel={s} exceeds the {w} units of hidden layer {i + 1}")
            if p > (s or w):
                raise ConfigError(f"method.spec={p} exceeds method.sel={s or w} in hidden layer {i + 1}")
        sizes, n_conv = [s or w for s, w in zip(m.sel, widths)], len(cfg.model.get("channels", []))
        for i in range(1, len(widths)):  # the layers whose size needs the data are checked in __init__
            if i != n_conv:
                _fit(cfg, i, sizes[i - 1], sizes[i], widths[i - 1] * widths[i], f"weight layer {i + 1}")
        if m.rehearsal and cfg.model.head != "single":
            raise ConfigError("method.rehearsal=true replays old classes: it needs model.head=single")

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        hp = self.hp
        self.layers = [make_sparse(m) for m in (*getattr(model, "convs", []), *model.hidden, model.out)]
        n_conv = len(getattr(model, "convs", []))
        self.names = [f"conv{i + 1}" for i in range(n_conv)] + [f"fc{i + 1}" for i in range(len(model.hidden))] + ["out"]
        L = len(self.layers)
        self.compact = all(isinstance(m, SparseLinear) for m in self.layers)  # MLPs train their live part only
        # neuron layers 0..L: inputs, hidden, outputs; `group[l]` = inputs of weight layer l per neuron
        self.sizes = [self.layers[0].weight.shape[1]] + [m.weight.shape[0] for m in self.layers]
        self.group = [m.weight.shape[1] // self.sizes[l] for l, m in enumerate(self.layers)]
        self.gen = torch.Generator().manual_seed(cfg.seed)  # structure decisions (per task / epoch, on CPU)
        self.exact = hp.optimizer == "sgd" and hp.momentum == 0 and hp.weight_decay == 0
        if hp.init == "xavier":  # spec defaults: Xavier-uniform weights, zero biases
            for m in self.layers:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # new connections start from these initial values [release]; no connection exists before task 0
        for l, m in enumerate(self.layers):
            self.register_buffer(f"init_{l}", m.weight.detach().clone())
            self.register_buffer(f"omega_{l}", torch.zeros(m.owner.shape, device=device))
            m.weight.data.zero_()
        for n in range(L + 1):
            self.register_buffer(f"imp_{n}", torch.zeros(self.sizes[n], device=device))  # a_n, Eq. 4
            self.register_buffer(f"sel_{n}", torch.zeros(self.sizes[n], dtype=torch.bool, device=device))
        self.register_buffer("aside", torch.zeros_like(model.out.weight))  # W_L^saved
        self.register_buffer("task", torch.tensor(-1))
        # Ω is needed where connections rewire and where neuron importance comes from (hidden layers)
        self.tracked = list(range(L - 1)) + ([L - 1] if hp.rewire_output else [])
        # the budget must fit the positions task 0 will offer (needs the data's input size and classes)
        sel = [self.sizes[0], *(s or w for s, w in zip(hp.sel, self.sizes[1:L])), stream.classes_per_task]
        for l in range(L):
            _fit(cfg, l, sel[l] * self.group[l], sel[l + 1], self.layers[l].owner.numel(), self.names[l])
        self.figdata: dict = {}  # what the paper's figures need, captured on the way (plain data)
        self._pending: dict = {}  # layer -> Ω increments on self.rows[layer] not yet added (see omega())

    def budget(self, l: int) -> int:
        """n_l, the connections task t allocates in weight layer l (step 1)."""
        b, unit, m = self.hp.budget[l], self.hp.budget_unit, self.layers[l]
        if unit == "count":
            return int(b)
        n = m.owner.numel() if unit == "layer" else int(self._sel_in(l).sum()) * int(self.selected(l + 1).sum())
        return max(1, round(b * n))

    # -- helpers -------------------------------------------------------------------------------
    def make_optimizer(self, params, lr: float | None = None):
        if not self.exact:
            return super().make_optimizer(params, lr)
        return PlainSGD(lambda: [p for m in self.layers for p in (m.weight if m.live is None else m.live, m.bias)],
                        self.hp.lr if lr is None else lr)

    def omega(self, l: int) -> torch.Tensor:
        """Ω of weight layer l; the increments gathered per step on a block of it are added in first."""
        om = getattr(self, f"omega_{l}")
        if l in self._pending:
            rows, cols, inc = self._pending.pop(l)
            if cols is None:
                om.index_add_(0, rows, inc)
            else:
                om.index_put_((rows[:, None], cols[None, :]), inc, accumulate=True)
        return om

    def imp(self, n: int) -> torch.Tensor:
        """Neuron importance a_n (0 for reserved neurons), from the accumulated or the current Ω."""
        if self.hp.neuron_importance == "cumulative":
            a = getattr(self, f"imp_{n}")
        else:  # Eq. 4 as printed: sum of the current Ω (inputs: of their outgoing connections)
            a = self.omega(0).sum(0) if n == 0 else self.omega(n - 1).sum(1)
        return a if n == 0 or n == len(self.layers) else a * self.layers[n - 1].free_units()

    def selected(self, n: int) -> torch.Tensor:
        return getattr(self, f"sel_{n}")

    def _refresh_masks(self, t: int) -> None:
        """Gradient masks: task-t connections; biases per the spec (step 2); snapshots if not exact."""
        L = len(self.layers)
        self.wmask, self.bmask = [], []
        for l, m in enumerate(self.layers):
            self.wmask.append(m.expand(m.owned_by(t)).float())
            if l == L - 1:  # the task's classes; `seen`: every class learned so far too (e.g. with replay)
                b = self.selected(L) | (self.aside.any(1) | self.layers[-1].owner.ge(0).any(1)
                                        if self.hp.out_bias == "seen" else False)
            elif self.hp.train_bias == "free":  # incl. neurons shared with earlier tasks [release]
                b = m.free_units()
            elif self.hp.train_bias == "selected":
                b = self.selected(l + 1)
            else:
                b = torch.zeros_like(self.selected(l + 1))
            self.bmask.append(b.float())
        if not self.exact:  # momentum / weight decay / Adam move zero-grad weights: restore after step
            self.snap = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in self.layers]
        for l in self.tracked:  # settle Ω on the old rows before the rows change
            self.omega(l)
        self.rows = {l: self.layers[l].owned_by(t).any(1).nonzero().squeeze(1) for l in self.tracked}
        self.row_sum = {l: self.omega(l).sum(1) for l in self.tracked}
        self.col_sum = self.omega(0).sum(0)
        self._restrict(t)

    def _restrict(self, t: int | None) -> None:
        """Train an MLP on its live part only: output rows with live connections, then, layer by layer
        backwards, the units with a connection into the part kept (the rest cannot change the loss)."""
        if not self.compact:
            return
        if t is None:
            for m in self.layers:
                m.restrict()
            return
        L, out = len(self.layers), self.layers[-1]
        need = [None] * L  # need[l]: outputs of weight layer l that reach the loss
        need[-1] = (out.owner >= 0).any(1) & (self.selected(L) if self.hp.set_aside else True)
        for l in range(L - 1, 0, -1):
            need[l - 1] = (self.layers[l].owner[need[l]] >= 0).any(0)
        run_in = None
        for l, m in enumerate(self.layers):
            mine = m.owned_by(t).any(1)
            m.restrict(run_in, (need[l] & mine).nonzero().squeeze(1), (need[l] & ~mine).nonzero().squeeze(1),
                       self.wmask[l], full_out=l == L - 1, leaf=self.exact)
            run_in = m.run_out

    # -- step 1: allocation (Alg. 2) ---------------------------------------------------------------
    def begin_task(self, task) -> None:
        t = int(self.task) + 1
        self.task.fill_(t)
        L, hp = len(self.layers), self.hp
        self.selected(0).fill_(True)  # input neurons are all eligible
        for n in range(1, L):
            free = self.layers[n - 1].free_units().nonzero().squeeze(1).cpu()
            k = hp.sel[n - 1] or len(free)
            if len(free) < max(k, hp.spec[n - 1], 1):
                raise CapacityError(f"task {t}: {self.names[n - 1]} has {len(free)} free neurons left, "
                                    f"fewer than method.sel={k} / method.spec={hp.spec[n - 1]}")
            pick = free[torch.randperm(len(free), generator=self.gen)[:k]]  # at random [release]
            self.selected(n).zero_()[pick.to(self.device)] = True
        self.selected(L).zero_()[task.classes] = True
        for l, m in enumerate(self.layers):
            avail = self._allowed(l).flatten().nonzero().squeeze(1).cpu()
            n_l = self.budget(l)
            if len(avail) < n_l:
                raise CapacityError(f"task {t}: {self.names[l]} has "
                                    f"{len(avail)} free positions between the selected neurons, "
                                    f"fewer than the {n_l} connections of the budget")
            new = avail[torch.randperm(len(avail), generator=self.gen)[:n_l]].to(self.device)
            m.owner.view(-1)[new] = t
            m.weight.data.view(m.owner.numel(), -1)[new] = getattr(self, f"init_{l}").view(m.owner.numel(), -1)[new]
        for l in range(L):
            self.omega(l).zero_()
        for n in range(L + 1):
            getattr(self, f"imp_{n}").zero_()
        self._refresh_masks(t)
        if self.hp.figures:
            spacenet_plots.capture_allocation(self, t)

    def _sel_in(self, l: int) -> torch.Tensor:
        s = self.selected(l)
        return s.repeat_interleave(self.group[l]) if self.group[l] > 1 else s

    def _allowed(self, l: int) -> torch.Tensor:
        """Free positions whose two ends are both selected neurons of this task."""
        m = self.layers[l]
        return self.selected(l + 1)[:, None] & self._sel_in(l)[None, :] & m.free()

    # -- step 2-3: training and importance ---------------------------------------------------------
    def after_backward(self, task) -> None:
        for m, wm, bm in zip(self.layers, self.wmask, self.bmask):
            if m.live is not None:  # the trained block of a restricted layer
                m.live.grad.mul_(m.block_mask)
            elif getattr(m, "run_out", None) is None:  # (a restricted non-leaf layer masks in its backward)
                m.weight.grad.mul_(wm)
            m.bias.grad.mul_(bm)
        if not self.exact:
            self.before = [self.layers[l].weight.detach().index_select(0, self.rows[l]) for l in self.tracked]

    def after_step(self, task) -> None:
        if not self.exact:
            for m, wm, bm, (w0, b0) in zip(self.layers, self.wmask, self.bmask, self.snap):
                torch.where(wm.bool(), m.weight.data, w0, out=m.weight.data)
                torch.where(bm.bool(), m.bias.data, b0, out=m.bias.data)
        lr, cumulative = self.optimizer.param_groups[0]["lr"], self.hp.neuron_importance == "cumulative"
        for i, l in enumerate(self.tracked):  # only rows holding task-t connections can change
            m = self.layers[l]
            if m.live is not None:  # the compact block: its rows and columns
                rows, cols, g = m._rows, m.run_in, m.live.grad
            else:
                rows, cols = self.rows[l], None
                g = m.weight.grad.index_select(0, rows)
            if self.exact:  # plain SGD: Δw = -lr·g exactly, so |Δw·g| = lr·g² (Eq. 2)
                inc = m.per_connection(g * g).mul_(lr)
            else:
                inc = m.per_connection(((m.weight.detach().index_select(0, rows) - self.before[i]) * g).abs())
            # Ω += inc, gathered on the block (one scatter when Ω is next read: omega())
            if l in self._pending:
                self._pending[l][2].add_(inc)
            else:
                self._pending[l] = (rows, cols, inc)  # inc is a fresh tensor each step
            if cumulative:  # a += running Ω every step [release]; Ω's row/column sums kept up to date
                self.row_sum[l].index_add_(0, rows, inc.sum(1))
                getattr(self, f"imp_{l + 1}").add_(self.row_sum[l])
                if l == 0:
                    col = inc.sum(0)
                    self.col_sum.add_(col) if cols is None else self.col_sum.index_add_(0, cols, col)
                    self.imp_0.add_(self.col_sum)

    # -- step 4: drop and grow (Alg. 3) ------------------------------------------------------------
    def end_epoch(self, task, epoch: int) -> None:
        last, t = epoch == self.hp.epochs - 1, int(self.task)
        rewire = self.hp.rewire and self.hp.r > 0 and (not last or self.hp.rewire_last_epoch)
        reset = self.hp.importance_reset == "epoch" and not last
        if (rewire or reset) and self.compact:  # the weights are read and changed: trained blocks go back first
            for m in self.layers:
                m.commit()
        if rewire:
            for l in range(len(self.layers) - (0 if self.hp.rewire_output else 1)):
                self._rewire(l, t)
        if reset:
            for l in range(len(self.layers)):
                self.omega(l).zero_()
            for n in range(len(self.layers) + 1):
                getattr(self, f"imp_{n}").zero_()
        if rewire or reset:
            self._refresh_masks(t)

    @torch.no_grad()
    def _rewire(self, l: int, t: int) -> None:
        m, omega = self.layers[l], self.omega(l)
        mine = m.owned_by(t)
        k = int(int(mine.sum()) * self.hp.r)
        if k == 0:
            return
        # drop: the k task-t connections with the smallest Ω (Eq. 3); Ω itself is kept
        drop = omega.masked_fill(~mine, float("inf")).flatten().topk(k, largest=False).indices
        # grow: the k free positions between selected neurons with the largest G = a_out·a_inᵀ (Eq. 5);
        # positions just dropped are still owned here, so they cannot come straight back [release]
        a_in = self.imp(l)
        if self.group[l] > 1:
            a_in = a_in.repeat_interleave(self.group[l])
        allowed = self._allowed(l)
        if int(allowed.sum()) < k:
            raise CapacityError(f"task {t}: {self.names[l]} has fewer than {k} free positions to grow into")
        G = self.imp(l + 1)[:, None] * a_in[None, :]
        if self.hp.grow == "top":  # the k largest [release]
            grow = G.masked_fill(~allowed, float("-inf")).flatten().topk(k).indices
        else:  # "probability proportional to G" (paper text); a floor keeps zero-importance positions possible
            p = (G + G.max() * 1e-6 + 1e-30).masked_fill(~allowed, 0).flatten().cpu()
            grow = torch.multinomial(p, k, generator=self.gen).to(self.device)
        w = m.weight.data.view(m.owner.numel(), -1)
        m.owner.view(-1)[drop] = FREE
        w[drop] = 0.0
        m.owner.view(-1)[grow] = t
        w[grow] = 0.0  # grown weights start at exactly 0

    # -- steps 5-6: reservation, classifier set aside -----------------------------------------------
    @torch.no_grad()
    def end_task(self, task) -> None:
        t, L = int(self.task), len(self.layers)
        self._restrict(None)
        for n in range(1, L):
            k = self.hp.spec[n - 1]
            if k:  # the spec most important of this task's selected neurons (Alg. 4)
                score = self.imp(n).masked_fill(~self.selected(n), float("-inf"))
                self.layers[n - 1].unit_owner[score.topk(k).indices] = t
        if self.hp.figures:
            spacenet_plots.capture_trained(self, task, t)
        if self.hp.set_aside:  # old classes' rows are absent while later tasks train [release]
            out = self.layers[-1].weight.data
            rows = torch.as_tensor(task.classes, device=self.device)
            self.aside[rows] = out[rows]
            out[rows] = 0.0

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """Logits with the set-aside rows of every learned task restored (step 6)."""
        out = self.model.out
        restricted = self.compact and self.layers[0].run_out is not None
        self._restrict(None)  # evaluation always sees the whole network
        logits = F.linear(self.model.features(x), out.weight + self.aside, out.bias)
        if restricted:  # called mid-task (the engine does not): put the training plan back
            self._restrict(int(self.task))
        return logits

    # -- rehearsal variant -------------------------------------------------------------------------
    def fit_task(self, task) -> torch.Tensor:
        """SpaceNet-Rehearsal trains on the task's data shuffled together with the stored data of the old
        tasks, so every minibatch replays old classes in proportion (old connections stay frozen)."""
        if self.hp.rehearsal and task.id > 0:
            task = dataclasses.replace(task, train=self.replay_split(task))
        return super().fit_task(task)

    def replay_split(self, task) -> Split:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + task.id)
        xs, ys = [task.train.x], [task.train.y]
        for old in self.stream.tasks[:task.id]:
            n = len(old.train.y)
            keep = (torch.randperm(n, generator=g)[:self.hp.memory] if self.hp.memory else torch.arange(n))
            xs.append(old.train.x[keep.to(self.device)])
            ys.append(old.train.y[keep.to(self.device)])
        return Split(torch.cat(xs), torch.cat(ys))

    def steps_per_task(self, task) -> int:
        n = len(task.train.y)
        if self.hp.rehearsal:
            n += sum(min(len(o.train.y), self.hp.memory or len(o.train.y)) for o in self.stream.tasks[:task.id])
        return self.hp.epochs * -(-n // self.hp.batch_size)

    # -- diagnostics -------------------------------------------------------------------------------
    def capacity(self) -> dict:
        T = len(self.stream.tasks)
        return {name: m.capacity(T, units=l < len(self.layers) - 1)
                for l, (name, m) in enumerate(zip(self.names, self.layers))}

    def extra_state(self) -> dict:
        return {"gen": self.gen.get_state(), "figdata": self.figdata}

    def load_extra_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.figdata = state["figdata"]

    def write_artifacts(self, folder) -> None:
        if self.hp.figures:
            spacenet_plots.write_figures(self, folder)
