"""HAT, hard attention to the task (Serra et al. 2018), as its release runs it (joansj/hat: approaches/hat.py,
networks/mlp_hat.py; ../shared/specs/dgm.md § HAT). Task-incremental: a head per task.

Per hidden layer l and task t a learnt embedding e_l,t (N(0, 1), nn.Embedding's default); the gate
a_l,t = sigmoid(s · e_l,t) multiplies the layer's units (Eq. 1; the gates of models/units.py). Per minibatch
starting at sample i of the task's n:
  1. s = 1/s_max + (s_max − 1/s_max) · i/n, annealed within every epoch (Eq. 3);
  2. loss = CE over the task's head + λ · Σ_l Σ a_l,t (1 − a_l,<t) / Σ_l Σ (1 − a_l,<t) (Eq. 5; on the first
     task a_<t = 0, so Σ a / units);
  3. weight gradients × (1 − min(a_<t[post], a_<t[pre])), bias gradients × (1 − a_<t[post]) (Eq. 2;
     models/masked_net.py's float masks); the heads train freely;
  4. embedding gradients × (s_max/s)·(cosh(clamp(s·e, ±50)) + 1)/(cosh(e) + 1) (Eq. 4, the compensation);
  5. gradient-norm clipping, a plain SGD step, embeddings clamped to ±6.
After each epoch, the loss of 2. on the validation split at s = s_max drives the release's schedule: lr / 3
after `lr_patience` epochs without a better loss, stop below lr_min, and the best epoch's weights come back.
  6. After the task: a_≤t = max(a_<t, sigmoid(s_max · e_t)) (the cumulative attention).
Prediction gates with sigmoid(s_max · e_j) for task j; without a task id, with the cumulative a_≤T.
Capacity: a unit is task t's when its gate first passes 0.5 on task t, a connection when both its ends do.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..models.masked_net import MaskedNet
from ..models.masks import FREE
from ..models.units import UnitHooks
from . import METHODS, Method
from .schemas import HATConfig, check_hat


@METHODS.register("hat", HATConfig)
class HAT(Method):
    task_aware_predict = True
    check_config = staticmethod(check_hat)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.net = MaskedNet.of(model)
        self.layers = self.net.layers
        self.L = len(self.layers) - 1  # hidden layers, each with its gates
        self.units = UnitHooks(self.layers[:self.L], [None] * self.L)
        n_tasks = len(stream.tasks)
        self.embeddings = nn.ParameterList(nn.Parameter(torch.randn(n_tasks, m.weight.shape[0], device=device))
                                           for m in self.layers[:self.L])
        for l, m in enumerate(self.layers[:self.L]):  # a_<t per hidden layer, 0 before the first task
            self.register_buffer(f"cumulative_{l}", torch.zeros(m.weight.shape[0], device=device))
        self.register_buffer("task", torch.tensor(-1, device=device))
        self.s, self._pos, self._n = 1.0, 0, 1
        self._free = None  # Σ_l Σ (1 − a_l,<t), the denominator of the regulariser (per task)

    @property
    def cumulative(self) -> list:
        return [getattr(self, f"cumulative_{l}") for l in range(self.L)]

    def gates(self, task_id: int, s: float) -> list:
        return [torch.sigmoid(s * e[task_id]) for e in self.embeddings]

    # -- training -----------------------------------------------------------------------------------
    def begin_task(self, task) -> None:
        """3.'s gradient scales, fixed for the task: 1 − min(a_<t[post], a_<t[pre]) per connection."""
        pre = self.cumulative
        weights, biases = [], []
        for l, m in enumerate(self.layers):
            if task.id == 0 or l == self.L:  # nothing protected yet / the heads (one block of rows per task)
                weights.append(torch.ones(m.weight.shape[:2], dtype=torch.bool, device=self.device))
                biases.append(torch.ones(m.weight.shape[0], dtype=torch.bool, device=self.device))
                continue
            post = pre[l][:, None]
            w = post if l == 0 else torch.minimum(post, self.net.cols(l, pre[l - 1])[None, :])
            weights.append(1 - w.expand(m.weight.shape[:2]))
            biases.append(1 - pre[l])
        self.net.train_only(weights, biases, hold=False)
        self._free = sum((1 - a).sum() for a in pre).clamp_min(1e-12)

    def regulariser(self, gates: list, task_id: int) -> torch.Tensor:
        """2.'s attention regulariser: the share of the units free before the task that its gates use."""
        return sum((g * (1 - a)).sum() for g, a in zip(gates, self.cumulative)) / self._free

    def batch_loss(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s_max = self.hp.s_max
        self.s = 1 / s_max + (s_max - 1 / s_max) * self._pos / self._n  # 1.
        self._pos += len(x)
        gates = self.gates(task.id, self.s)
        self.units.gates = gates
        return self.loss(self.model(x), y, task) + self.hp.lamb * self.regulariser(gates, task.id)  # 2.

    def after_backward(self, task) -> None:
        self.net.mask_grads()  # 3.
        e = self.embeddings
        for emb in e:  # 4. only the task's row has a gradient
            g, v = emb.grad[task.id], emb.detach()[task.id]
            num = torch.cosh(torch.clamp(self.s * v, -self.hp.thres_cosh, self.hp.thres_cosh)) + 1
            g.mul_(self.hp.s_max / self.s * num / (torch.cosh(v) + 1))
        params = [p for p in (*self.model.parameters(), *e) if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.hp.clipgrad)  # 5.

    @torch.no_grad()
    def after_step(self, task) -> None:
        for emb in self.embeddings:
            emb.clamp_(-self.hp.thres_emb, self.hp.thres_emb)

    @torch.no_grad()
    def _val_loss(self, task, split) -> float:
        """2. at s = s_max on `split`, eval mode (the release's validation loss)."""
        was = self.model.training
        self.model.eval()
        gates = self.gates(task.id, self.hp.s_max)
        self.units.gates = gates
        total, bs, n = torch.zeros((), device=self.device), self.cfg.eval.batch_size, len(split.y)
        for i in range(0, n, bs):
            total += self.loss(self.model(split.x[i:i + bs]), split.y[i:i + bs], task) * len(split.y[i:i + bs])
        self.model.train(was)
        return float(total / n + self.hp.lamb * self.regulariser(gates, task.id))

    def fit_task(self, task) -> dict:
        self.begin_task(task)
        # the release's MNIST loader validates on the training set itself; a held-out split when there is one
        val = task.val if task.val is not None and len(task.val.y) else task.train
        params = [*self.model.parameters(), *self.embeddings]
        lr, patience, best_loss, best, epochs = self.hp.lr, self.hp.lr_patience, math.inf, None, 0
        self.optimizer = self.make_optimizer(params, lr)
        self._n = len(task.train.y)
        for epoch in range(self.hp.epochs):
            self._pos = 0
            self.train_epochs(task, task.train, 1)
            epochs += 1
            loss = self._val_loss(task, val)  # one host sync per epoch
            if loss < best_loss:
                best_loss, patience = loss, self.hp.lr_patience
                best = {k: v.detach().clone() for k, v in self.state_dict().items() if "embeddings" in k or
                        k.startswith("model.")}
            else:
                patience -= 1
                if patience <= 0:
                    lr /= self.hp.lr_factor
                    if lr < self.hp.lr_min:
                        break
                    patience = self.hp.lr_patience
                    self.optimizer = self.make_optimizer(params, lr)  # the release starts a fresh SGD
        if best is not None:
            self.load_state_dict(best, strict=False)
        self.end_task(task)
        return {"epochs": epochs, "val_loss": best_loss, "lr_last": lr}

    @torch.no_grad()
    def end_task(self, task) -> None:
        """6. and the ownership of units and connections that capacity() counts."""
        t, new = task.id, self.gates(task.id, self.hp.s_max)
        for l, a in enumerate(new):
            self.cumulative[l].copy_(torch.maximum(self.cumulative[l], a))
        used = [a > 0.5 for a in new]
        for l, m in enumerate(self.layers):
            if l < self.L:
                m.unit_owner[used[l] & (m.unit_owner == FREE)] = t
                post = used[l][:, None]
            else:  # the task's head reads the task's last-layer units
                post = torch.zeros(m.weight.shape[0], 1, dtype=torch.bool, device=self.device)
                post[task.classes[0]:task.classes[-1] + 1] = True
            conn = post if l == 0 else post & self.net.cols(l, used[l - 1])[None, :]
            m.owner[conn & (m.owner == FREE)] = t
        self.task.fill_(t)
        self.units.gates = [None] * self.L
        self.net.end_phase()

    def steps_per_task(self, task) -> int:  # at most; the schedule may stop earlier
        return self.hp.epochs * -(-len(task.train.y) // self.hp.batch_size)

    # -- prediction and capacity --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        self.units.gates = self.cumulative if task_id is None else self.gates(task_id, self.hp.s_max)
        try:
            return self.model(x)
        finally:
            self.units.gates = [None] * self.L

    @torch.no_grad()
    def predict_pair(self, x: torch.Tensor, task_id: int) -> tuple:
        return self.predict(x), self.predict(x, task_id)

    def capacity(self) -> dict:
        """Units (and connections between units) each task's gates took, per layer (the paper's Fig. 5)."""
        return self.net.capacity(len(self.stream.tasks), int(self.task), units=self.L)
