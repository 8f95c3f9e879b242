"""The conditional GAN of Dynamic Generative Memory (Ostapenko et al. 2019), as the release builds it
(SAP-archive/machine-learning-dgm: networks/net_DGMw.py, net_DGMa.py; ../shared/specs/dgm.md).

Generator, 32x32 output: noise [N, nz] whose first n_classes entries are the label's one-hot → transposed convs
nz → 4·ngf (4x4) → 2·ngf (8x8) → ngf (16x16), each followed by the task's own BatchNorm and a ReLU → the class's
own unmasked output layer (→ nc channels, 32x32) → tanh. HAT-style plasticity masks sigmoid(s·e_t): on every
weight (`weights`, DGMw: e_t has the weight's shape) or on every output channel (`channels`, DGMa: gate × conv
output, before BatchNorm). Task t runs the first `widths[t]` channels of each layer, so channels added after
it (dynamic expansion, `grow`) never reach it; its embeddings are -90 (gate 0) on every position added later.

Discriminator: 5x5 stride-2 convs ndf, 2·ndf, 4·ndf with LeakyReLU 0.2 (BatchNorm on the last two) → a critic
output and an auxiliary classifier over the classes seen so far. Initialisation as the release: generator
convs Xavier-uniform with ReLU gain, channels added later N(0, 0.02) (DGMw) / Xavier (DGMa); discriminator
convs N(0, 0.02), BatchNorm weights N(1, 0.02); heads and linear layers PyTorch's default.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = ((4, 1, 0), (4, 2, 1), (4, 2, 1))  # (kernel, stride, padding) of the three masked layers
OLD = -90.0  # the embedding of positions a task never uses: sigmoid(s · -90) = 0


class GrowingConvT(nn.Module):
    """A bias-free transposed conv whose weight [in, out, k, k] can gain input and output channels."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, pad: int):
        super().__init__()
        self.stride, self.pad = stride, pad
        self.weight = nn.Parameter(torch.empty(c_in, c_out, k, k))
        nn.init.xavier_uniform_(self.weight, gain=nn.init.calculate_gain("relu"))

    def forward(self, x: torch.Tensor, d_in: int, d_out: int, gate: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight[:d_in, :d_out]
        if gate is not None:
            w = w * gate[:d_in, :d_out]
        return F.conv_transpose2d(x, w, None, self.stride, self.pad)

    @torch.no_grad()
    def grow(self, add_in: int, add_out: int, init: str) -> None:
        c_in, c_out, k, _ = self.weight.shape
        w = torch.empty(c_in + add_in, c_out + add_out, k, k, device=self.weight.device)
        if init == "normal":
            w.normal_(0.0, 0.02)
        else:
            nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain("relu"))
        w[:c_in, :c_out] = self.weight
        self.weight = nn.Parameter(w)


def grown(t: torch.Tensor, shape: tuple, fill: float) -> torch.Tensor:
    """`t` copied into the leading corner of a new tensor of `shape`, the rest `fill`."""
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


