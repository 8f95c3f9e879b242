"""Task streams: raw uint8 sources -> normalised tensors on the device -> a list of tasks.

Every stream is class-incremental capable: with `label_mode=offset` each task owns its own block of
the global label space (class-IL = argmax over all seen labels); with `label_mode=shared` every task
reuses the same labels (permuted MNIST). Minibatches are index slices of these tensors, so nothing
here is touched per sample during training.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DatasetConfig, EFMnistConfig, PermutedConfig
from ..errors import ConfigError
from ..registry import DATASETS
from .sources import RawData, concat_sources, load_raw


@dataclass
class Split:
    x: torch.Tensor  # float [N, C, H, W], normalised, on the device
    y: torch.Tensor  # int64 [N], labels in the stream's label space


@dataclass
class Task:
    id: int
    classes: list  # labels of this task in the stream's label space
    train: Split
    val: Split | None
    test: Split


@dataclass
class TaskStream:
    tasks: list
    n_outputs: int  # size of the label space (single head); a multi-head model splits it per task
    input_shape: tuple  # (C, H, W)
    label_mode: str

    @property
    def classes_per_task(self) -> int:
        """The largest task's number of classes (tasks may differ in size: ef_mnist's 10/13/13/11/10)."""
        return max(len(t.classes) for t in self.tasks)


def build_stream(cfg, device: torch.device) -> TaskStream:
    return DATASETS.get(cfg.dataset.name).build(cfg, device)


# --------------------------------------------------------------------------------------- helpers
def _to_device(raw: RawData, x: torch.Tensor, mode: str, device, size: int = 0) -> torch.Tensor:
    """uint8 -> float on the device, resized (size > 0) and normalised there (one copy of the data, no
    host-side floats). `standard` uses the stored images' channel statistics, `unit` keeps [0, 1],
    `symmetric` maps to [-1, 1] (the DGM release's Normalize(0.5, 0.5))."""
    x = x.to(device)
    if x.dim() == 3:
        x = x.unsqueeze(1)  # grey images get a channel axis: [N, 1, H, W]
    x = x.float().div_(raw.max_value)
    if size and tuple(x.shape[2:]) != (size, size):  # in chunks: the float copy at the new size is the peak
        x = torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
                       for c in x.split(8192)])
    if mode == "symmetric":
        x.mul_(2).sub_(1)
    elif mode == "standard":
        mean = torch.tensor(raw.mean, device=device).view(1, -1, 1, 1)
        # a constant channel (std 0) is only centred: dividing by 0 would make every input NaN
        std = torch.tensor([s if s > 0 else 1.0 for s in raw.std], device=device).view(1, -1, 1, 1)
        x.sub_(mean).div_(std)
    return x


def _class_order(cfg, n_classes: int) -> list:
    order = cfg.dataset.class_order
    if order == "natural":
        return list(range(n_classes))
    if order == "shuffle":
        g = torch.Generator().manual_seed(cfg.seed)
        return torch.randperm(n_classes, generator=g).tolist()
    if order == "vdv":  # van de Ven & Tolias's code (data.py): natural for seed 0, else numpy's permutation p of
        if cfg.seed == 0:  # the labels (class c becomes label p[c]) drawn right after np.random.seed(seed)
            return list(range(n_classes))
        return np.argsort(np.random.RandomState(cfg.seed).permutation(n_classes)).tolist()
    if isinstance(order, str) or sorted(order) != list(range(n_classes)):
        raise ConfigError(f"dataset.class_order={order!r} must be 'natural', 'shuffle', 'vdv' or a permutation "
                          f"of 0..{n_classes - 1}")
    return list(order)


def _carve_val(x, y, fraction: float, seed: int, task_id: int):
    """Seeded hold-out of `fraction` of a task's training data: (train Split, val Split | None)."""
    if fraction == 0:
        return Split(x, y), None
    g = torch.Generator().manual_seed(seed * 1000 + task_id)
    idx = torch.randperm(len(y), generator=g).to(y.device)
    n_val = max(1, int(round(fraction * len(y))))
    return Split(x[idx[n_val:]], y[idx[n_val:]]), Split(x[idx[:n_val]], y[idx[:n_val]])


