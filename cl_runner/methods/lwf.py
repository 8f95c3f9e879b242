"""Learning without Forgetting (Li & Hoiem 2017) as van de Ven & Tolias 2019 run it (`preprints` branch:
`--replay=current --distill`; ../shared/specs/baselines.md): the current task's inputs are "replayed" to the
model as it was after the previous task, and its scores on them are distilled into the model being trained.

Per step on task t (1-based), minibatch x with labels y:
  1. CE: cross-entropy of the model on (x, y) over the units active in training (`Method.active`);
  2. KD: distillation (temperature T, × T²) towards the previous model's scores on x: class-IL over the classes
     seen so far, its probabilities of the old classes padded with zeros for the new ones; task-IL on each
     previous task's own units, averaged over those tasks (methods/replay.py);
  3. loss = (1/t)·CE + (1 − 1/t)·KD (the code's `rnt`; weighting=sum: CE + replay_lambda·KD).
After the task the previous model becomes a copy of this one. Task 1 trains on CE alone.
"""
from __future__ import annotations

import torch

from . import METHODS, Method
from .replay import FrozenCopy, mix, replayed_loss
from .schemas import LwFConfig


@METHODS.register("lwf", LwFConfig)
class LwF(Method):
    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.previous = FrozenCopy(model)  # a submodule: checkpoints carry it

    def batch_loss(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        current = self.loss(out, y, task)  # 1. CE
        if task.id == 0:
            return current
        distilled = replayed_loss(self, out, self.previous(x), task, "soft", self.hp.temperature)  # 2. KD
        return mix(current, distilled, task, self.hp)  # 3.

    def end_task(self, task) -> None:
        self.previous.update(self.model)
