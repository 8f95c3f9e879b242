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

The step's two halves (the current minibatch's terms and the replayed minibatch's) take their gradients apart
and add them, which gives the bits of one backward pass (methods/overlap.py). With a core to spare
(hardware.overlap) the current half runs on a second thread, and from task 2 on so do both optimizer steps,
while this thread starts the next step (decoding x', the previous classifier's scores) and waits for each
network's update just before it reads that network. The random numbers (z of x', the VAE's noise) are drawn
first, in the order the serial code drew them.
"""
from __future__ import annotations

import copy

import torch

from ..models.vae import VAE
from . import METHODS, Method
from . import overlap
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
        self._overlap: bool | None = None  # the halves of a step on two threads (decided at the first task)
        self._params: tuple = ([], [])  # (classifier, generator) parameters that train, listed once per task
        self._updates: dict = {}  # network -> the future of its last optimizer step (on the second thread)

    def begin_task(self, task) -> None:
        if self.gen_optimizer is None or self.hp.reset_optimizer:
            self.gen_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.hp.gen_lr, betas=(0.9, 0.999))
            if self._gen_state is not None:
                self.gen_optimizer.load_state_dict(self._gen_state)
        self._gen_state = None
        self.generator.train()
        if self._overlap is None:  # the job's threads are set by now
            self._overlap = overlap.wanted(self.cfg.hardware.overlap, self.device, self.model, self.generator)
        self._params = [p for p in self.model.parameters() if p.requires_grad], list(self.generator.parameters())

    def step(self, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        clf, gen = self._params
        z = self.previous_generator.net.noise(len(x)) if task.id else None  # the serial step's order of draws
        eps_x = self.generator.noise(len(x))
        eps_r = self.generator.noise(len(x)) if task.id else None

        def current():  # the current minibatch's (1/t)-weighted terms; the classifier's here from task 2 on (2., 3.)
            g_gen = overlap.gradients(mix(self.generator.loss(x, eps_x), 0, task, self.hp), gen)  # task 1: weight 1
            if not task.id:
                return None, None, g_gen
            c = self.loss(self.model(x), y, task)
            return c, overlap.gradients(mix(c, 0, task, self.hp), clf), g_gen

        # queued behind the previous step's updates, on the second thread when overlapping
        pending = overlap.submit(current, self._overlap)
        self._settle("classifier")  # its last update is in
        if not task.id:  # the first task: the classifier on x here, the VAE on x there
            loss = self.loss(self.model(x), y, task)
            g_clf, g_gen = overlap.gradients(loss, clf), None
        else:  # the replayed minibatch's (1 − 1/t)-weighted terms (1., 2., 3.)
            with torch.no_grad():
                xr = self.previous_generator.net.decode(z)
            r = replayed_loss(self, self.model(xr), self.previous(xr), task, self.hp.targets, self.hp.temperature)
            g_clf = overlap.gradients(mix(0, r, task, self.hp), clf)
            self._settle("generator")
            g_gen = overlap.gradients(mix(0, self.generator.loss(xr, eps_r), task, self.hp), gen)
        c, gc_clf, gc_gen = pending.result()
        if task.id:
            loss = mix(c, r, task, self.hp)

        def update_classifier():
            overlap.set_grads(clf, gc_clf, g_clf)
            self.after_backward(task)
            self.optimizer.step()
            self.after_step(task)

        def update_generator():
            overlap.set_grads(gen, gc_gen, g_gen)
            self.gen_optimizer.step()

        # from task 2 on the second thread takes both updates (the classifier's first: the next step needs it
        # first), and this thread starts the next step; on task 1 it has little else to do
        self._updates["classifier"] = overlap.submit(update_classifier, self._overlap and task.id > 0)
        self._updates["generator"] = overlap.submit(update_generator, self._overlap)
        self.on_step()
        return loss.detach()

    def _settle(self, *names: str) -> None:
        """Wait for the updates (`classifier`, `generator`; default both) still running on the second thread,
        raising their error, if any."""
        for name in names or tuple(self._updates):
            update = self._updates.pop(name, None)
            if update is not None:
                update.result()

    def end_task(self, task) -> None:
        self._settle()
        self.previous.update(self.model)
        self.previous_generator.update(self.generator)

    def extra_state(self) -> dict:
        if self.gen_optimizer is None or self.hp.reset_optimizer:
            return {}
        return {"gen_optimizer": copy.deepcopy(self.gen_optimizer.state_dict())}

    def load_extra_state(self, state: dict) -> None:
        self._gen_state = state.get("gen_optimizer")
