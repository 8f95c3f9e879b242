"""Deep generative replay (Shin et al. 2017) as van de Ven & Tolias 2019 run it (`preprints` branch:
`--replay=generative`, with `--distill` for DGR + distillation; train.py, encoder.py, vae_models.py;
../shared/specs/baselines.md). A separate VAE (models/vae.py) learns the inputs of every task so far; copies of it
and of the classifier, frozen after each task, replay old inputs and label them.

Per step on task t (1-based), minibatch (x, y):
  1. From task 2 on, x' = 128 samples of the previous generator (as many as the minibatch), scored by the
     previous classifier; targets=hard labels them with its argmax (DGR), targets=soft distils its scores with
     temperature T, × T² (DGR + distillation).
  2. Classifier: loss = (1/t)·CE(x, y) + (1 − 1/t)·L(x'), L over the classes seen before task t (class-IL:
     within the seen classes' units; task-IL: each previous task's own units, averaged; methods/replay.py).
  3. Generator, one Adam step on the same data: (1/t)·VAE(x) + (1 − 1/t)·VAE(x'), VAE = per-pixel BCE + KL/pixels.
After the task both frozen copies are updated. Both optimizers live for the whole run (--optimizer=adam) unless
method.reset_optimizer.
"""
from __future__ import annotations

import copy

import torch

from ..models.vae import VAE
from . import METHODS, Method
from .replay import FrozenCopy, mix, replayed_loss
from .schemas import DGRConfig, check_dgr


@METHODS.register("dgr", DGRConfig)
class DGR(Method):
    check_config = staticmethod(check_dgr)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        self.previous = FrozenCopy(model)
        self.generator = VAE(stream.input_shape, list(self.hp.gen_hidden), self.hp.z_dim).to(device)
        self.previous_generator = FrozenCopy(self.generator)
        self.gen_optimizer: torch.optim.Optimizer | None = None
        self._gen_state = None  # the generator's Adam state from a checkpoint
        self._replayed = None  # this step's x', for the generator

    def begin_task(self, task) -> None:
        if self.gen_optimizer is None or self.hp.reset_optimizer:
            self.gen_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.hp.gen_lr, betas=(0.9, 0.999))
            if self._gen_state is not None:
                self.gen_optimizer.load_state_dict(self._gen_state)
        self._gen_state = None
        self.generator.train()

    def batch_loss(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        current = self.loss(self.model(x), y, task)
        self._replayed = None
        if task.id == 0:
            return current
        xr = self.previous_generator.net.sample(len(x))  # 1.
        replayed = replayed_loss(self, self.model(xr), self.previous(xr), task, self.hp.targets, self.hp.temperature)
        self._replayed = xr
        return mix(current, replayed, task, self.hp)  # 2.

    def step(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = super().step(task, x, y)
        gen_loss = self.generator.loss(x)  # 3.
        if self._replayed is not None:
            gen_loss = mix(gen_loss, self.generator.loss(self._replayed), task, self.hp)
        self.gen_optimizer.zero_grad(set_to_none=True)
        gen_loss.backward()
        self.gen_optimizer.step()
        return loss

    def end_task(self, task) -> None:
        self.previous.update(self.model)
        self.previous_generator.update(self.generator)

    def extra_state(self) -> dict:
        if self.gen_optimizer is None or self.hp.reset_optimizer:
            return {}
        return {"gen_optimizer": copy.deepcopy(self.gen_optimizer.state_dict())}

    def load_extra_state(self, state: dict) -> None:
        self._gen_state = state.get("gen_optimizer")