def _raw(cfg, source: str) -> RawData:
    root = Path(cfg.paths.data).expanduser().resolve()
    return load_raw(source, root, Path(cfg.paths.cache), cfg.dataset.download)


class ClassSplit:
    """Split one source's classes into `n_tasks` equal groups (split MNIST, split CIFAR-100, ...)."""

    def __init__(self, source: str, n_classes: int):
        self.source, self.n_classes = source, n_classes

    def check_config(self, cfg) -> None:
        n = cfg.dataset.n_tasks
        if n > self.n_classes or self.n_classes % n:
            raise ConfigError(f"dataset.n_tasks={n} must divide the {self.n_classes} classes of "
                              f"{cfg.dataset.name} (at most {self.n_classes} tasks)")

    def build(self, cfg, device) -> TaskStream:
        raw = _raw(cfg, self.source)
        order = _class_order(cfg, raw.n_classes)
        n = cfg.dataset.n_tasks
        return _split_tasks(cfg, device, [(raw, order, [raw.n_classes // n] * n)])


def _split_tasks(cfg, device, parts) -> TaskStream:
    """Cut each (raw, class order, classes of each task) part into tasks, labels in task order: a part
    with sizes [10, 13] gives a task of its first 10 classes in `order`, then one of the next 13."""
    d = cfg.dataset
    tasks, next_label = [], 0
    for raw, order, sizes in parts:
        if not sizes:
            continue
        used = sum(sizes)
        # position of each original class in the label space (-1: class not used)
        lut = torch.full((raw.n_classes,), -1, dtype=torch.long)
        lut[torch.tensor(order[:used])] = torch.arange(used)
        size = d.get("resize", 0)
        train_x, test_x = _to_device(raw, raw.train_x, d.normalize, device, size), _to_device(raw, raw.test_x, d.normalize, device, size)
        train_pos, test_pos = lut[raw.train_y].to(device), lut[raw.test_y].to(device)
        bounds = [0, *accumulate(sizes)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            per_task = hi - lo
            tr = (train_pos >= lo) & (train_pos < hi)
            te = (test_pos >= lo) & (test_pos < hi)
            base = next_label if d.label_mode == "offset" else 0
            ytr, yte = train_pos[tr] - lo + base, test_pos[te] - lo + base
            t_id = len(tasks)
            train, val = _carve_val(train_x[tr], ytr, d.val_fraction, cfg.seed, t_id)
            tasks.append(Task(t_id, list(range(base, base + per_task)), train, val, Split(test_x[te], yte)))
            next_label += per_task
    # shared labels: every task reuses 0..k-1, so the output layer needs the largest task's k
    n_outputs = next_label if d.label_mode == "offset" else max(len(t.classes) for t in tasks)
    return TaskStream(tasks, n_outputs, tuple(tasks[0].train.x.shape[1:]), d.label_mode)


class CifarTenHundred(ClassSplit):
    """Zenke et al. (2017) benchmark: task 0 = all of CIFAR-10, then CIFAR-100 classes in groups of 10."""

    def __init__(self):
        super().__init__("cifar100", 100)

    def check_config(self, cfg) -> None:
        if not 1 <= cfg.dataset.n_tasks <= 11:
            raise ConfigError(f"dataset.n_tasks={cfg.dataset.n_tasks} must be in 1..11 for cifar10_100 "
                              "(CIFAR-10, then up to 10 groups of 10 CIFAR-100 classes)")

    def build(self, cfg, device) -> TaskStream:
        c10, c100 = _raw(cfg, "cifar10"), _raw(cfg, "cifar100")
        n = cfg.dataset.n_tasks
        return _split_tasks(cfg, device, [(c10, list(range(10)), [10]), (c100, _class_order(cfg, 100), [10] * (n - 1))])


class EFMnist:
    """NISPA's EF-MNIST (Gurbuz & Dovrolis 2022): EMNIST-balanced (labels 0-46) followed by Fashion-MNIST
    (47-56), as continuum's Fellowship, cut in class order into tasks of `classes_per_task` classes
    (the release: 10/13/13/11/10, so the last task is exactly Fashion-MNIST)."""

    n_classes = 47 + 10

    def check_config(self, cfg) -> None:
        d = cfg.dataset
        sizes = list(d.classes_per_task)
        if sum(sizes) != self.n_classes:
            raise ConfigError(f"dataset.classes_per_task={sizes} must add up to the {self.n_classes} classes "
                              f"of ef_mnist (47 EMNIST-balanced + 10 Fashion-MNIST), got {sum(sizes)}")
        if d.n_tasks > len(sizes):
            raise ConfigError(f"dataset.n_tasks={d.n_tasks} must be at most the {len(sizes)} tasks of "
                              f"dataset.classes_per_task={sizes} (the first n_tasks of them are trained)")

    def build(self, cfg, device) -> TaskStream:
        raw = concat_sources([_raw(cfg, "emnist"), _raw(cfg, "fmnist")])
        order = _class_order(cfg, raw.n_classes)
        return _split_tasks(cfg, device, [(raw, order, list(cfg.dataset.classes_per_task)[: cfg.dataset.n_tasks])])


class Permuted:
    """Permuted MNIST: every task is all of MNIST under its own seeded pixel permutation."""

    n_classes = 10

    def build(self, cfg, device) -> TaskStream:
        d = cfg.dataset
        raw = _raw(cfg, "mnist")
        size = d.get("resize", 0)
        train_x, test_x = _to_device(raw, raw.train_x, d.normalize, device, size), _to_device(raw, raw.test_x, d.normalize, device, size)
        train_y, test_y = raw.train_y.to(device), raw.test_y.to(device)
        shape = train_x.shape[1:]
        g = torch.Generator().manual_seed(cfg.seed)
        tasks = []
        for t in range(d.n_tasks):
            n_pix = shape.numel()
            perm = torch.randperm(n_pix, generator=g)
            if t == 0 and not d.permute_first:
                perm = torch.arange(n_pix)
            perm = perm.to(device)
            base = 10 * t if d.label_mode == "offset" else 0
            px = lambda x: x.flatten(1)[:, perm].view(-1, *shape)  # noqa: E731 - permute pixels
            train, val = _carve_val(px(train_x), train_y + base, d.val_fraction, cfg.seed, t)
            tasks.append(Task(t, list(range(base, base + 10)), train, val, Split(px(test_x), test_y + base)))
        n_outputs = 10 * d.n_tasks if d.label_mode == "offset" else 10
        return TaskStream(tasks, n_outputs, tuple(shape), d.label_mode)


for _name, _source, _n in (("split_digits", "digits", 10), ("split_mnist", "mnist", 10), ("split_fmnist", "fmnist", 10),
                           ("split_cifar10", "cifar10", 10), ("split_cifar100", "cifar100", 100),
                           ("split_svhn", "svhn", 10)):
    DATASETS.register(_name, DatasetConfig)(ClassSplit(_source, _n))
DATASETS.register("cifar10_100", DatasetConfig)(CifarTenHundred())
DATASETS.register("permuted_mnist", PermutedConfig)(Permuted())
DATASETS.register("ef_mnist", EFMnistConfig)(EFMnist())


def replay_split(task: Task, old_tasks: list, memory: int, seed: int) -> Split:
    """The task's training data followed by `memory` random samples of each old task's (0: all of it),
    drawn with `seed`, for methods that rehearse stored real data."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [task.train.x], [task.train.y]
    for old in old_tasks:
        n = len(old.train.y)
        keep = (torch.randperm(n, generator=g)[:memory] if memory else torch.arange(n)).to(task.train.x.device)
        xs.append(old.train.x[keep])
        ys.append(old.train.y[keep])
    return Split(torch.cat(xs), torch.cat(ys))
