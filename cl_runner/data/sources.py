"""Raw dataset sources -> uint8 tensors, read once and cached.

Files are read with our own small readers (IDX for MNIST-like data, pickles for CIFAR) rather than
through torchvision's Dataset classes: that way a copy of the raw files laid out like torchvision's
(e.g. /work/shared/data) works with no network, and `.gz` files are read without unpacking them
next to the originals (the data root may be read-only). torchvision is used only to download.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError


@dataclass
class RawData:
    train_x: torch.Tensor  # uint8, [N, H, W] grey or [N, 3, 32, 32] colour
    train_y: torch.Tensor  # int64 [N], original class ids
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    mean: tuple[float, ...]  # per channel, train pixels / max_value
    std: tuple[float, ...]
    max_value: int  # 255 for images, 16 for sklearn digits


SOURCES = ("digits", "mnist", "fmnist", "emnist", "cifar10", "cifar100", "svhn")
IDX_SOURCES = ("mnist", "fmnist", "emnist")  # IDX files, plain or .gz

_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_HINT = "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
# EMNIST's "balanced" split (47 classes: digits, upper case, the lower-case letters unlike their capitals),
# as torchvision unpacks it. Images are kept as stored (transposed relative to MNIST), as torchvision and
# the NISPA release (continuum) use them.
_EMNIST_NAMES = tuple(f"emnist-balanced-{s}-{k}-ubyte"
                      for s in ("train", "test") for k in ("images-idx3", "labels-idx1"))
_EMNIST_HINT = "emnist-balanced-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]"
# name -> (folder under root, file names in reader order, how to show them, torchvision class, classes)
_LAYOUT = {
    "mnist": ("MNIST/raw", _IDX_NAMES, _IDX_HINT, "MNIST", 10),
    "fmnist": ("FashionMNIST/raw", _IDX_NAMES, _IDX_HINT, "FashionMNIST", 10),
    "emnist": ("EMNIST/raw", _EMNIST_NAMES, _EMNIST_HINT, "EMNIST", 47),
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                "{data_batch_1..5,test_batch}", "CIFAR10", 10),
    "cifar100": ("cifar-100-python", ("train", "test"), "{train,test}", "CIFAR100", 100),
    "svhn": ("SVHN", ("train_32x32.mat", "test_32x32.mat"), "{train,test}_32x32.mat", "SVHN", 10),
}
_TV_KWARGS = {"emnist": {"split": "balanced"}}  # torchvision's EMNIST downloads every split; we read one
# Bump when the cached layout or the readers change, so old caches are re-read rather than trusted.
_CACHE_VERSION = 1


def load_raw(name: str, root: Path, cache_dir: Path, download: bool) -> RawData:
    """Load one source; `root` holds the torchvision-style folders, `cache_dir` our .pt caches."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}")
    if name == "digits":
        return _load_digits()  # bundled with scikit-learn and instant: nothing to find or cache
    root = Path(root).expanduser().resolve()
    files = _locate(name, root)
    if files is None:
        files = _fetch(name, root, download)
    fingerprint = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache_path = Path(cache_dir) / f"{name}.pt"
    raw = _read_cache(cache_path, fingerprint)
    if raw is None:
        if name in IDX_SOURCES:
            parts = _read_idx_set(files)
        elif name == "svhn":
            parts = [t for p in files for t in _read_svhn_mat(p)]
        else:  # CIFAR-100's b"coarse_labels" are its 20 superclasses; we use the 100 fine ones
            parts = _read_cifar_set(files, b"fine_labels" if name == "cifar100" else b"labels")
        raw = _make_raw(*parts, n_classes=_LAYOUT[name][4], max_value=255, what=str(files[0].parent))
        _write_cache(cache_path, raw, fingerprint)
    return raw


# ------------------------------------------------------------------------------- finding files
def _locate(name: str, root: Path) -> list[Path] | None:
    """The source's files in reader order, or None if any is missing. IDX files may be gzipped."""
    folder, names = root / _LAYOUT[name][0], _LAYOUT[name][1]
    n_options = 2 if name in IDX_SOURCES else 1
    # Prefer the plain file: torchvision leaves both after a download, and plain reads faster.
    found = [next((p for p in (folder / f, folder / f"{f}.gz")[:n_options] if p.is_file()), None)
             for f in names]
    return None if None in found else found


