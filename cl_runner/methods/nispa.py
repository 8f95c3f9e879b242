"""NISPA (Gurbuz & Dovrolis, ICML 2022): a fixed sparse network whose most active units become stable task
by task and are frozen, while connections from plastic into stable units are dropped and regrown into
plastic ones. Read beside ../shared/specs/nispa.md, whose steps are the sections below; [release] marks
the authors' code where the slides are silent, each choice a key in conf/method/nispa.yaml.

Masks are the shared mechanism's (models/masks.py): a connection is present when its `owner` is SPARE or a
task (FREE = absent, an exact 0); the running task owns every present connection that is not frozen, and
frozen ones keep the task that froze them. A unit is plastic (FREE), a CANDIDATE during a phase, or
stable since task t (`unit_owner`); inputs are always stable, outputs of every seen class count as stable.
Task-incremental as in the paper: the logits of classes outside the running task are multiplied by 0 in
training and in the validation that picks epochs and phases. `replay_memory > 0` is the release's
class-incremental variant (NISPA_Replay): no output masking, the output layer never freezes, each step adds
replay_lambda × the loss of a minibatch of stored samples (class-balanced, random), and a phase keeps its
last epoch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.memory import Replayer, empty_memory, gather, store_balanced
from ..models.masked_net import MaskedNet
from ..models.masks import CANDIDATE, FREE, SPARE
from ..models.units import UnitHooks
from . import METHODS, Method, nispa_plots
from .schemas import NISPAConfig, check_nispa

SCHEDULES = {  # p(t), the share of a layer's total activation its stable units must cover after phase t
    "cosine": lambda t, k: 0.5 * (1 + math.cos(math.pi * t / k)),
    "linear": lambda t, k: 1 - k * t,
    "exp_decay": lambda t, k: (t + 1) ** -k,
}


@METHODS.register("nispa", NISPAConfig)
class NISPA(Method):
    check_config = staticmethod(check_nispa)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        convs = list(getattr(model, "convs", []))
        self.net = MaskedNet.of(model)
        self.layers = self.net.layers
        # activity of the hidden units; a conv followed by a max-pool is measured after it [release]
        pool = getattr(model, "pool", None)
        taps = [pool if i % 2 == 1 else None for i in range(len(convs))] + [None] * len(model.hidden)
        self.units = UnitHooks(self.layers[:-1], [None] * (len(self.layers) - 1), taps)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # masks, candidates' fixes and growth (on the CPU)
        self.register_buffer("task", torch.tensor(-1))
        self.register_buffer("out_mask", torch.zeros(stream.n_outputs, device=device))  # the running task's classes
        self.replay = self.hp.replay_memory > 0
        self.register_buffer("memory", empty_memory(self.hp.replay_memory, device))  # class-IL: stored samples
        self.history: list = []  # each task's diagnostics, for the phases figure
        self._init_weights()
        self._sparsify()

    # -- the fixed sparse network ----------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self) -> None:
        """[release] MLP: Kaiming-normal (fan_out) weights, PyTorch's default biases; CNN: Kaiming-normal
        (fan_in) weights and zero biases everywhere."""
        if self.hp.init == "model":
            return
        cnn = isinstance(self.layers[0], nn.Conv2d)
        for m in self.layers:
            if cnn:
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.no_grad()
    def _sparsify(self) -> None:
        """Every layer keeps each connection with probability 1 − sparsity, i.i.d. (a conv's connection is an
        (out, in) channel pair's kernel; the first conv stays dense [release]); biases are never pruned."""
        for l, m in enumerate(self.layers):
            dense = l == 0 and isinstance(m, nn.Conv2d) and self.hp.dense_first_conv
            keep = torch.rand(m.owner.shape, generator=self.gen) >= self.hp.sparsity
            keep = (torch.ones_like(keep) if dense else keep).to(self.device)
            m.owner.copy_(torch.where(keep, SPARE, FREE))
            m.weight.mul_(m.as_weight(keep))

    def _stable(self, t: int, candidates: bool = False) -> list:
        """Per unit layer (inputs, hidden..., outputs): the units stable before task t; with `candidates`,
        also this phase's candidates and the running task's outputs."""
        out = [torch.ones(self.net.sizes[0], dtype=torch.bool, device=self.device)]
        for m in self.layers:
            u = m.unit_owner
            out.append(u != FREE if candidates else (u >= 0) & (u < t))
        return out

    def _frozen(self, t: int) -> list:
        """Connections between units stable before task t: frozen (stable→stable)."""
        S = self._stable(t)
        return [(m.owner >= 0) & S[l + 1][:, None] & self.net.cols(l, S[l])[None, :] for l, m in enumerate(self.layers)]

    # -- per task: a loop of phases ----------------------------------------------------------------
    def fit_task(self, task) -> dict:
        t, hp = task.id, self.hp
        self.task.fill_(t)
        for m in self.layers:  # the running task trains every present connection that is not frozen
            m.owner[m.owner == SPARE] = t
        self.layers[-1].unit_owner[task.classes] = t  # its outputs count as stable from now on
        self.out_mask.zero_()[task.classes] = 1.0
        if self.replay:  # the stored samples on the device, replayed in reshuffled minibatches
            self.replayer = Replayer(*gather(self.memory, self.stream.tasks), self.hp.batch_size, self.shuffle_gen)
        diag, acc_best, kept, p_kept, p_last, phase = {}, 0.0, None, 100.0, 100.0, 0
        while True:
            phase += 1
            p = 100 * SCHEDULES[hp.p_schedule](phase, hp.k)
            acc = self._train_phase(task)  # step 1
            diag[f"phase_{phase}/val_acc"] = acc
            if (phase > hp.min_phases and acc < acc_best - hp.a_f) or p <= hp.p_min:  # step 2: back to the last phase
                if kept is not None:
                    self.model.load_state_dict(kept)
                break
            acc_best, kept, p_kept = max(acc, acc_best), self._snapshot(), p_last
            self._select(task, p)  # step 3
            dropped = self._drop()  # step 4
            grown = self._grow(dropped, t) if hp.grow else [0] * len(dropped)  # step 5
            diag[f"phase_{phase}/dropped"], diag[f"phase_{phase}/grown"] = float(sum(dropped)), float(sum(grown))
            p_last = p
        self._end_task(t)  # step 6
        if self.replay:  # [release: continuum's random class-balanced RehearsalMemory]
            store_balanced(self.memory, task, sorted({c for o in self.stream.tasks[:t + 1] for c in o.classes}), self.gen)
        diag.update(phases=float(phase), final_p=p_kept)
        self.history.append(diag)
        return diag

    def steps_per_task(self, task) -> int:
        """At most: phases until p ≤ p_min (the stop rule may come earlier)."""
        phases = next((i for i in range(1, 1000) if 100 * SCHEDULES[self.hp.p_schedule](i, self.hp.k) <= self.hp.p_min), 1000)
        return phases * self.hp.epochs * -(-len(task.train.y) // self.hp.batch_size)

    # -- step 1: a phase of training -------------------------------------------------------------------
    def _train_phase(self, task) -> float:
        """A new optimizer [release: Adam]; `epochs` epochs, keeping the one with the best validation accuracy.
        Frozen connections and the biases of stable units do not move."""
        stable = self._stable(task.id)
        weights, biases = [m.owned_by(task.id) for m in self.layers], [~s for s in stable[1:]]
        if self.replay:  # the output layer is never frozen [release]
            weights[-1], biases[-1] = self.layers[-1].owner >= 0, torch.ones_like(biases[-1])
        self.net.train_only(weights, biases, hold=True)
        self.optimizer = self.make_optimizer(self.net.params())
        best, best_state = 0.0, None
        for _ in range(self.hp.epochs):
            self.train_epochs(task, task.train, 1)
            acc = self._val_acc(task)
            if acc > best or self.replay:  # replay: the last epoch [release]
                best, best_state = acc, self._snapshot()
        self.net.end_phase()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return best

    def after_backward(self, task) -> None:
        self.net.mask_grads()  # frozen, absent: no gradient

    def after_step(self, task) -> None:
        self.net.restore()  # Adam's moments never move them either: bit-identical

    def loss(self, logits: torch.Tensor, y: torch.Tensor, task) -> torch.Tensor:
        if not self.replay:
            return F.cross_entropy(logits * self.out_mask, y)  # other classes' logits are 0, not -inf [release]
        loss = F.cross_entropy(logits, y)
        if self.replayer:  # + λ · the loss of the next minibatch of stored samples
            xm, ym = self.replayer.next()
            loss = loss + self.hp.replay_lambda * F.cross_entropy(self.model(xm), ym)
        return loss

    @torch.no_grad()
    def _val_acc(self, task) -> float:
        was = self.model.training
        self.model.eval()
        correct, bs, val = torch.zeros((), dtype=torch.long, device=self.device), self.cfg.eval.batch_size, task.val
        mask = 1.0 if self.replay else self.out_mask  # class-IL: every output
        for i in range(0, len(val.y), bs):
            correct += ((self.model(val.x[i:i + bs]) * mask).argmax(1) == val.y[i:i + bs]).sum()
        self.model.train(was)
        return 100.0 * correct.item() / len(val.y)

    def _snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -- step 3: candidate stable units ----------------------------------------------------------------
    @torch.no_grad()
    def _select(self, task, p: float) -> None:
        """Per hidden layer, units by mean activation on the task's training data, most active first, until
        they cover p % of the layer's total; those not stable yet become candidates."""
        bs, x = self.cfg.eval.batch_size, task.train.x
        act = self.units.mean_activity(lambda: [self.model(x[i:i + bs]) for i in range(0, len(x), bs)])
        for m, a in zip(self.layers[:-1], act):
            order = a.argsort(descending=True)
            n = min(len(a), int((a[order].cumsum(0) < a.sum() * p / 100).sum()) + 1)
            u = m.unit_owner
            u[u == CANDIDATE] = FREE
            top = torch.zeros_like(u, dtype=torch.bool)
            top[order[:n]] = True
            u[top & (u == FREE)] = CANDIDATE

    # -- step 4: drop non-stable → stable --------------------------------------------------------------
    @torch.no_grad()
    def _drop(self) -> list:
        """Every connection from a unit that is neither stable nor a candidate into one that is, output
        layer included. Returns the number dropped per layer."""
        S, dropped = self._stable(int(self.task), candidates=True), []
        for l, m in enumerate(self.layers):
            cut = (m.owner >= 0) & S[l + 1][:, None] & ~self.net.cols(l, S[l])[None, :]
            m.owner[cut] = FREE
            m.weight[m.expand(cut)] = 0.0
            dropped.append(int(cut.sum()))
        return dropped

    # -- step 5: grow as many into plastic units -------------------------------------------------------
    @torch.no_grad()
    def _grow(self, dropped: list, t: int) -> list:
        """Per layer, as many as were dropped: first one outgoing connection (weight 0) to a random plastic unit
        for each plastic unit left without one, then uniformly among absent positions into plastic units
        (sources by `rewire` [release]), new weights from the layer's present non-zero weights."""
        S = self._stable(t, candidates=True)
        grown = []
        for l, m in enumerate(self.layers):
            budget, targets = dropped[l], (~S[l + 1]).nonzero().squeeze(1)
            if l > 0 and budget and len(targets):  # 5a: plastic units without outgoing connections
                has_out = (m.owner >= 0).any(0).view(self.net.sizes[l], -1).any(1)
                dead = (~S[l] & ~has_out).nonzero().squeeze(1)[:budget]
                g = self.net.group[l]
                col = dead * g + torch.randint(g, (len(dead),), generator=self.gen).to(self.device)
                m.owner[targets[torch.randint(len(targets), (len(dead),), generator=self.gen).to(self.device)], col] = t
                budget -= len(dead)
            for algo in dict.fromkeys((self.hp.rewire, "full_random")):  # then the rest [release: a second pass]
                if budget <= 0:
                    break
                src = {"full_random": torch.ones_like(S[l]), "forward_random": S[l], "flow_random": ~S[l]}[algo]
                where = (m.owner == FREE) & ~S[l + 1][:, None] & self.net.cols(l, src)[None, :]
                pos = where.flatten().nonzero().squeeze(1)
                pick = pos[torch.randperm(len(pos), generator=self.gen)[:budget].to(self.device)]
                w = m.weight.view(m.owner.numel(), -1)
                w[pick] = self._new_weights(m, (len(pick), w.shape[1]))
                m.owner.view(-1)[pick] = t
                budget -= len(pick)
            grown.append(dropped[l] - budget)
        return grown

    def _new_weights(self, m, shape: tuple) -> torch.Tensor:
        w = m.weight.detach()
        if self.hp.grow_init == "normal":  # N(mean, std) of the present non-zero weights [release]
            nz = w[w != 0]
            return (torch.randn(shape, generator=self.gen) * nz.std(unbiased=False).cpu() + nz.mean().cpu()).to(w)
        if self.hp.grow_init == "uniform":
            return (torch.rand(shape, generator=self.gen) * (w.max() - w.min()).cpu() + w.min().cpu()).to(w)
        return w.new_zeros(shape)

    # -- step 6: end of task ---------------------------------------------------------------------------
    @torch.no_grad()
    def _end_task(self, t: int) -> None:
        """Candidates become stable; stable→stable connections and stable biases freeze; every other present
        weight is re-initialised (Kaiming-normal, fan_out) and other biases zeroed [release]; masks stay."""
        for m in self.layers[:-1]:
            m.unit_owner[m.unit_owner == CANDIDATE] = t
        S, frozen = self._stable(t + 1), self._frozen(t + 1)
        for l, m in enumerate(self.layers):
            m.owner[(m.owner == t) & ~frozen[l]] = SPARE
            if self.hp.reinit:
                self.net.redraw(l, m.owner == SPARE, ~S[l + 1], self._kaiming)

    @staticmethod
    def _kaiming(w: torch.Tensor, b: torch.Tensor | None) -> None:
        nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        if b is not None:
            nn.init.zeros_(b)

    # -- diagnostics -----------------------------------------------------------------------------------
    def capacity(self) -> dict:
        """Stable (units_reserved) and plastic (units_free) units per layer; connections frozen per task,
        present but plastic (conn_spare) and absent (conn_free)."""
        return self.net.capacity(len(self.stream.tasks), int(self.task))

    def write_artifacts(self, folder) -> None:
        nispa_plots.phases_figure(self.history, folder)

    def extra_state(self) -> dict:
        return {"gen": self.gen.get_state(), "history": self.history}

    def load_extra_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.history = state["history"]
