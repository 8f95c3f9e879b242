"""The method contract and the standard minibatch loop.

A method is an `nn.Module` registered by name. The engine calls `fit_task(task)` for each task and
`predict(x, task_id)` to evaluate. The default `fit_task` rebuilds the optimizer (or keeps it across tasks:
method.reset_optimizer), runs `epochs` passes of shuffled minibatches (or `steps` minibatches: method.steps;
index slices of tensors already on the device) and calls the hooks below;
methods with a different training scheme override `fit_task` and reuse `train_epochs`. `fit_task`
returns the method's diagnostics for the task as {name: float} (empty by default, e.g. a pruning
threshold or a validation accuracy); the engine logs them as `method/<name>` at the task's step and
keeps them in results.json, so a method never needs a tracker. State that must survive a checkpoint
(masks, importances) belongs in registered buffers, not plain attributes.
"""
from __future__ import annotations

import copy
import importlib
import pkgutil

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig
from ..registry import METHODS


class Method(nn.Module):
    schema = MethodConfig
    trains_jointly = False  # True: the engine hands over all tasks' data as one task
    task_aware_predict = False  # True: predict(x, task_id) differs from predict(x), so evaluate twice

    def __init__(self, cfg, model: nn.Module, stream, device: torch.device):
        super().__init__()
        self.cfg, self.hp = cfg, cfg.method
        self.model, self.stream, self.device = model, stream, device
        self.multi_head = cfg.model.head == "multi"
        # one generator for minibatch order, on the data's device, so shuffling never syncs
        self.shuffle_gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.on_step = lambda: None  # set by the engine: advances the progress bar
        # set by the engine: called with (task, epoch) after an epoch whose loss was NaN/inf; it stops the run
        # or marks it, as the config's on_nonfinite says
        self.on_nonfinite = lambda task, epoch: None
        self.optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state = None  # a kept optimizer's state from a checkpoint, loaded by setup_optimizer
        self._widths: dict = {}  # task id -> output units of the classes seen by then (active_outputs=seen)

    # -- hooks (no-ops by default) ---------------------------------------------------------------
    def begin_task(self, task) -> None: ...
    def after_backward(self, task) -> None: ...  # e.g. gradient masking
    def after_step(self, task) -> None: ...  # e.g. importance accumulation, re-applying masks
    def end_epoch(self, task, epoch: int) -> None: ...  # e.g. drop/grow
    def end_task(self, task) -> None: ...

    # -- building blocks -------------------------------------------------------------------------
    def make_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        lr = self.hp.lr if lr is None else lr
        if self.hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.hp.momentum, weight_decay=self.hp.weight_decay)
        return torch.optim.Adam(params, lr=lr, weight_decay=self.hp.weight_decay)

    def active(self, logits: torch.Tensor, task) -> tuple[torch.Tensor, int]:
        """(the logits of the output units active in training on `task`, the label of its first column).
        A multi-head model's head is the task's block of contiguous labels; a single head trains over `all`
        its units, the classes of the tasks `seen` so far, or the current `task`'s (method.active_outputs,
        van de Ven & Tolias 2019: class-IL trains over the seen classes, task-IL over the task's)."""
        if self.multi_head or self.hp.active_outputs == "task":
            lo = task.classes[0]
            return logits[:, lo:lo + len(task.classes)], lo
        if self.hp.active_outputs == "seen" and not self.trains_jointly:
            # labels are contiguous from 0 in task order (offset) or shared by every task: a prefix
            return logits[:, :self._seen_width(task.id)], 0
        return logits, 0

    def _seen_width(self, task_id: int) -> int:
        """Output units of the classes of tasks 0..task_id (worked out once per task, not per step)."""
        if task_id not in self._widths:
            self._widths[task_id] = 1 + max(c for t in self.stream.tasks[:task_id + 1] for c in t.classes)
        return self._widths[task_id]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, task) -> torch.Tensor:
        active, lo = self.active(logits, task)
        return F.cross_entropy(active, y - lo if lo else y)

    def batch_loss(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of the minibatch (x, y); methods that need the inputs themselves (distillation
        from a previous model, replayed inputs) override this, the others only `loss`."""
        return self.loss(self.model(x), y, task)

    def step(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the minibatch (x, y) with the hooks; returns the detached loss."""
        loss = self.batch_loss(task, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward(task)
        self.optimizer.step()
        self.after_step(task)
        self.on_step()
        return loss.detach()

    def train_epochs(self, task, split, epochs: int) -> torch.Tensor:
        """Shuffled minibatch SGD over `split`; returns the last epoch's mean loss (a 0-d tensor)."""
        n, bs = len(split.y), self.hp.batch_size
        self.model.train()
        mean_loss = torch.zeros((), device=self.device)
        for epoch in range(epochs):
            order = torch.randperm(n, device=self.device, generator=self.shuffle_gen)
            total = torch.zeros((), device=self.device)
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                total += self.step(task, split.x[idx], split.y[idx])  # stays on the device: no sync in the loop
            mean_loss = total / -(-n // bs)
            if not bool(torch.isfinite(total)):  # one host sync per epoch: a NaN anywhere makes the sum NaN
                self.on_nonfinite(task, epoch)
            self.end_epoch(task, epoch)
        return mean_loss

    def train_steps(self, task, split, steps: int) -> torch.Tensor:
        """`steps` minibatches of `split` (method.steps), each pass a new shuffle; a pass ends when fewer than a
        minibatch are left (the 2019 code's DataLoader with drop_last). Returns the mean loss of the steps of
        the last pass (a 0-d tensor). A pass plays the role of an epoch for end_epoch and the NaN check."""
        n = len(split.y)
        bs = min(self.hp.batch_size, n)
        self.model.train()
        total, done, pos, epoch = torch.zeros((), device=self.device), 0, n, 0
        for s in range(steps):
            if pos + bs > n:  # a new pass: reshuffle on the device
                if s:
                    if not bool(torch.isfinite(total)):  # one host sync per pass
                        self.on_nonfinite(task, epoch)
                    self.end_epoch(task, epoch)
                    epoch, total, done = epoch + 1, torch.zeros((), device=self.device), 0
                order, pos = torch.randperm(n, device=self.device, generator=self.shuffle_gen), 0
            idx = order[pos:pos + bs]
            pos, done = pos + bs, done + 1
            total += self.step(task, split.x[idx], split.y[idx])
        if not bool(torch.isfinite(total)):
            self.on_nonfinite(task, epoch)
        return total / max(done, 1)

    def train_task(self, task, split) -> torch.Tensor:
        """The standard loop's training on `split`: method.steps minibatches, or method.epochs passes."""
        if self.hp.steps:
            return self.train_steps(task, split, self.hp.steps)
        return self.train_epochs(task, split, self.hp.epochs)

    def fit_task(self, task) -> dict[str, float]:
        """Train on `task`; returns this task's diagnostics {name: float} (none here)."""
        self.begin_task(task)
        self.setup_optimizer(self.model.parameters())
        self.train_task(task, task.train)
        self.end_task(task)
        return {}

    def setup_optimizer(self, params) -> None:
        """A new optimizer per task (method.reset_optimizer), else one for the whole run; a resumed run's
        kept optimizer gets its saved state back."""
        if self.optimizer is None or self.hp.reset_optimizer:
            self.optimizer = self.make_optimizer(params)
            if self._optimizer_state is not None:
                self.optimizer.load_state_dict(self._optimizer_state)
        self._optimizer_state = None

    def steps_per_task(self, task) -> int:
        """Optimizer steps `fit_task` will take (for progress bars)."""
        if self.hp.steps:
            return self.hp.steps
        return self.hp.epochs * -(-len(task.train.y) // self.hp.batch_size)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """Logits over the whole label space; task-agnostic when task_id is None."""
        return self.model(x)

    @torch.no_grad()
    def predict_pair(self, x: torch.Tensor, task_id: int) -> tuple:
        """(task-agnostic logits, task-aware logits for `task_id`) for evaluation. Methods whose
        task-aware prediction only masks the head override this to share one forward pass."""
        logits = self.predict(x)
        return logits, (self.predict(x, task_id) if self.task_aware_predict else logits)

    def capacity(self) -> dict | None:
        """Per-layer usage {layer: {quantity: number}} for methods that allocate capacity."""
        return None

    def write_artifacts(self, folder) -> None:
        """Method-specific figures/files for the run's artifacts (called once at the end of the run)."""

    # -- checkpoints: state that is not a parameter or buffer rides in the state_dict as extra state --
    def extra_state(self) -> dict:
        """Plain state a method keeps outside buffers (its own RNGs, figure data); tensors, numbers,
        strings, lists and dicts only (checkpoints load with weights_only)."""
        return {}

    def load_extra_state(self, state: dict) -> None: ...

    def get_extra_state(self) -> dict:
        state = {"shuffle_gen": self.shuffle_gen.get_state(), "method": self.extra_state()}
        if not self.hp.reset_optimizer and self.optimizer is not None:  # kept across tasks: resume needs it
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())  # a snapshot, not the live moments
        return state

    def set_extra_state(self, state: dict) -> None:
        self.shuffle_gen.set_state(state["shuffle_gen"])
        self.load_extra_state(state["method"])
        self._optimizer_state = state.get("optimizer")


# import every module in this package so their @METHODS.register decorators run
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Method", "METHODS"]
