"""CLNP (Golkar, Kagan & Cho 2019): continual learning via neural pruning. Read beside
../shared/specs/clnp.md (steps 1-5) and the paper's Sec. 2 and Alg. 1; [choice] = a key in conf/method/clnp.yaml.

Per task t: 1 train only the free weights (those into free neurons) with CE + Σ_l λ_l‖W_l‖₁; 2 mean
activity of every free neuron (a channel: mean over N×H×W); 3 graceful forgetting: scan the activity
threshold θ on the validation split for the sparsest network within m of the unpruned accuracy;
4 commit: survivors are tagged t, weights from inactive into active neurons (interference, W_int) are
zeroed, all weights into active neurons and their biases freeze; 5 optionally fine-tune the survivors.

Masks live in one place: `tag_<l>` per hidden layer (-1 = free, else the task that committed the neuron)
and `tag_out` (multi-head: the task of each output row). Trainable, frozen and interference masks, the
single-head test-time mask and every capacity figure derive from the tags and the weights.

BatchNorm (cnn_wide): a channel's γ, β and running statistics belong to its neuron, like a bias: they
train while it is free and freeze when it is committed. While later tasks train, committed channels are
normalised with their frozen statistics rather than the new task's batch statistics (so new neurons read
exactly the features old tasks compute at test time), and each batch's update of those statistics is undone.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig, key
from ..errors import CapacityError, ConfigError
from . import METHODS, Method

log = logging.getLogger("cl_runner")

@dataclass
class CLNPConfig(MethodConfig):
    l1: List[float] = key(ge=0, per_layer="weights")  # λ_l (Sec. 2.2)
    margin: float = key(ge=0)  # m, in accuracy points (absolute) or percent of `best` (relative)
    margin_mode: str = key(choices=("absolute", "relative"))
    threshold: str = key(choices=("per_layer", "shared"))
    scan: str = key(choices=("bisect", "grid"))
    scan_steps: int = key(ge=1)  # validation passes per scanned θ (the scan's bound)
    scan_order: str = key(choices=("last_first", "first_last"))
    activity_split: str = key(choices=("train", "val"))
    reinit_free: bool = key()
    out_bias: str = key(choices=("first_task", "zero"))
    finetune_epochs: int = key(ge=0)
    finetune_lr: float = key(gt=0)
    depleted: str = key(choices=("stop", "transfer"))
    init: str = key(choices=("model", "xavier"))


@METHODS.register("clnp", CLNPConfig)
class CLNP(Method):
    task_aware_predict = True

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.dataset.val_fraction <= 0:
            raise ConfigError("method=clnp needs dataset.val_fraction > 0 (the threshold scan runs on the "
                              "validation split; the paper holds out 0.1)")
        if cfg.model.get("activation", "relu") != "relu":
            raise ConfigError(f"method=clnp prunes by mean ReLU activity: it needs model.activation=relu, "
                              f"got {cfg.model.activation}")
        if cfg.method.depleted == "transfer" and cfg.model.head != "multi":
            raise ConfigError("method.depleted=transfer (head-only training once the last hidden layer is "
                              "full) needs model.head=multi")

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        convs, norms = list(getattr(model, "convs", [])), list(getattr(model, "norms", []))
        self.layers = [*convs, *model.hidden, model.out]  # weight layer l writes hidden layer l (last: out)
        self.L = len(self.layers) - 1  # hidden layers
        self.norms = [n if isinstance(n, nn.BatchNorm2d) else None for n in norms] + [None] * (self.L - len(norms))
        self.names = [f"conv{i + 1}" for i in range(len(convs))] + [f"fc{i + 1}" for i in range(len(model.hidden))]
        for l in range(self.L):
            self.register_buffer(f"tag_{l}", torch.full((self.layers[l].weight.shape[0],), -1, device=device))
        self.register_buffer("tag_out", torch.full((stream.n_outputs,), -1, device=device))
        # step-3 diagnostics of the last task: θ per layer (-1: nothing pruned) and validation accuracy
        # unpruned / pruned / fine-tuned, number of validation passes, and the task they belong to
        self.register_buffer("theta", torch.full((self.L,), float("nan"), device=device))
        self.register_buffer("val_acc", torch.full((3,), float("nan"), device=device))
        self.register_buffer("evals", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("task", torch.tensor(-1, device=device))
        if self.hp.init == "xavier":  # [choice] Glorot-uniform weights, zero biases (Keras' default)
            with torch.no_grad():
                for mod in self.layers:
                    self._draw(mod.weight, mod.bias)
        if not self.multi_head and self.hp.out_bias == "zero":
            nn.init.zeros_(model.out.bias)
        # per-phase state, derived from the tags (never saved): neuron gates, activity sums, BatchNorm
        # channels to hold, and (param, bool mask, float mask, λ, values to hold) for what trains
        self._gates: list = [None] * self.L
        self._act = self._count = None
        self._bn: list = [None] * self.L
        self._train: list = []
        for l in range(self.L):  # the module whose output channels are hidden layer l's neurons (pre-ReLU)
            (self.layers[l] if self.norms[l] is None else self.norms[l]).register_forward_hook(self._hook(l))

    @property
    def tags(self) -> list:
        return [getattr(self, f"tag_{l}") for l in range(self.L)]

    # -- neurons: one forward hook per hidden layer -------------------------------------------------
    @staticmethod
    def _chan(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *[1] * (like.dim() - 2))  # per-neuron vector against [N, C(, H, W)]

    def _hook(self, l: int):
        def hook(module, inputs, out):
            bn = self._bn[l]
            if bn is not None and module.training:
                # BatchNorm of committed channels: normalised by their committed running statistics even
                # while later tasks train, so new neurons read exactly the features the old tasks compute
                # at test time (after_step puts those statistics back after the batch updated them)
                frozen, mean, var = bn
                held = F.batch_norm(inputs[0], mean, var, module.weight, module.bias, False, 0.0, module.eps)
                out = torch.where(self._chan(frozen, out), held, out)
            if self._act is not None:  # step 2: Σ ReLU output per neuron
                self._act[l] += torch.relu(out).sum([d for d in range(out.dim()) if d != 1])
                self._count[l] += out.numel() // out.shape[1]
            g = self._gates[l]  # 0 = neuron removed (its ReLU output is then 0)
            return out if g is None else out * self._chan(g, out)
        return hook

    def _tgt(self, l: int):
        """Tags of the neurons weight layer l writes (None: the single head, shared by all tasks)."""
        return self.tags[l] if l < self.L else (self.tag_out if self.multi_head else None)

    def _src(self, l: int) -> torch.Tensor:
        """Tags of the neurons weight layer l reads, one per input column (inputs count as active)."""
        w = self.layers[l].weight
        if l == 0:
            return torch.zeros(w.shape[1], dtype=torch.long, device=w.device)
        s = self.tags[l - 1]
        return s.repeat_interleave(w.shape[1] // len(s)) if w.dim() == 2 else s  # dense after convs: C·h·w

    def _pair(self, l: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self._as_weight(l, rows[:, None] & cols[None, :])

    def _as_weight(self, l: int, m: torch.Tensor) -> torch.Tensor:
        return m.view(*m.shape, *[1] * (self.layers[l].weight.dim() - 2))  # [out, in] → conv: [out, in, 1, 1]

    def interference(self, l: int):
        """W_int of weight layer l (Sec. 2.1), exactly 0 after every task: from a free neuron, or one committed
        after the target, into an active neuron. Multi-head: old heads read only neurons of their task or
        earlier. Single head: None, other tasks' last-hidden neurons are masked at the output instead."""
        T, S = self._tgt(l), self._src(l)
        if T is None:
            return None
        T, S = T[:, None], S[None, :]
        return self._as_weight(l, (T >= 0) & ((S < 0) | (S > T)))

    # -- steps 1 and 5: training only what may change --------------------------------------------------
    def _phase(self, task, s: int, core: bool = True) -> None:
        """Trainable entries for one phase: s = -1 trains the free neurons (step 1, reading every neuron);
        s = t fine-tunes task t's survivors (step 5, reading active neurons only, W_int held at 0);
        core=False trains the new head alone (a depleted multi-head network, Sec. 2.1)."""
        self._train = []
        single_bias = task.id == 0 and self.hp.out_bias == "first_task"  # [choice] frozen after task 1
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
            self._add(mod.weight, self._pair(l, rows, cols), self.hp.l1[l])
            if mod.bias is not None:
                self._add(mod.bias, rows if T is not None else torch.full_like(rows, single_bias), 0.0)
            norm = self.norms[l] if l < self.L else None
            if norm is not None:
                self._add(norm.weight, rows, 0.0)
                self._add(norm.bias, rows, 0.0)
                self._bn[l] = ((T >= 0) & (T != s), norm.running_mean.clone(), norm.running_var.clone())
        if not self.multi_head:  # Sec. 2.1, single head: task t's output sees only its own last-hidden neurons
            self._gates[-1] = (self.tags[-1] == s).float()
        trainable = {id(p) for p, *_ in self._train}
        for p in self.model.parameters():  # no gradient at all for what cannot change
            p.requires_grad_(id(p) in trainable)

    def _add(self, p: torch.Tensor, mask: torch.Tensor, lam: float) -> None:
        if bool(mask.all()):  # wholly trainable: nothing to mask or hold
            self._train.append((p, None, None, lam, None))
        elif bool(mask.any()):
            self._train.append((p, mask, mask.float(), lam, p.detach().clone()))

    def after_backward(self, task) -> None:
        for p, _, maskf, lam, _ in self._train:
            if p.grad is not None:
                if lam:  # ∂(λ‖W‖₁)/∂W = λ·sign(W): the L1 term without an autograd graph over every weight
                    p.grad.add_(p.detach().sign(), alpha=lam)
                if maskf is not None:
                    p.grad.mul_(maskf)

    @torch.no_grad()
    def after_step(self, task) -> None:
        # a zero gradient is not enough (weight decay, or moments built up before a mask changed, move an
        # entry anyway): everything outside the mask is put back, so frozen weights stay bit-identical
        for p, mask, _, _, held in self._train:
            if mask is not None:
                p.copy_(torch.where(mask, p, held))
        for norm, bn in zip(self.norms, self._bn):
            if bn is not None:
                frozen, mean, var = bn
                norm.running_mean.copy_(torch.where(frozen, mean, norm.running_mean))
                norm.running_var.copy_(torch.where(frozen, var, norm.running_var))

    def _run(self, task, s: int, core: bool, epochs: int, lr: float) -> None:
        self._phase(task, s, core)
        if self._train:  # empty when e.g. a task kept no neuron to fine-tune
            self.optimizer = self.make_optimizer([p for p, *_ in self._train], lr)  # rebuilt per phase
            self.train_epochs(task, task.train, epochs)
        self._gates, self._bn = [None] * self.L, [None] * self.L

    # -- steps 2 and 3: activity and the graceful-forgetting scan ----------------------------------
    @torch.no_grad()
    def _pass(self, split, task=None, gates=None) -> float:
        """One eval-mode pass over `split` under neuron gates; task-aware accuracy (%) when `task` is given."""
        was = self.model.training
        self.model.eval()
        self._gates = gates or [None] * self.L
        lo, hi = (task.classes[0], task.classes[-1] + 1) if task is not None else (0, 0)
        correct, bs = torch.zeros((), dtype=torch.long, device=self.device), self.cfg.eval.batch_size
        for i in range(0, len(split.y), bs):
            logits = self.model(split.x[i:i + bs])
            if task is not None:
                correct += (logits[:, lo:hi].argmax(1) + lo == split.y[i:i + bs]).sum()
        self._gates = [None] * self.L
        self.model.train(was)
        return 100.0 * correct.item() / len(split.y)

    def _activity(self, split) -> list:
        """Step 2: mean ReLU output of every neuron (a channel: over batch × H × W) on `split`."""
        self._act = [torch.zeros(len(t), device=self.device) for t in self.tags]
        self._count = [0] * self.L
        self._pass(split)
        act = [a / n for a, n in zip(self._act, self._count)]
        self._act = self._count = None
        return act

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
        for t, k in zip(self.tags, keep):
            t.masked_fill_(k, task.id)
        if self.multi_head:
            self.tag_out[task.classes] = task.id
        for l, mod in enumerate(self.layers):
            m = self.interference(l)
            if m is not None:
                mod.weight.masked_fill_(m, 0.0)

    def _draw(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        """Fill a weight (and its bias) in place as `init` says: xavier = Glorot uniform and zero bias;
        model = PyTorch's default for Linear / Conv2d, U(±1/√fan_in) for the bias."""
        if self.hp.init == "xavier":
            nn.init.xavier_uniform_(w)
            if b is not None:
                nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if b is not None:
                bound = 1 / math.sqrt(w[0].numel())
                nn.init.uniform_(b, -bound, bound)

    @torch.no_grad()
    def _reinit_free(self) -> None:
        """Alg. 1 "Re-initialize W_free": every weight into a free neuron (single head: the output columns of
        free last-hidden neurons) drawn afresh by `init`, free biases too, BatchNorm of free channels reset."""
        for l, mod in enumerate(self.layers):
            T, S = self._tgt(l), self._src(l)
            w = mod.weight
            rows = T < 0 if T is not None else torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            cols = torch.ones_like(S, dtype=torch.bool) if T is not None else S < 0
            fresh = torch.empty_like(w)
            # the single head's biases are not redrawn (they freeze after task 1 or stay 0)
            fresh_b = None if mod.bias is None or T is None else torch.empty_like(mod.bias)
            self._draw(fresh, fresh_b)
            w.copy_(torch.where(self._pair(l, rows, cols), fresh, w))
            if fresh_b is not None:
                mod.bias.copy_(torch.where(rows, fresh_b, mod.bias))
            norm = self.norms[l] if l < self.L else None
            if norm is not None:
                for v, x in ((norm.weight, 1.0), (norm.bias, 0.0), (norm.running_mean, 0.0), (norm.running_var, 1.0)):
                    v.masked_fill_(rows, x)

    # -- the task ------------------------------------------------------------------------------------
    def fit_task(self, task) -> torch.Tensor:
        hp, t = self.hp, task.id
        core = True
        if t > 0 and not bool((self.tags[-1] < 0).any()):
            n = len(self.tags[-1])
            if hp.depleted == "stop":
                raise CapacityError(f"clnp: all {n} neurons of the last hidden layer ({self.names[-1]}) are taken "
                                    f"after {t} tasks, none left for task {t + 1}; the finished tasks are kept (widen "
                                    "the layer, raise method.margin / method.l1, or train longer for sparser tasks)")
            core = False  # Sec. 2.1: a depleted multi-head network trains like last-layer transfer
        if t > 0 and hp.reinit_free:
            self._reinit_free()
        try:
            self._run(task, -1 if core else t, core, hp.epochs, hp.lr)
            self.theta.fill_(float("nan"))
            self.val_acc.fill_(float("nan"))
            if core:
                act = self._activity(task.train if hp.activity_split == "train" else task.val)
                keep, best, pruned = self._scan(task, act)
            else:
                keep = [torch.zeros_like(x, dtype=torch.bool) for x in self.tags]
                best = pruned = self._pass(task.val, task)
                self.evals.fill_(1)
            self._commit(task, keep)
            self.val_acc[0], self.val_acc[1] = best, pruned
            if hp.finetune_epochs and core:  # step 5: the survivors retrain, interference held at 0
                self._run(task, t, True, hp.finetune_epochs, hp.finetune_lr)
                gates = None if self.multi_head else [None] * (self.L - 1) + [(self.tags[-1] == t).float()]
                self.val_acc[2] = self._pass(task.val, task, gates)
            self.task.fill_(t)
            cap = self.capacity()
            log.info("clnp task %d: %s | val %.2f -> %.2f (%d passes)%s", t + 1, ", ".join(
                f"{n} {cap[n]['used_pct']:.1f}% used (+{cap[n]['new']}, {cap[n]['free']} free)" for n in self.names),
                best, pruned, int(self.evals), "" if core else " | last hidden layer full: head-only transfer")
        finally:
            self._gates, self._bn, self._train = [None] * self.L, [None] * self.L, []
            for p in self.model.parameters():
                p.requires_grad_(True)
        return self.val_acc[1]

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
        agnostic = self._head(h * self._chan((last >= 0).float(), h))
        if task_id is None:
            return agnostic, agnostic
        return agnostic, self._head(h * self._chan((last == task_id).float(), h))

    @torch.no_grad()
    def _reused(self, l: int, t: int) -> int:
        """Old active neurons of hidden layer l that task t's new neurons (or head) read with a nonzero weight."""
        T = self.tags[l]
        readers = self.tags[l + 1] == t if l + 1 < self.L else (self.tag_out == t if self.multi_head else None)
        if readers is None or not bool(readers.any()):
            return 0
        nz = self.layers[l + 1].weight[readers] != 0
        per_col = (nz.flatten(2).any(2) if nz.dim() > 2 else nz).any(0)
        return int(((T >= 0) & (T < t) & per_col.view(len(T), -1).any(1)).sum())

    def capacity(self) -> dict:
        """Per hidden layer after the last task (paper Figs. 3, 4b, 5b): % of neurons used, neurons added by
        this task, old neurons it reads (reuse), free neurons left, θ; then the scan's validation accuracies."""
        t, out = int(self.task), {}
        for l, (name, T) in enumerate(zip(self.names, self.tags)):
            used = int((T >= 0).sum())
            out[name] = {"used_pct": 100.0 * used / len(T), "new": int((T == t).sum()), "reused": self._reused(l, t),
                         "free": len(T) - used, "theta": float(self.theta[l])}
        acc = self.val_acc.tolist()
        out["scan"] = {"val_acc_unpruned": acc[0], "val_acc_pruned": acc[1], "evals": int(self.evals)}
        if self.hp.finetune_epochs:
            out["scan"]["val_acc_finetuned"] = acc[2]
        return out