def _fetch(name: str, root: Path, download: bool) -> list[Path]:
    """Download via torchvision if allowed; otherwise (or on failure) one line saying how to fix it."""
    folder, _, hint, tv_class, _ = _LAYOUT[name]
    reason = "not found"
    if download:
        import torchvision.datasets  # lazy: slow to import and only needed here

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(10)  # an offline machine should fail in seconds, not minutes
        try:
            for train in (True, False):
                if name == "svhn":  # torchvision's SVHN keeps its files in `root` itself and takes a split name
                    torchvision.datasets.SVHN(root=str(root / folder), split="train" if train else "test", download=True)
                    continue
                getattr(torchvision.datasets, tv_class)(root=str(root), train=train, download=True,
                                                        **_TV_KWARGS.get(name, {}))
        except Exception as exc:  # noqa: BLE001 - any failure becomes the one-line message below
            reason += f"; download failed: {type(exc).__name__}: {exc}"
        finally:
            socket.setdefaulttimeout(previous)
        files = _locate(name, root)
        if files is not None:
            return files
        reason += "" if "download failed" in reason else "; still missing after download"
    reason = " ".join(reason.split())  # exception texts may span lines; the message must not
    raise DataError(f"{name} needs {folder}/{hint} under {root} ({reason}). Set CL_RUNNER_DATA to the "
                    "folder that holds them, or allow dataset.download=true on a machine with network.")


# ------------------------------------------------------------------------------------- readers
def _read_idx(path: Path, magic: int, item_dims: tuple[int, ...]) -> np.ndarray:
    """One IDX file: big-endian header (magic 0x000008<ndim>, then ndim uint32 sizes), then uint8s."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # what a truncated or garbled gzip raises
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    ndim = 1 + len(item_dims)
    header = 4 + 4 * ndim  # magic, then one uint32 per dimension
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"corrupt IDX file {path}: bad header (expected magic {magic:#010x})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if dims[1:] != item_dims or len(data) - header != int(np.prod(dims)):
        raise DataError(f"corrupt IDX file {path}: dims {dims} do not match {len(data) - header} "
                        f"data bytes (expected items of shape {item_dims})")
    # .copy(): frombuffer over bytes is read-only, and torch wants writable memory
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_idx_set(files: list[Path]):
    out = []
    for img_path, lbl_path in ((files[0], files[1]), (files[2], files[3])):
        x = _read_idx(img_path, 0x803, (28, 28))
        y = _read_idx(lbl_path, 0x801, ())
        if len(x) != len(y):
            raise DataError(f"corrupt data: {img_path} has {len(x)} images but {lbl_path} "
                            f"has {len(y)} labels")
        out += [torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))]
    return out


def _read_cifar_pickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR batch: b"data" uint8 [N, 3072] holding the R, G, B 32x32 planes in turn."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - unpickling can fail in many ways; all mean "corrupt"
        raise DataError(f"corrupt CIFAR file {path}: {type(exc).__name__}: {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(f"corrupt CIFAR file {path}: data {data.shape}, labels {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_set(files: list[Path], label_key: bytes):
    parts = [_read_cifar_pickle(p, label_key) for p in files]
    train, test = parts[:-1], parts[-1]  # the test file comes last in _LAYOUT's order
    return (torch.from_numpy(np.concatenate([x for x, _ in train])),
            torch.from_numpy(np.concatenate([y for _, y in train])), *map(torch.from_numpy, test))


def _read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An SVHN cropped-digits file as torchvision reads it (scipy MAT): X uint8 [32, 32, 3, N], y [N, 1] with
    10 standing for the digit 0."""
    from scipy.io import loadmat  # scikit-learn's dependency; only SVHN needs it

    try:
        mat = loadmat(str(path))
        x, y = np.asarray(mat["X"], dtype=np.uint8), np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line
        raise DataError(f"corrupt SVHN file {path}: {type(exc).__name__}: {exc}") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"corrupt SVHN file {path}: X {x.shape}, y {y.shape} (expected [32, 32, 3, N] and [N, 1])")
    y[y == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)


