"""CLNP (Golkar, Kagan & Cho 2019): continual learning via neural pruning. Read beside ../shared/specs/clnp.md,
whose steps 1-5 are the sections below, and the paper's Sec. 2 and Alg. 1; [choice] = a key in
conf/method/clnp.yaml. Masks are the shared mechanism's (models/masks.py): a neuron's `unit_owner` is the
task that committed it (multi-head: the output rows too), a connection's `owner` the task whose neuron it
feeds, or CUT for interference; MaskedNet turns them into gradient masks that keep frozen entries
bit-identical, UnitHooks gates neurons, measures their activity and holds committed BatchNorm channels
(a channel's γ, β and statistics belong to its neuron, like a bias).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import CapacityError
from ..models import draw_init
from ..models.masked_net import MaskedNet
from ..models.masks import CUT
from ..models.units import UnitHooks
from . import METHODS, Method
from .schemas import CLNPConfig, check_clnp

log = logging.getLogger("cl_runner")


@METHODS.register("clnp", CLNPConfig)
class CLNP(Method):
    task_aware_predict = True
    check_config = staticmethod(check_clnp)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        norms = list(getattr(model, "norms", []))
        self.net = MaskedNet.of(model)  # weight layer l writes hidden layer l (the last one: the outputs)
        self.layers = self.net.layers
        self.L = len(self.layers) - 1  # hidden layers
        self.norms = [n if isinstance(n, nn.BatchNorm2d) else None for n in norms] + [None] * (self.L - len(norms))
        self.names = self.net.names[:-1]
        # step 3 of the last task: θ per layer, validation accuracy unpruned / pruned / fine-tuned, passes
        self.register_buffer("theta", torch.full((self.L,), float("nan"), device=device))
        self.register_buffer("val_acc", torch.full((3,), float("nan"), device=device))
        self.register_buffer("evals", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("task", torch.tensor(-1, device=device))
        if self.hp.init == "xavier":  # [choice] Glorot-uniform weights, zero biases (Keras' default)
            for mod in self.layers:
                draw_init(mod.weight, mod.bias, self.hp.init)
        if not self.multi_head and self.hp.out_bias == "zero":
            nn.init.zeros_(model.out.bias)
        # gates, activity taps and held BatchNorm statistics of the hidden units (models/units.py)
        self.units = UnitHooks(self.layers[:self.L], self.norms)

    @property
    def tags(self) -> list:  # per hidden layer: the task that committed each neuron (-1: free)
        return [m.unit_owner for m in self.layers[:self.L]]

    def _tgt(self, l: int):  # owners of the neurons weight layer l writes (None: the single head, shared)
        return self.layers[l].unit_owner if l < self.L or self.multi_head else None

    def _src(self, l: int) -> torch.Tensor:  # owners of the neurons it reads, per column (inputs: active)
        if l == 0:
            return torch.zeros(self.layers[0].weight.shape[1], dtype=torch.int16, device=self.device)
        return self.net.cols(l, self.layers[l - 1].unit_owner)

    def interference(self, l: int) -> torch.Tensor:
        """W_int of weight layer l (Sec. 2.1), cut at commit (single head: none in the output layer)."""
        return self.layers[l].as_weight(self.layers[l].owner == CUT)

    # -- steps 1 and 5: training only what may change --------------------------------------------------
    def _phase(self, task, s: int, core: bool = True) -> None:
        """Trainable entries for one phase: s = -1 trains the free neurons (step 1, reading every neuron);
        s = t fine-tunes task t's survivors (step 5, reading active neurons only, W_int held at 0);
        core=False trains the new head alone (a depleted multi-head network, Sec. 2.1)."""
        single_bias = task.id == 0 and self.hp.out_bias == "first_task"  # [choice] frozen after task 1
        weights, biases, extra = [], [], []
        for l, mod in enumerate(self.layers):
            T, S = self._tgt(l), self._src(l)
            cols = torch.ones_like(S, dtype=torch.bool) if s < 0 else S >= 0
            if l < self.L:
                rows = (T == s) & core
            elif self.multi_head:  # this task's head
                rows = torch.zeros_like(T, dtype=torch.bool)
                rows[task.classes] = True
            else:  # single head: every output reads this task's columns only
                rows, cols = torch.ones(mod.weight.shape[0], dtype=torch.bool, device=S.device), S == s
            weights.append(rows[:, None] & cols[None, :])
            biases.append(rows if T is not None else torch.full_like(rows, single_bias))
            norm = self.norms[l] if l < self.L else None
            if norm is not None:
                extra += [(norm.weight, rows), (norm.bias, rows)]  # a channel's γ, β belong to its neuron
        # committed channels keep their BatchNorm statistics while later tasks train
        self.units.hold_norms([(T >= 0) & (T != s) for T in self.tags])
        if not self.multi_head:  # Sec. 2.1, single head: task t's output sees only its own last-hidden neurons
            self.units.gates[-1] = (self.tags[-1] == s).float()
        self.net.train_only(weights, biases, extra, hold=True)

    def after_backward(self, task) -> None:
        for mod, lam in zip(self.layers, self.hp.l1):
            if lam and mod.weight.grad is not None:  # ∂(λ‖W‖₁)/∂W = λ·sign(W), without an autograd graph
                mod.weight.grad.add_(mod.weight.detach().sign(), alpha=lam)
        self.net.mask_grads()

    @torch.no_grad()
    def after_step(self, task) -> None:
        # weight decay and moments move zero-gradient entries: frozen ones go back, bit-identical
        self.net.restore()
        self.units.restore_norms()

    def _run(self, task, s: int, core: bool, epochs: int, lr: float) -> None:
        self._phase(task, s, core)
        try:
            if self.net.entries:  # empty when e.g. a task kept no neuron to fine-tune
                self.optimizer = self.make_optimizer(self.net.params(), lr)  # rebuilt per phase
                self.train_epochs(task, task.train, epochs)
        finally:
            self.units.clear()
            self.net.end_phase()

    # -- steps 2 and 3: activity and the graceful-forgetting scan ----------------------------------
    @torch.no_grad()
    def _pass(self, split, task=None, gates=None) -> float:
        """One eval-mode pass over `split` under neuron gates; task-aware accuracy (%) when `task` is given."""
        was = self.model.training
        self.model.eval()
        self.units.gates = gates or [None] * self.L
        lo, hi = (task.classes[0], task.classes[-1] + 1) if task is not None else (0, 0)
        correct, bs = torch.zeros((), dtype=torch.long, device=self.device), self.cfg.eval.batch_size
        for i in range(0, len(split.y), bs):
            logits = self.model(split.x[i:i + bs])
            if task is not None:
                correct += (logits[:, lo:hi].argmax(1) + lo == split.y[i:i + bs]).sum()
        self.units.gates = [None] * self.L
        self.model.train(was)
        return 100.0 * correct.item() / len(split.y)

    def _scan(self, task, act: list) -> tuple:
        """Step 3: the largest θ (per layer, greedily in `scan_order`, or one shared) whose validation
        accuracy is ≥ best − m. Pruning is simulated by gating neurons to 0, which for the pruned network's
        outputs equals zeroing the interference weights it would create. Returns keep masks, accuracies."""
        hp, tags = self.hp, self.tags
        free = [t < 0 for t in tags]

        def accuracy(keep):
            gates = [((t >= 0) | k).float() for t, k in zip(tags, keep)]
            if not self.multi_head:  # single head: other tasks' last-hidden neurons masked
                gates[-1] = keep[-1].float()
            self.evals += 1
            return self._pass(task.val, task, gates)

        self.evals.zero_()
        best = accuracy(free)
        floor = best - hp.margin if hp.margin_mode == "absolute" else best * (1 - hp.margin / 100)
        order = list(range(self.L))[::-1] if hp.scan_order == "last_first" else list(range(self.L))
        groups = [order] if hp.threshold == "shared" else [[l] for l in order]
        keep, acc = list(free), best
        for group in groups:
            values = torch.unique(torch.cat([act[l][free[l]] for l in group]))  # sorted candidate θs

            def keep_at(k, group=group, values=values, base=list(keep)):
                return [free[l] & (act[l] > values[k]) if (l in group and k >= 0) else base[l] for l in range(self.L)]

            k, acc = self._search(len(values), lambda k, f=keep_at: accuracy(f(k)), floor, acc)
            keep = keep_at(k)
            for l in group:
                self.theta[l] = values[k] if k >= 0 else -1.0
        return keep, best, acc

    def _search(self, n: int, acc_of, floor: float, acc_none: float) -> tuple:
        """Largest k in -1..n-1 (-1: prune nothing, known to pass) with acc_of(k) ≥ floor, in at most
        `scan_steps` passes: `grid` tries evenly spaced k from low to high and keeps the largest that
        passes; `bisect` halves the interval, assuming accuracy falls as θ rises."""
        best_k, best_acc = -1, acc_none
        if n == 0:  # no free neuron to prune in this layer
            return best_k, best_acc
        if self.hp.scan == "grid":
            for k in sorted({round(i * (n - 1) / max(1, self.hp.scan_steps - 1)) for i in range(self.hp.scan_steps)}):
                a = acc_of(k)
                if a >= floor:
                    best_k, best_acc = k, a
            return best_k, best_acc
        hi = n
        for _ in range(self.hp.scan_steps):
            if hi - best_k <= 1:
                break
            mid = (best_k + hi) // 2
            a = acc_of(mid)
            if a >= floor:
                best_k, best_acc = mid, a
            else:
                hi = mid
        return best_k, best_acc

    # -- step 4: commit ------------------------------------------------------------------------------
    @torch.no_grad()
    def _commit(self, task, keep: list) -> None:
        """Survivors (multi-head: the head rows too) are reserved by task t, the connections into them from active
        neurons become task t's, those from free ones are cut; single head: the output columns of its neurons."""
        t = task.id
        for T, k in zip(self.tags, keep):
            T.masked_fill_(k, t)
        if self.multi_head:
            self.layers[-1].unit_owner[task.classes] = t
        for l, mod in enumerate(self.layers):
            T, S = self._tgt(l), self._src(l)
            if T is None:
                mod.owner[:, S == t] = t
                continue
            new = T == t
            mod.owner[new[:, None] & (S >= 0)[None, :]] = t
            mod.owner[new[:, None] & (S < 0)[None, :]] = CUT
            mod.weight.masked_fill_(self.interference(l), 0.0)

    @torch.no_grad()
    def _reinit_free(self) -> None:
        """Alg. 1 "Re-initialize W_free": every weight into a free neuron (single head: the output columns of
        free last-hidden neurons) drawn afresh by `init`, free biases too, BatchNorm of free channels reset."""
        for l, mod in enumerate(self.layers):
            T, S = self._tgt(l), self._src(l)
            rows = T < 0 if T is not None else torch.ones(mod.weight.shape[0], dtype=torch.bool, device=S.device)
            cols = torch.ones_like(S, dtype=torch.bool) if T is not None else S < 0
            # the single head's biases are not redrawn (they freeze after task 1 or stay 0)
            self.net.redraw(l, rows[:, None] & cols[None, :], rows if T is not None else None,
                            lambda w, b: draw_init(w, b, self.hp.init))
            norm = self.norms[l] if l < self.L else None
            if norm is not None:
                for v, x in ((norm.weight, 1.0), (norm.bias, 0.0), (norm.running_mean, 0.0), (norm.running_var, 1.0)):
                    v.masked_fill_(rows, x)

    # -- the task ------------------------------------------------------------------------------------
    def fit_task(self, task) -> dict:
        hp, t = self.hp, task.id
        core = t == 0 or bool((self.tags[-1] < 0).any())  # the last hidden layer has free neurons
        if not core and hp.depleted == "stop":
            raise CapacityError(f"clnp: all {len(self.tags[-1])} neurons of the last hidden layer ({self.names[-1]}) "
                                f"are taken after {t} tasks, none left for task {t + 1}; the finished tasks are kept "
                                "(widen the layer, raise method.margin / method.l1, or train longer for sparser tasks)")
        if t > 0 and hp.reinit_free:
            self._reinit_free()
        # step 1 (a depleted multi-head network trains its new head only, like last-layer transfer, Sec. 2.1)
        self._run(task, -1 if core else t, core, hp.epochs, hp.lr)
        self.theta.fill_(float("nan")), self.val_acc.fill_(float("nan"))
        if core:  # steps 2-3
            act = self.units.mean_activity(lambda: self._pass(task.train if hp.activity_split == "train" else task.val))
            keep, best, pruned = self._scan(task, act)
        else:
            keep = [torch.zeros_like(x, dtype=torch.bool) for x in self.tags]
            best = pruned = self._pass(task.val, task)
            self.evals.fill_(1)
        self._commit(task, keep)  # step 4
        self.val_acc[0], self.val_acc[1] = best, pruned
        if hp.finetune_epochs and core:  # step 5: the survivors retrain, interference held at 0
            self._run(task, t, True, hp.finetune_epochs, hp.finetune_lr)
            gates = None if self.multi_head else [None] * (self.L - 1) + [(self.tags[-1] == t).float()]
            self.val_acc[2] = self._pass(task.val, task, gates)
        self.task.fill_(t)
        cap, diag = self.capacity(), self.diagnostics()
        log.info("clnp task %d: %s | val %.2f -> %.2f (%d passes)%s", t + 1, ", ".join(
            f"{n} {cap[n]['units_used_pct']:.1f}% used (+{cap[n]['units_new']}, {cap[n]['units_free']} free)"
            for n in self.names), best, pruned, int(self.evals), "" if core else " | last hidden layer full: head-only transfer")
        return diag

    def steps_per_task(self, task) -> int:
        return (self.hp.epochs + self.hp.finetune_epochs) * -(-len(task.train.y) // self.hp.batch_size)

    # -- prediction and diagnostics -----------------------------------------------------------------
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        y = self.model.out(h)
        return y.mean((2, 3)) if y.dim() == 4 else y  # fully convolutional: global average pool

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        return self.predict_pair(x, task_id)[1 if task_id is not None else 0]

    @torch.no_grad()
    def predict_pair(self, x: torch.Tensor, task_id: int | None) -> tuple:
        """One forward of the body for both accuracies. Single head: task-aware = only task `task_id`'s
        last-hidden neurons reach the output (Sec. 2.1); task-agnostic = every committed neuron does.
        Multi-head: the heads already read only their own neurons, so both are the plain logits."""
        if self.multi_head:
            logits = self.model(x)
            return logits, logits
        h, last = self.model.features(x), self.tags[-1]
        agnostic = self._head(h * (last >= 0).float().view(1, -1, *[1] * (h.dim() - 2)))
        if task_id is None:
            return agnostic, agnostic
        return agnostic, self._head(h * (last == task_id).float().view(1, -1, *[1] * (h.dim() - 2)))

    def capacity(self) -> dict:
        """Paper Figs. 3, 4b, 5b: neurons used, added, reused and free per layer (models/masked_net.py)."""
        return self.net.capacity(len(self.stream.tasks), int(self.task), units=self.L)

    def diagnostics(self) -> dict:
        """Step 3 of the last task: θ per layer (-1: none pruned), validation accuracies, passes it took."""
        acc = self.val_acc.tolist()
        out = {f"theta/{name}": float(th) for name, th in zip(self.names, self.theta.tolist())}
        out.update(val_acc_unpruned=acc[0], val_acc_pruned=acc[1], scan_evals=float(self.evals))
        if self.hp.finetune_epochs:
            out["val_acc_finetuned"] = acc[2]
        return out
