"""Tiny dataset files in the real on-disk formats (torchvision's MNIST and CIFAR layouts), for tests."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------ file writers
def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    """IDX: 0x0000, type 0x08 (ubyte), ndim, then ndim big-endian uint32 sizes, then the bytes."""
    blob = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)


def make_mnist(root: Path, folder="MNIST", gz=False, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) * 3) % 10
        write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", y, gz)
        data[split] = (x, y)
    return data


def make_emnist(root: Path, gz=False, n_train=94, n_test=47):
    """EMNIST-balanced as torchvision unpacks it: EMNIST/raw/emnist-balanced-{train,test}-..., labels 0..46
    (every class appears once in each run of 47 images)."""
    rng = np.random.default_rng(1)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) * 5) % 47
        write_idx(root / "EMNIST" / "raw" / f"emnist-balanced-{split}-images-idx3-ubyte", x, gz)
        write_idx(root / "EMNIST" / "raw" / f"emnist-balanced-{split}-labels-idx1-ubyte", y, gz)
        data[split] = (x, y)
    return data


def cifar_batch(n: int, start: int, label_key: bytes, n_classes: int) -> dict:
    """Red plane = a fixed 32x32 ramp plus the image number; green 7; blue 200."""
    red = (np.arange(1024)[None, :] + np.arange(start, start + n)[:, None]) % 256
    data = np.concatenate([red, np.full((n, 1024), 7), np.full((n, 1024), 200)], axis=1)
    batch = {b"batch_label": b"batch", b"data": data.astype(np.uint8),
             b"filenames": [b"img_%d.png" % i for i in range(start, start + n)],
             label_key: [int(i % n_classes) for i in range(start, start + n)]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(i % 20) for i in range(start, start + n)]
    return batch


def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root: Path) -> None:
    for i in range(5):
        write_pickle(root / "cifar-10-batches-py" / f"data_batch_{i + 1}", cifar_batch(2, 2 * i, b"labels", 10))
    write_pickle(root / "cifar-10-batches-py" / "test_batch", cifar_batch(3, 100, b"labels", 10))


def make_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> None:
    write_pickle(root / "cifar-100-python" / "train", cifar_batch(n_train, 0, b"fine_labels", 100))
    write_pickle(root / "cifar-100-python" / "test", cifar_batch(n_test, 1000, b"fine_labels", 100))


def make_svhn(root: Path, n_train: int = 60, n_test: int = 30) -> None:
    """torchvision's SVHN layout: <root>/SVHN/{train,test}_32x32.mat, X uint8 [32, 32, 3, N], y [N, 1] in 1..10
    (10 is the digit 0). Pixel (0, 0) of image i's first channel holds i, to check the axis order on reading."""
    from scipy.io import savemat

    (root / "SVHN").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        x[0, 0, 0, :] = np.arange(n) % 256
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10
        savemat(str(root / "SVHN" / f"{split}_32x32.mat"), {"X": x, "y": y})