def _load_digits() -> RawData:
    # scikit-learn ships the digits as sklearn/datasets/data/digits.csv.gz (64 pixels + label per row);
    # reading that file directly skips importing sklearn, which costs ~3 s of start-up
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        rows = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        x, y = rows[:, :-1].reshape(-1, 8, 8).astype(np.uint8), rows[:, -1].astype(np.int64)
    else:  # another layout: let sklearn find it
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.images.astype(np.uint8), bunch.target.astype(np.int64)  # integral values 0..16
    # Fixed, stratified split without randomness: every 5th sample of each class (in file order)
    # goes to test. rank = position of a sample among the samples of its own class.
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y)
    rank = np.empty_like(y)
    rank[order] = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
    test = rank % 5 == 4
    return _make_raw(torch.from_numpy(x[~test]), torch.from_numpy(y[~test]),
                     torch.from_numpy(x[test]), torch.from_numpy(y[test]), 10, 16, "sklearn digits")


# --------------------------------------------------------------------------- stats and caching
def _make_raw(train_x, train_y, test_x, test_y, n_classes: int, max_value: int, what: str) -> RawData:
    for y in (train_y, test_y):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise DataError(f"corrupt data in {what}: labels outside 0..{n_classes - 1}")
    # Per-channel mean/std from a histogram of pixel values: exact in float64, and bincount's int64
    # copy is made in bounded chunks where a float64 copy of CIFAR's train set would be 1.2 GB.
    planes = train_x.unsqueeze(1) if train_x.dim() == 3 else train_x
    values = np.arange(max_value + 1, dtype=np.float64) / max_value
    mean, std = [], []
    for c in range(planes.shape[1]):
        chunks = planes[:, c].reshape(-1).split(1 << 22)
        hist = sum(torch.bincount(chunk.long(), minlength=max_value + 1) for chunk in chunks)
        p = hist.numpy().astype(np.float64) / hist.sum().item()
        m = float(p @ values)
        mean.append(m)
        std.append(float(np.sqrt(max(p @ values**2 - m * m, 0.0))))
    return RawData(train_x, train_y, test_x, test_y, n_classes, tuple(mean), tuple(std), max_value)


def concat_sources(parts: list[RawData]) -> RawData:
    """Several sources as one (continuum's Fellowship): images stacked, each source's labels shifted past
    the classes of the sources before it. Per-channel stats are pooled exactly from each part's
    (mean, std) weighted by its number of training pixels."""
    shapes = {tuple(p.train_x.shape[1:]) for p in parts} | {tuple(p.test_x.shape[1:]) for p in parts}
    if len(shapes) != 1 or len({p.max_value for p in parts}) != 1:
        raise DataError(f"cannot combine sources of image shapes {sorted(shapes)} and value ranges "
                        f"{sorted({p.max_value for p in parts})}")
    offsets = np.cumsum([0] + [p.n_classes for p in parts[:-1]]).tolist()
    n = np.array([len(p.train_y) for p in parts], dtype=np.float64)
    w = n / n.sum()
    mean = np.array([p.mean for p in parts]).T @ w  # per channel
    second = (np.array([p.std for p in parts]) ** 2 + np.array([p.mean for p in parts]) ** 2).T @ w  # E[x^2]
    std = np.sqrt(np.maximum(second - mean**2, 0.0))
    cat = lambda field: torch.cat([getattr(p, field) for p in parts])  # noqa: E731
    shift = lambda field: torch.cat([getattr(p, field) + o for p, o in zip(parts, offsets)])  # noqa: E731
    return RawData(cat("train_x"), shift("train_y"), cat("test_x"), shift("test_y"),
                   sum(p.n_classes for p in parts), tuple(mean.tolist()), tuple(std.tolist()), parts[0].max_value)


def _read_cache(path: Path, fingerprint: list) -> RawData | None:
    """The cached data if it was made from exactly these files (path, size, mtime), else None."""
    try:
        blob = torch.load(path, weights_only=True)
        if blob["version"] != _CACHE_VERSION or blob["fingerprint"] != fingerprint:
            return None
        return RawData(**{k: blob[k] for k in RawData.__dataclass_fields__})
    except Exception:  # noqa: BLE001 - a missing or broken cache only means: read the files again
        return None


def _write_cache(path: Path, raw: RawData, fingerprint: list) -> None:
    blob = {k: getattr(raw, k) for k in RawData.__dataclass_fields__}
    blob.update(version=_CACHE_VERSION, fingerprint=fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: parallel runs (e.g. a Hydra multirun) may fill the same cache at once, and
    # a reader must never see a half-written file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
