"""Networks: `mlp`, `cnn` (the 4-conv network of Zenke et al. 2017), `nispa_cnn` (the 4-conv network of
Gurbuz & Dovrolis 2022) and `cnn_wide` (the fully convolutional network of Golkar et al. 2019, Tab. 3),
single or multi-head.

Both end in one output layer `out` over the stream's whole label space. A multi-head model is the same
layer read per task: each task's head is the block of rows of its classes, its loss and task-IL
prediction look only at that block, and class-IL prediction reads all blocks side by side. So heads
need no separate modules, and methods that mask connections treat the output layer like any other.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import CNNConfig, CNNWideConfig, MLPConfig, NispaCNNConfig
from ..errors import ConfigError
from ..registry import MODELS

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def _check_head(cfg) -> None:
    if cfg.model.head == "multi" and cfg.dataset.label_mode != "offset":
        raise ConfigError("model.head=multi needs dataset.label_mode=offset (one block of labels per head)")


def _check_convs(n: int):
    """check_config of a CNN with n conv widths in model.channels."""
    def check(cfg) -> None:
        _check_head(cfg)
        if len(cfg.model.channels) != n:
            raise ConfigError(f"model.channels must list {n} conv widths for {cfg.model.name}, "
                              f"got {list(cfg.model.channels)}")
    return staticmethod(check)


@MODELS.register("mlp", MLPConfig)
class MLP(nn.Module):
    check_config = staticmethod(_check_head)

    def __init__(self, mcfg, input_shape: tuple, n_outputs: int):
        super().__init__()
        dims = [math.prod(input_shape), *mcfg.hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = ACTIVATIONS[mcfg.activation]()
        self.out = nn.Linear(dims[-1], n_outputs)
        # identities when 0 (the default): the forward then matches a model built before these keys
        p_in, p = mcfg.get("dropout_in", 0.0), mcfg.get("dropout", 0.0)
        self.drop_in = nn.Dropout(p_in) if p_in else nn.Identity()
        self.drop = nn.Dropout(p) if p else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_in(x.flatten(1))  # [N, C*H*W]
        for layer in self.hidden:
            x = self.drop(self.act(layer(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@MODELS.register("cnn", CNNConfig)
class CNN(nn.Module):
    """conv(c0, same) → conv(c1, valid) → maxpool → dropout → conv(c2, same) → conv(c3, valid) → maxpool
    → dropout → dense(hidden...) → dropout → out; ReLU after every conv and dense layer."""

    check_config = _check_convs(4)

    def __init__(self, mcfg, input_shape: tuple, n_outputs: int):
        super().__init__()
        c_in, h, w = input_shape
        c = list(mcfg.channels)
        self.convs = nn.ModuleList([
            nn.Conv2d(c_in, c[0], 3, padding=1), nn.Conv2d(c[0], c[1], 3),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.Conv2d(c[2], c[3], 3),
        ])
        self.pool, self.drop_conv = nn.MaxPool2d(2), nn.Dropout(mcfg.dropout_conv)
        # spatial size after (valid conv, pool) twice: 32 → 30 → 15 → 13 → 6
        for _ in range(2):
            h, w = (h - 2) // 2, (w - 2) // 2
        dims = [c[3] * h * w, *mcfg.hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.drop_dense = nn.Dropout(mcfg.dropout_dense)
        self.out = nn.Linear(dims[-1], n_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i % 2 == 1:  # after each pair of convs
                x = self.drop_conv(self.pool(x))
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.drop_dense(torch.relu(layer(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@MODELS.register("nispa_cnn", NispaCNNConfig)
class NispaCNN(nn.Module):
    """NISPA's CIFAR network (the release's ConvNet): conv c0 → conv c1 → maxpool 2 → conv c2 → conv c3 →
    maxpool 2 → dense(hidden...) → out, every conv 3x3 / stride 1 / padding 1, ReLU after every conv and
    dense layer, no dropout, no BatchNorm. On 32x32 inputs the first dense layer sees c3·8·8 features.
    PyTorch's default init: the method draws its own (NISPA: Kaiming-normal)."""

    check_config = _check_convs(4)

    def __init__(self, mcfg, input_shape: tuple, n_outputs: int):
        super().__init__()
        c_in, h, w = input_shape
        if h < 4 or w < 4:
            raise ConfigError(f"model=nispa_cnn needs inputs of at least 4x4 pixels (two 2x2 max-pools), got {(h, w)}")
        widths = [c_in, *mcfg.channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=1, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.pool = nn.MaxPool2d(2)
        dims = [mcfg.channels[-1] * (h // 4) * (w // 4), *mcfg.hidden]  # 'same' convs; each pool halves (floor)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], n_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i % 2 == 1:  # after each pair of convs: [N, c1, H/2, W/2], then [N, c3, H/4, W/4]
                x = self.pool(x)
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@MODELS.register("cnn_wide", CNNWideConfig)
class CNNWide(nn.Module):
    """Golkar et al. (2019) Tab. 3: conv c0 (3x3, s1, p1) → c1 (s2, p0) → c2 (s1, p0) → c3 (s2, p1) →
    c4 (s1, p0), each followed by BatchNorm then ReLU, → conv `out` (3x3, s1, p0, one channel per output)
    → global average pool. On 32x32 inputs: 32 → 32 → 15 → 13 → 7 → 5 → 3 → 1. No dense layers, so
    `hidden` is empty; `norms[i]` follows `convs[i]` (Identity when batch_norm is off)."""

    STRIDE_PAD = ((1, 1), (2, 0), (1, 0), (2, 1), (1, 0))

    check_config = _check_convs(5)

    def __init__(self, mcfg, input_shape: tuple, n_outputs: int):
        super().__init__()
        widths, bn = [input_shape[0], *mcfg.channels], mcfg.batch_norm
        # with BatchNorm right after, a conv bias would only duplicate BatchNorm's shift
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=s, padding=p, bias=not bn)
                                   for a, b, (s, p) in zip(widths[:-1], widths[1:], self.STRIDE_PAD))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) if bn else nn.Identity() for c in mcfg.channels)
        self.hidden = nn.ModuleList()
        self.out = nn.Conv2d(widths[-1], n_outputs, 3)
        size = min(input_shape[1:])
        for s, p in (*self.STRIDE_PAD, (1, 0)):
            size = (size + 2 * p - 3) // s + 1
        if size < 1:
            raise ConfigError(f"model=cnn_wide needs inputs of at least 23x23 pixels (six 3x3 convs, two of stride 2), "
                              f"got {tuple(input_shape[1:])}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return x  # [N, c4, h, w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x)).mean((2, 3))  # global average pool → [N, n_outputs]


@torch.no_grad()
def draw_init(w: torch.Tensor, b: torch.Tensor | None, scheme: str) -> None:
    """Fill a weight (and its bias) in place: xavier = Glorot uniform and zero bias; model = PyTorch's
    default for Linear / Conv2d (Kaiming uniform, a = √5), U(±1/√fan_in) for the bias."""
    if scheme == "xavier":
        nn.init.xavier_uniform_(w)
        if b is not None:
            nn.init.zeros_(b)
    else:
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if b is not None:
            bound = 1 / math.sqrt(w[0].numel())
            nn.init.uniform_(b, -bound, bound)


def build_model(cfg, stream) -> nn.Module:
    return MODELS.get(cfg.model.name)(cfg.model, stream.input_shape, stream.n_outputs)