class Generator(nn.Module):
    def __init__(self, nz: int, ngf: int, nc: int, n_tasks: int, n_classes: int, masks: str):
        super().__init__()
        self.nz, self.nc, self.n_classes, self.masks = nz, nc, n_classes, masks
        widths = [nz, 4 * ngf, 2 * ngf, ngf]
        self.convs = nn.ModuleList(GrowingConvT(a, b, *kind) for a, b, kind in zip(widths[:-1], widths[1:], HIDDEN))
        # per task: the output channels of each layer it runs (0 before the task starts), its BatchNorms
        self.register_buffer("widths", torch.zeros(n_tasks, 3, dtype=torch.long))
        self.norms = nn.ModuleList()
        self.heads = nn.ModuleList()  # one per class, in task order
        if masks == "channels":  # DGMa's release re-draws every conv N(0, 0.02) after building
            for c in self.convs:
                nn.init.normal_(c.weight, 0.0, 0.02)
        self.embeddings = nn.ParameterList(nn.Parameter(torch.zeros(n_tasks, *s)) for s in self.mask_shapes())  # 0.5
        for l, shape in enumerate(self.mask_shapes()):  # m_<t: the masks of the tasks so far, binarised, accumulated
            self.register_buffer(f"reserved_{l}", torch.zeros(shape))
        self._widths: dict = {}  # task -> widths[t] as a list (no device sync in forward)

    def mask_shapes(self) -> list:
        return [tuple(c.weight.shape) if self.masks == "weights" else tuple(c.weight.shape[1:2]) for c in self.convs]

    @property
    def reserved(self) -> list:
        return [getattr(self, f"reserved_{l}") for l in range(len(self.convs))]

    @property
    def sizes(self) -> list:
        """Output channels of each layer now."""
        return [c.weight.shape[1] for c in self.convs]

    def add_task(self, t: int, classes: int) -> None:
        """Task t runs every channel there is now, with its own BatchNorms and a head per class."""
        self.widths[t] = torch.tensor(self.sizes)
        self._widths.clear()
        dev = self.convs[0].weight.device
        self.norms.append(nn.ModuleList(nn.BatchNorm2d(w).to(dev) for w in self.sizes))
        if t == 0:  # the first task's BatchNorm weights as the release draws them
            for n in self.norms[0]:
                nn.init.normal_(n.weight, 1.0, 0.02)
        for _ in range(classes):
            self.heads.append(nn.ConvTranspose2d(self.sizes[-1], self.nc, 4, 2, 1, bias=False).to(dev))

    def gates(self, t: int, s: float) -> list:
        return [torch.sigmoid(s * e[t]) for e in self.embeddings]

    def noise(self, labels: torch.Tensor) -> torch.Tensor:
        """z ~ N(0, I) with the label's one-hot written over its first n_classes entries (the release)."""
        z = torch.randn(len(labels), self.nz, device=labels.device)
        z[:, :self.n_classes] = 0
        return z.scatter_(1, labels.view(-1, 1), 1.0)  # (F.one_hot would check the labels on the host)

    def forward(self, z: torch.Tensor, t: int, label: int, s: float, binary: bool = False) -> tuple:
        """Images of class `label` (task t's) from noise z; also the gates, for the sparsity penalty.

        binary: a finished task's gates, [sigmoid(s_max·e_t) >= 0.5] = [e_t >= 0], exactly the positions it
        reserved (the release uses the soft sigmoid(s_max·e_t), within ~1e-9 of these once the embeddings have
        saturated, but not on positions left near 0, which later tasks may then change). With channel masks a
        closed channel also outputs 0 after its BatchNorm (the release's BatchNorm would turn it into the constant
        relu(β - γ·mean/σ), read by weights later tasks train). So an old class's images never change."""
        gates = [(e[t] >= 0).float() for e in self.embeddings] if binary else self.gates(t, s)
        x, d_in = z.view(len(z), self.nz, 1, 1), self.nz
        if t not in self._widths:
            self._widths[t] = self.widths[t].tolist()
        for conv, norm, g, d_out in zip(self.convs, self.norms[t], gates, self._widths[t]):
            if self.masks == "weights":
                x = conv(x, d_in, d_out, g)
            else:
                x = conv(x, d_in, d_out) * g[:d_out].view(1, -1, 1, 1)
            x, d_in = torch.relu(norm(x)), d_out
            if binary and self.masks == "channels":
                x = x * g[:d_out].view(1, -1, 1, 1)
        return torch.tanh(self.heads[label](x)), gates

    def expansion(self, grew: list) -> list:
        """Channels each layer gains so that its free capacity stays constant, given `grew`, the weights (DGMw) or
        channels (DGMa) newly reserved per layer. DGMw: layer l's newly reserved weights, less those that its
        input channels added by layer l − 1 already bring, over the weights of one output channel (the release's
        netG.extand)."""
        if self.masks == "channels":
            return list(grew)
        add = []
        for conv, g in zip(self.convs, grew):
            c_in, c_out, k, k2 = conv.weight.shape
            new_in = add[-1] if add else 0  # input channels the layer before gains
            brought = new_in * c_out * k * k2  # free weights those bring into this layer
            add.append(max(math.ceil((g - brought) / ((c_in + new_in) * k * k2)), 0))
        return add

    @torch.no_grad()
    def grow(self, t: int, add: list) -> None:
        """Dynamic expansion after task t: layer l gains add[l] output channels (and layer l + 1 as many inputs);
        the embeddings of tasks 0..t are -90 on every new position, later tasks' stay 0."""
        init = "normal" if self.masks == "weights" else "xavier"
        ins = [0, *add[:-1]]
        for conv, a_in, a_out in zip(self.convs, ins, add):
            conv.grow(a_in, a_out, init)
        for l, (e, conv) in enumerate(zip(self.embeddings, self.convs)):
            shape = conv.weight.shape if self.masks == "weights" else conv.weight.shape[1:2]
            new = grown(e.detach(), (len(e), *shape), OLD)
            new[t + 1:] = 0.0
            self.embeddings[l] = nn.Parameter(new)
        for l, shape in enumerate(self.mask_shapes()):  # nothing reserved on the new positions
            setattr(self, f"reserved_{l}", grown(self.reserved[l], shape, 0.0))
        self._widths.clear()


class Discriminator(nn.Module):
    def __init__(self, nc: int, ndf: int, n_classes: int, image_size: int = 32):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(nc, ndf, 5, 2, 2, bias=False), nn.Conv2d(ndf, 2 * ndf, 5, 2, 2, bias=False),
                                    nn.Conv2d(2 * ndf, 4 * ndf, 5, 2, 2, bias=False)])
        self.norms = nn.ModuleList([nn.Identity(), nn.BatchNorm2d(2 * ndf), nn.BatchNorm2d(4 * ndf)])
        side = -(-image_size // 8)  # three stride-2 convs
        self.critic = nn.Linear(4 * ndf * side * side, 1)
        self.aux = nn.Linear(4 * ndf * side * side, n_classes)
        with torch.no_grad():
            for c in self.convs:
                c.weight.normal_(0.0, 0.02)
            for n in self.norms[1:]:
                n.weight.normal_(1.0, 0.02)
                n.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple:
        """(critic score [N], class logits [N, classes seen])."""
        for conv, norm in zip(self.convs, self.norms):
            x = F.leaky_relu(norm(conv(x)), 0.2)
        x = x.flatten(1)
        return self.critic(x).view(-1), self.aux(x)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (‖∇_x critic(x)‖ − 1)² at random interpolates of real and fake."""
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device)
    x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(x)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    return ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
