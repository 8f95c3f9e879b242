"""Dynamic Generative Memory (Ostapenko et al., CVPR 2019) as its release runs it (SAP-archive/machine-learning-dgm:
approaches/DGMw.py, DGMa.py; ../shared/specs/dgm.md). `dgmw` masks the generator's weights, `dgma` its channels
(method.masks); the GAN lives in models/dgm_gan.py. Class-incremental, one class per task; the classifier is the
discriminator's auxiliary head over every class seen so far.

Task t:
  1. The generator gets task t's BatchNorms and a head for its class; the discriminator is re-initialised with an
     auxiliary head over the classes seen; fresh Adams (β1 = 0.5). λ_t = λ · (generator channels now / at start).
  2. Replay: for every old class, as many generated images as task t has training images, once, through the
     class's binarised masks (models/dgm_gan.py, Generator.forward: exactly what it reserved).
  3. Epochs over the training data in one fixed shuffled order; in epoch e, s_e = 1/s_max + (s_max − 1/s_max)·e/E
     and at sample i of n, s = 1/s_e + (s_e − 1/s_e)·i/n (the masks harden over epochs and within each).
     Per minibatch b:
     a. auxiliary classifier: the real minibatch and the replayed images at the same positions, shuffled, in
        chunks of |b|: one Adam step of D on the cross-entropy of each chunk;
     b. critic (WGAN-GP): −D(x) + D(G(z)) + λ_gp·GP, one Adam step of D;
     c. generator: −λ_adv·D(G(z)) + λ_t · Σ g (1 − m_<t) / Σ (1 − m_<t) (HAT's attention penalty over the gates
        g = sigmoid(s·e_t)); gradients × (1 − m_<t) (binary), HAT's embedding compensation (s_e/s)·(cosh(s·e)+1)/
        (cosh(e)+1), norm clipping, one Adam step.
     Every `val_every` epochs (and the last) the mean accuracy over the seen classes' validation data; the
     discriminator of the best one is kept (the release reports the test accuracy of that evaluation).
  4. m_≤t = max(m_<t, [sigmoid(s_max·e_t) ≥ 0.5]); dynamic expansion: each layer grows so that its free capacity
     stays what it was (DGMw: ceil(new reserved weights / (in·k·k)) channels, minus those its input growth
     already adds; DGMa: as many channels as were newly reserved).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.dgm_gan import Discriminator, Generator, gradient_penalty
from . import METHODS, Method
from .dgm_report import capacity, write_figures
from .schemas import DGMConfig, check_dgm


@METHODS.register("dgm", DGMConfig)
class DGM(Method):
    check_config = staticmethod(check_dgm)

    def __init__(self, cfg, model, stream, device):
        super().__init__(cfg, model, stream, device)
        if any(len(t.classes) != 1 for t in stream.tasks):
            raise ConfigError(f"method={self.hp.name} learns one class per task: set dataset.n_tasks to the number of "
                              f"classes ({stream.n_outputs})")
        self.nc, self.size = stream.input_shape[0], stream.input_shape[1]
        self.generator = Generator(self.hp.nz, self.hp.ngf, self.nc, len(stream.tasks), stream.n_outputs,
                                   self.hp.masks).to(device)
        self.start_sizes = list(self.generator.sizes)
        self.start_size = sum(self.start_sizes)
        self.start_params = sum(c.weight.numel() for c in self.generator.convs)
        # the classifier is the discriminator's auxiliary head: the engine's `model` (evaluation mode switches)
        self.D = self.model = Discriminator(self.nc, self.hp.ndf, 1, self.size).to(device)
        self.done = 0  # tasks finished (checkpoints rebuild the grown shapes from `growth`)
        self._free = None  # (1 − m_<t per layer, their total): the penalty's denominator, set per task
        self.growth: list = []  # per finished task: channels added per layer, sizes, parameters, reserved share

    # -- 3c. the masks' arithmetic ----------------------------------------------------------------------
    def _penalty(self, gates: list) -> torch.Tensor:
        """HAT's attention penalty over the positions free before the task (self._free: set per task)."""
        free, total = self._free
        return sum((g * f).sum() for g, f in zip(gates, free)) / total

    def _grad_scales(self) -> list:
        """1 − m_<t per conv weight [in, out, k, k] (DGMa: 1 − min(m[post], m[pre]), per channel pair)."""
        m = self.generator.reserved
        if self.hp.masks == "weights":
            return [1 - r for r in m]
        out = []
        for l, r in enumerate(m):
            w = r.view(1, -1) if l == 0 else torch.minimum(r.view(1, -1), m[l - 1].view(-1, 1))
            out.append((1 - w)[:, :, None, None])
        return out

    # -- one task ------------------------------------------------------------------------------------------
    def fit_task(self, task) -> dict:
        hp, G, t, cls = self.hp, self.generator, task.id, task.classes[0]
        G.add_task(t, len(task.classes))  # 1.
        seen = [u.classes[0] for u in self.stream.tasks[:t + 1]]
        self.D = self.model = Discriminator(self.nc, hp.ndf, len(seen), self.size).to(self.device)
        opt_d = torch.optim.Adam(self.D.parameters(), lr=hp.lr_d, betas=(hp.beta1, 0.999))
        opt_g = torch.optim.Adam(G.parameters(), lr=hp.lr_g, betas=(hp.beta1, 0.999))
        lamb = hp.lamb * sum(G.sizes) / self.start_size
        x, n, bs = task.train.x, len(task.train.y), hp.batch_size
        replay = self._replay(t, n)  # 2.
        scales = self._grad_scales()
        free = [1 - m for m in G.reserved]
        self._free = (free, sum(f.sum() for f in free).clamp_min(1e-12))
        order = torch.randperm(n, device=self.device, generator=self.shuffle_gen)
        labels = torch.full((bs,), cls, device=self.device)
        best, best_acc, best_epoch = None, -1.0, -1
        for epoch in range(hp.epochs):  # 3.
            s_e = (hp.s_max - 1 / hp.s_max) * epoch / hp.epochs + 1 / hp.s_max
            total = torch.zeros((), device=self.device)  # the epoch's losses, summed on the device
            for i in range(0, n, bs):
                b = order[i:i + bs]
                s = (s_e - 1 / s_e) * i / n + 1 / s_e
                total += self._aux_steps(x[b], replay, b, cls, opt_d)  # a.
                total += self._critic_step(x[b], labels[:len(b)], t, cls, s, opt_d)  # b.
                total += self._generator_step(labels[:len(b)], t, cls, s, s_e, lamb, scales, opt_g)  # c.
                self.on_step()
            if not bool(torch.isfinite(total)):  # one host sync per epoch: a NaN anywhere makes the sum NaN
                self.on_nonfinite(task, epoch)
            if epoch % hp.val_every == 0 or epoch == hp.epochs - 1:
                acc = self._val_accuracy(t)  # one host sync per evaluation
                if acc > best_acc:
                    best, best_acc, best_epoch = copy.deepcopy(self.D.state_dict()), acc, epoch
        self.D.load_state_dict(best)
        self._end_task(t)  # 4.
        return {"val_acc_best": best_acc, "best_epoch": float(best_epoch + 1), "lambda": lamb,
                **{k: float(v) for k, v in self.growth[-1].items() if not isinstance(v, list)}}

    @torch.no_grad()
    def _replay(self, t: int, n: int) -> list:
        """2. (images, label) of every old class, n each, generated in eval mode (the class's own BatchNorms)."""
        G, out = self.generator, []
        G.eval()
        for u in self.stream.tasks[:t]:
            c = u.classes[0]
            lab = torch.full((n,), c, device=self.device)
            imgs = torch.cat([G(G.noise(lab[j:j + 1000]), u.id, c, self.hp.s_max, binary=True)[0]
                              for j in range(0, n, 1000)])
            out.append((imgs, c))
        G.train()
        return out

    def _aux_steps(self, real, replay: list, b, cls: int, opt_d) -> torch.Tensor:
        imgs = torch.cat([real, *(r[b] for r, _ in replay)])
        lab = torch.cat([torch.full((len(b),), c, device=self.device) for c in (cls, *(c for _, c in replay))])
        perm = torch.randperm(len(lab), device=self.device, generator=self.shuffle_gen)
        imgs, lab = imgs[perm], lab[perm]
        total = torch.zeros((), device=self.device)
        for j in range(0, len(lab), len(b)):
            opt_d.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.D(imgs[j:j + len(b)])[1], lab[j:j + len(b)])
            loss.backward()
            opt_d.step()
            total += loss.detach()
        return total

    def _critic_step(self, real, labels, t: int, cls: int, s: float, opt_d) -> torch.Tensor:
        with torch.no_grad():
            fake = self.generator(self.generator.noise(labels), t, cls, s)[0]
        opt_d.zero_grad(set_to_none=True)
        gp = gradient_penalty(lambda v: self.D(v)[0], real, fake)
        loss = -self.D(real)[0].mean() + self.D(fake)[0].mean() + self.hp.lambda_gp * gp
        loss.backward()
        opt_d.step()
        return loss.detach()

    def _generator_step(self, labels, t, cls, s, s_e, lamb, scales, opt_g) -> torch.Tensor:
        G, hp = self.generator, self.hp
        opt_g.zero_grad(set_to_none=True)
        fake, gates = G(G.noise(labels), t, cls, s)
        critic, logits = self.D(fake)
        loss = -hp.lambda_adv * critic.mean() + lamb * self._penalty(gates)
        if hp.aux_g:
            loss = loss + F.cross_entropy(logits, labels)  # labels are the aux head's columns
        loss.backward()
        for conv, scale in zip(G.convs, scales):
            conv.weight.grad.mul_(scale)
        for e in G.embeddings:  # HAT's compensation (the release uses the epoch's s_e in place of s_max)
            g, v = e.grad[t], e.detach()[t]
            num = torch.cosh(torch.clamp(s * v, -hp.thres_cosh, hp.thres_cosh)) + 1
            g.mul_(s_e / s * num / (torch.cosh(v) + 1))
        torch.nn.utils.clip_grad_norm_([p for p in G.parameters() if p.grad is not None], hp.clipgrad)
        opt_g.step()
        return loss.detach()

    @torch.no_grad()
    def _val_accuracy(self, t: int) -> float:
        """Mean over the seen classes of the auxiliary head's accuracy on their real validation data."""
        accs = [(self.predict(u.val.x).argmax(1) == u.val.y).float().mean() for u in self.stream.tasks[:t + 1]]
        return float(100 * torch.stack(accs).mean())

    @torch.no_grad()
    def _end_task(self, t: int) -> None:
        G = self.generator
        new = [(g >= 0.5).float() for g in G.gates(t, self.hp.s_max)]
        before = [int(r.sum()) for r in G.reserved]
        for r, m in zip(G.reserved, new):
            r.copy_(torch.maximum(r, m))
        grew = [int(r.sum()) - b for r, b in zip(G.reserved, before)]  # newly reserved weights / channels
        add = G.expansion(grew)
        G.grow(t, add)
        self.done = t + 1
        self.growth.append({"gen_params": float(sum(c.weight.numel() for c in G.convs)),
                            "gen_channels": float(sum(G.sizes)), "added": add, "reserved": grew,
                            "sizes": list(G.sizes)})

    # -- prediction, capacity, figures, checkpoints -------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """The auxiliary head's logits in the label space (unseen classes −inf)."""
        was = self.D.training
        self.D.eval()
        aux = self.D(x)[1]
        self.D.train(was)
        out = torch.full((len(x), self.stream.n_outputs), float("-inf"), device=x.device)
        out[:, [u.classes[0] for u in self.stream.tasks[:aux.shape[1]]]] = aux
        return out

    def steps_per_task(self, task) -> int:
        return self.hp.epochs * -(-len(task.train.y) // self.hp.batch_size)

    def capacity(self) -> dict:
        return capacity(self.generator)

    def write_artifacts(self, folder) -> None:
        write_figures(self, folder)

    def extra_state(self) -> dict:
        return {"done": self.done, "growth": copy.deepcopy(self.growth), "seen": self.D.aux.out_features}

    def load_extra_state(self, state: dict) -> None:
        """Rebuild the grown shapes before the parameters load (children load after this module's extra state)."""
        for t in range(state["done"]):
            self.generator.add_task(t, 1)
            self.generator.grow(t, state["growth"][t]["added"])
        self.done, self.growth = state["done"], state["growth"]
        self.D = self.model = Discriminator(self.nc, self.hp.ndf, state["seen"], self.size).to(self.device)
