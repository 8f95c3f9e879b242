"""Experience replay (ER; van de Ven, Siegelmann & Tolias 2020; ../shared/specs/baselines.md): a memory of
real samples of the old classes, class-balanced and drawn at random, replayed beside every minibatch.

Per task t (1-based): each step's loss is (1/t)·L(current minibatch) + (1 − 1/t)·L(a minibatch of stored
samples) (`weighting: vdv`, the authors' code), or L(current) + replay_lambda·L(stored) (`sum`). The current
minibatch trains over the output units `active_outputs` names; a stored sample over its own task's units
when training is task-incremental (a head per task), else over the same units as the current one. After
the task, every seen class keeps memory // (classes seen) of its training samples (data/memory.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.memory import Replayer, empty_memory, gather, store_balanced
from . import METHODS, Method
from .replay import mix
from .schemas import ERConfig


@METHODS.register("er", ERConfig)
class ER(Method):
    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.register_buffer("memory", empty_memory(self.hp.memory, device))  # (task, index, label) rows
        task_of = torch.zeros(stream.n_outputs, dtype=torch.long)
        for t in stream.tasks:
            task_of[t.classes] = t.id
        self.register_buffer("task_of", task_of.to(device))  # class -> its task (label_mode=offset)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # which samples are stored (on the CPU)
        self.replayer = Replayer(None, None, self.hp.batch_size, self.shuffle_gen)

    def begin_task(self, task) -> None:
        self.replayer = Replayer(*gather(self.memory, self.stream.tasks), self.hp.batch_size, self.shuffle_gen)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, task) -> torch.Tensor:
        current = super().loss(logits, y, task)
        if not self.replayer:  # the first task: nothing stored yet
            return current
        xm, ym = self.replayer.next()
        out = self.model(xm)
        if self.multi_head or self.hp.active_outputs == "task":  # each stored sample on its own task's units
            own = self.task_of[None, :] == self.task_of[ym][:, None]
            replayed = F.cross_entropy(out.masked_fill(~own, float("-inf")), ym)
        else:
            replayed = super().loss(out, ym, task)
        return mix(current, replayed, task, self.hp)

    def end_task(self, task) -> None:
        seen = sorted({c for t in self.stream.tasks[:task.id + 1] for c in t.classes})
        store_balanced(self.memory, task, seen, self.gen)

    def extra_state(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
