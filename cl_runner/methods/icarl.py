"""iCaRL (Rebuffi et al. 2017) as van de Ven & Tolias 2019 run it (`preprints` branch: `--icarl` = binary
cross-entropy with distillation, stored exemplars added to the training data, herding, normalised features,
nearest-mean-of-exemplars classification; exemplars.py, encoder.py, train.py; ../shared/specs/baselines.md).
Class-incremental only.

Per task t:
  1. Training data: the task's training set together with every stored exemplar (with its label).
  2. Loss per minibatch x (Alg. 3): binary cross-entropy with logits over the classes seen so far, summed over
     classes, averaged over the batch; the targets are one-hot for the task's new classes and, for the old
     classes, the previous model's sigmoid(score / T) on the same x (distillation; T = 2 in the 2019 code).
  3. After the task (Alg. 4-5): each class keeps m = memory // (classes seen) exemplars: old classes their first
     m (herding order), each new class m picked by herding on the L2-normalised features (the last hidden layer)
     of its training samples, towards their normalised mean.
  4. Class means (Alg. 1): per class, the normalised mean of its exemplars' normalised features; a test input is
     classified as the class whose mean is nearest to its normalised features.
The previous model becomes a copy of this one after the task.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Split
from ..data.memory import empty_memory, gather, herding_order
from . import METHODS, Method
from .replay import FrozenCopy
from .schemas import ICaRLConfig, check_icarl


@METHODS.register("icarl", ICaRLConfig)
class ICaRL(Method):
    check_config = staticmethod(check_icarl)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.previous = FrozenCopy(model)
        self.register_buffer("memory", empty_memory(self.hp.memory, device))  # (task, index, label), herding order
        with torch.no_grad():
            width = model.features(stream.tasks[0].train.x[:1]).shape[1]
        self.register_buffer("means", torch.zeros(stream.n_outputs, width, device=device))  # step 4, per class
        self.gen = torch.Generator().manual_seed(cfg.seed)  # herding=false: which samples are stored

    def fit_task(self, task) -> dict[str, float]:
        self.begin_task(task)
        self.setup_optimizer(self.model.parameters())
        xm, ym = gather(self.memory, self.stream.tasks)  # 1. the task's data and the exemplars
        split = task.train if xm is None else Split(torch.cat([task.train.x, xm]), torch.cat([task.train.y, ym]))
        self.train_task(task, split)
        self.end_task(task)
        return {}

    def steps_per_task(self, task) -> int:
        if self.hp.steps:
            return self.hp.steps
        stored = int((self.memory[:, 0] >= 0).sum())
        return self.hp.epochs * -(-(len(task.train.y) + stored) // self.hp.batch_size)

    def batch_loss(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        active, lo = self.active(self.model(x), task)  # 2. the classes seen so far
        targets = F.one_hot(y - lo, active.shape[1]).to(active.dtype)
        if task.id > 0:
            old = self._seen_width(task.id - 1) - lo
            targets[:, :old] = torch.sigmoid(self.previous(x)[:, lo:lo + old] / self.hp.temperature)
        return F.binary_cross_entropy_with_logits(active, targets, reduction="none").sum(1).mean()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.features(x), dim=1)

    @torch.no_grad()
    def end_task(self, task) -> None:
        self.model.eval()
        seen = sorted({c for t in self.stream.tasks[:task.id + 1] for c in t.classes})
        m = len(self.memory) // len(seen)  # 3.
        old = self.memory[self.memory[:, 0] >= 0]
        rows = [old[old[:, 2] == c][:m] for c in seen if c not in task.classes]
        for c in task.classes:
            pool = (task.train.y == c).nonzero().squeeze(1)
            if self.hp.herding:
                f = self.features(task.train.x[pool])
                pick = pool[herding_order(f, m, F.normalize(f.mean(0), dim=0))]
            else:
                pick = pool[torch.randperm(len(pool), generator=self.gen)[:m].to(pool.device)]
            rows.append(torch.stack([torch.full_like(pick, task.id), pick, torch.full_like(pick, c)], 1))
        rows = torch.cat(rows)
        self.memory.fill_(-1)[:len(rows)] = rows
        xm, ym = gather(self.memory, self.stream.tasks)  # 4. the class means
        f = self.features(xm)
        sums = torch.zeros_like(self.means).index_add_(0, ym, f)
        self.means.copy_(F.normalize(sums, dim=1))  # normalising the sum normalises the mean; unseen rows stay 0
        self.previous.update(self.model)
        self.model.train()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """−‖φ(x) − μ_c‖² per class c: the nearest class mean has the largest score (the engine masks the classes
        not seen yet, and keeps a task's own classes for task-aware accuracy)."""
        return -torch.cdist(self.features(x), self.means).square()

    def extra_state(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
