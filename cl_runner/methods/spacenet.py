"""SpaceNet (Sokar, Mocanu, Pechenizkiy 2021): sparse connections per task, compacted by adaptive sparse
training, and neurons reserved per task. Read beside ../shared/specs/spacenet.md, whose steps 1-6 are
the sections below; [release] marks the authors' code where the paper is vague, each such choice a key
in conf/method/spacenet.yaml. Ownership, gradient masking and the compact fast path are the shared mask
mechanism's (models/masks.py, models/masked_net.py); this file holds the algorithm.
Variants by config: static_sparse (rewire=false), spacenet_rehearsal (rehearsal=true), the CNN (a
connection is a k×k kernel, a neuron a feature map).
"""
from __future__ import annotations

import dataclasses
import torch
import torch.nn.functional as F

from ..data import replay_split
from ..errors import CapacityError
from ..models import draw_init
from ..models.masked_net import BlockSum, MaskedNet, PlainSGD
from ..models.masks import FREE
from . import METHODS, Method, spacenet_plots
from .schemas import SpaceNetConfig, budget_fit, check_spacenet


@METHODS.register("spacenet", SpaceNetConfig)
class SpaceNet(Method):
    check_config = staticmethod(check_spacenet)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        hp = self.hp
        self.net = MaskedNet.of(model)
        self.layers = self.net.layers
        self.names, L = self.net.names, len(self.layers)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # structure decisions (per task / epoch, on CPU)
        self.exact = hp.optimizer == "sgd" and hp.momentum == 0 and hp.weight_decay == 0
        if hp.init == "xavier":  # spec defaults: Xavier-uniform weights, zero biases
            for m in self.layers:
                draw_init(m.weight, m.bias, "xavier")
        # new connections start from these initial values [release]; no connection exists before task 0
        for l, m in enumerate(self.layers):
            self.register_buffer(f"init_{l}", m.weight.detach().clone())
            self.register_buffer(f"omega_{l}", torch.zeros(m.owner.shape, device=device))
            m.weight.data.zero_()
        for n in range(L + 1):
            self.register_buffer(f"imp_{n}", torch.zeros(self.net.sizes[n], device=device))  # a_n, Eq. 4
            self.register_buffer(f"sel_{n}", torch.zeros(self.net.sizes[n], dtype=torch.bool, device=device))
        self.register_buffer("aside", torch.zeros_like(model.out.weight))  # W_L^saved
        self.register_buffer("task", torch.tensor(-1))
        # Ω is needed where connections rewire and where neuron importance comes from (hidden layers)
        self.tracked = list(range(L - 1)) + ([L - 1] if hp.rewire_output else [])
        # the budget must fit the positions task 0 will offer (needs the data's input size and classes)
        sel = [self.net.sizes[0], *(s or w for s, w in zip(hp.sel, self.net.sizes[1:L])), stream.classes_per_task]
        for l in range(L):
            budget_fit(cfg, l, sel[l] * self.net.group[l], sel[l + 1], self.layers[l].owner.numel(), self.names[l])
        self.figdata: dict = {}  # what the paper's figures need, captured on the way (plain data)
        self.omega_sums: dict = {}  # layer -> BlockSum feeding omega_<l> from the trained block

    def make_optimizer(self, params, lr: float | None = None):
        if not self.exact:  # the trained entries only; frozen ones are put back after each step
            return super().make_optimizer(self.net.params(), lr)
        return PlainSGD(self.net.params, self.hp.lr if lr is None else lr)

    def selected(self, n: int) -> torch.Tensor:
        return getattr(self, f"sel_{n}")

    def omega(self, l: int) -> torch.Tensor:
        """Ω of weight layer l (Eq. 3), with the increments of the current block added in."""
        return self.omega_sums[l].value() if l in self.omega_sums else getattr(self, f"omega_{l}")

    def imp(self, n: int) -> torch.Tensor:
        """Neuron importance a_n (Eq. 4; 0 for reserved neurons), accumulated or from the current Ω."""
        if self.hp.neuron_importance == "cumulative":
            a = getattr(self, f"imp_{n}")
        else:  # Eq. 4 as printed: sum of the current Ω (inputs: of their outgoing connections)
            a = self.omega(0).sum(0) if n == 0 else self.omega(n - 1).sum(1)
        return a if n == 0 or n == len(self.layers) else a * self.layers[n - 1].free_units()

    def _allowed(self, l: int) -> torch.Tensor:
        """Free positions whose two ends are both selected neurons of this task."""
        return self.selected(l + 1)[:, None] & self.net.cols(l, self.selected(l))[None, :] & self.layers[l].free()

    def budget(self, l: int) -> int:
        """n_l, the connections task t allocates in weight layer l."""
        b, unit, m = self.hp.budget[l], self.hp.budget_unit, self.layers[l]
        if unit == "count":
            return int(b)
        n = m.owner.numel() if unit == "layer" else \
            int(self.net.cols(l, self.selected(l)).sum()) * int(self.selected(l + 1).sum())
        return max(1, round(b * n))

    # -- step 1: allocation (Alg. 2) ---------------------------------------------------------------
    def begin_task(self, task) -> None:
        t = int(self.task) + 1
        self.task.fill_(t)
        L, hp = len(self.layers), self.hp
        self.selected(0).fill_(True)  # input neurons are all eligible
        for n in range(1, L):  # sel neurons at random among the free ones [release]
            free = self.layers[n - 1].free_units().nonzero().squeeze(1).cpu()
            k = hp.sel[n - 1] or len(free)
            if len(free) < max(k, hp.spec[n - 1], 1):
                raise CapacityError(f"task {t}: {self.names[n - 1]} has {len(free)} free neurons left, "
                                    f"fewer than method.sel={k} / method.spec={hp.spec[n - 1]}")
            pick = free[torch.randperm(len(free), generator=self.gen)[:k]]
            self.selected(n).zero_()[pick.to(self.device)] = True
        self.selected(L).zero_()[task.classes] = True  # output neurons: the task's classes
        for l, m in enumerate(self.layers):  # n_l connections uniformly among the allowed positions
            avail = self._allowed(l).flatten().nonzero().squeeze(1).cpu()
            n_l = self.budget(l)
            if len(avail) < n_l:
                raise CapacityError(f"task {t}: {self.names[l]} has {len(avail)} free positions between the "
                                    f"selected neurons, fewer than the {n_l} connections of the budget")
            new = avail[torch.randperm(len(avail), generator=self.gen)[:n_l]].to(self.device)
            m.owner.view(-1)[new] = t
            m.weight.data.view(m.owner.numel(), -1)[new] = getattr(self, f"init_{l}").view(m.owner.numel(), -1)[new]
        for l in range(L):
            self.omega(l).zero_()
        for n in range(L + 1):
            getattr(self, f"imp_{n}").zero_()
        self._train_task(t)
        if self.hp.figures:
            spacenet_plots.capture_allocation(self, t)

    # -- step 2: only task-t weights learn (Eq. 1) ---------------------------------------------------
    def _train_task(self, t: int) -> None:
        for s in self.omega_sums.values():  # settle Ω on the old block before it changes
            s.value()
        self.net.train_only(*self._masks(t), hold=not self.exact, live_out=self._live_out(), leaf=self.exact)
        cumulative = self.hp.neuron_importance == "cumulative"
        self.omega_sums = {l: BlockSum(getattr(self, f"omega_{l}"), cumulative, cumulative and l == 0)
                           for l in self.tracked}

    def _masks(self, t: int) -> tuple:
        """Task-t connections train; biases of free hidden neurons (incl. ones shared with earlier tasks
        [release]) and of the task's classes (`seen`: every learned class, e.g. with replay)."""
        L, hp = len(self.layers), self.hp
        biases = []
        for l, m in enumerate(self.layers):
            if l == L - 1:
                b = self.selected(L) | (self.aside.any(1) | m.owner.ge(0).any(1) if hp.out_bias == "seen" else False)
            elif hp.train_bias == "free":
                b = m.free_units()
            else:
                b = self.selected(l + 1) if hp.train_bias == "selected" else torch.zeros_like(self.selected(l + 1))
            biases.append(b)
        return [m.owned_by(t) for m in self.layers], biases

    def _live_out(self) -> torch.Tensor:
        """An MLP runs its live part only: the task's classes (old rows are set aside) and what feeds them."""
        sel = self.selected(len(self.layers))
        return sel if self.hp.set_aside else torch.ones_like(sel)

    def after_backward(self, task) -> None:
        self.net.mask_grads()
        if not self.exact:
            self.before = [self.net.block_weight(l) for l in self.tracked]

    # -- step 3: importance, after every step ---------------------------------------------------------
    def after_step(self, task) -> None:
        if not self.exact:  # momentum / weight decay / Adam moved zero-gradient entries: put them back
            self.net.restore()
        lr, cumulative = self.optimizer.param_groups[0]["lr"], self.hp.neuron_importance == "cumulative"
        for i, l in enumerate(self.tracked):  # only the trained block can change
            block = self.net.block(l)
            if self.exact:  # plain SGD: Δw = -lr·g exactly, so |Δw·g| = lr·g² (Eq. 2)
                inc = self.layers[l].per_connection(block.grad * block.grad).mul_(lr)
            else:
                inc = self.layers[l].per_connection(((self.net.block_weight(l) - self.before[i]) * block.grad).abs())
            omega = self.omega_sums[l]
            omega.add(block, inc)  # Ω += |Δw·g| (Eq. 3)
            if cumulative:  # a += running Ω every step [release]: incoming (hidden), outgoing (inputs)
                getattr(self, f"imp_{l + 1}").add_(omega.row_sum)
                if l == 0:
                    self.imp_0.add_(omega.col_sum)

    # -- step 4: drop and grow after every epoch but the last (Alg. 3) ----------------------------------
    def end_epoch(self, task, epoch: int) -> None:
        last, t = epoch == self.hp.epochs - 1, int(self.task)
        rewire = self.hp.rewire and self.hp.r > 0 and (not last or self.hp.rewire_last_epoch)
        reset = self.hp.importance_reset == "epoch" and not last
        if rewire or reset:
            self.net.release()  # the weights are read and changed: trained blocks go back first
        if rewire:
            for l in range(len(self.layers) - (0 if self.hp.rewire_output else 1)):
                self._rewire(l, t)
        if reset:
            for l in range(len(self.layers)):
                self.omega(l).zero_()
            for n in range(len(self.layers) + 1):
                getattr(self, f"imp_{n}").zero_()
        if rewire or reset:
            self._train_task(t)

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
        a_in = self.net.cols(l, self.imp(l))
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

    # -- steps 5-6: reservation (Alg. 4), classifier set aside (Alg. 1 l. 14-15) -----------------------
    @torch.no_grad()
    def end_task(self, task) -> None:
        t, L = int(self.task), len(self.layers)
        self.net.end_phase()
        for omega in self.omega_sums.values():  # the task's final Ω into its buffer (checkpoints carry it)
            omega.value()
        for n in range(1, L):
            k = self.hp.spec[n - 1]
            if k:  # the spec most important of this task's selected neurons
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
        restricted = self.net.restricted
        self.net.release()  # evaluation always sees the whole network
        out = self.model.out
        logits = F.linear(self.model.features(x), out.weight + self.aside, out.bias)
        if restricted:  # called mid-task (the engine does not): put the training plan back
            self.net.train_only(*self._masks(int(self.task)), hold=not self.exact, live_out=self._live_out(),
                                leaf=self.exact)
        return logits

    # -- rehearsal variant ---------------------------------------------------------------------------
    def fit_task(self, task) -> dict:
        """SpaceNet-Rehearsal trains on the task's data shuffled together with the stored data of the old
        tasks, so every minibatch replays old classes in proportion (old connections stay frozen)."""
        if self.hp.rehearsal and task.id > 0:
            task = dataclasses.replace(task, train=self._replay(task))
        return super().fit_task(task)

    def _replay(self, task):
        return replay_split(task, self.stream.tasks[:task.id], self.hp.memory, self.cfg.seed * 1000 + task.id)

    def steps_per_task(self, task) -> int:
        n = len(task.train.y)  # + the stored samples of old tasks that rehearsal replays
        if self.hp.rehearsal:
            n += sum(min(len(o.train.y), self.hp.memory or len(o.train.y)) for o in self.stream.tasks[:task.id])
        return self.hp.epochs * -(-n // self.hp.batch_size)

    # -- diagnostics ---------------------------------------------------------------------------------
    def capacity(self) -> dict:
        return self.net.capacity(len(self.stream.tasks), int(self.task))

    def extra_state(self) -> dict:
        return {"gen": self.gen.get_state(), "figdata": self.figdata}

    def load_extra_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.figdata = state["figdata"]

    def write_artifacts(self, folder) -> None:
        if self.hp.figures:
            spacenet_plots.write_figures(self, folder)
