"""Raw sources: tiny files in the real on-disk formats, written here, read back exactly."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_runner.data import sources
from cl_runner.data.sources import SOURCES, concat_sources, load_raw
from cl_runner.errors import DataError
from fakedata import cifar_batch, make_cifar10, make_emnist, make_mnist, write_idx, write_pickle

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
       "t10k-labels-idx1-ubyte")


def expected_red(first: int, n: int) -> torch.Tensor:
    return torch.from_numpy(((np.arange(1024)[None] + np.arange(first, first + n)[:, None]) % 256)
                            .reshape(n, 32, 32).astype(np.uint8))


# ------------------------------------------------------------------------------------- MNIST
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fmnist", "FashionMNIST")])
def test_idx_roundtrip(tmp_path, name, folder, gz):
    data = make_mnist(tmp_path / "root", folder, gz)
    raw = load_raw(name, tmp_path / "root", tmp_path / "cache", download=False)
    assert raw.train_x.dtype == torch.uint8 and raw.train_x.shape == (20, 28, 28)
    assert raw.test_x.shape == (10, 28, 28) and raw.train_y.dtype == torch.int64
    assert torch.equal(raw.train_x, torch.from_numpy(data["train"][0]))
    assert torch.equal(raw.test_x, torch.from_numpy(data["t10k"][0]))
    assert raw.train_y.tolist() == data["train"][1].tolist()
    assert raw.test_y.tolist() == data["t10k"][1].tolist()
    assert raw.n_classes == 10 and raw.max_value == 255
    x = data["train"][0].astype(np.float64) / 255
    assert raw.mean == pytest.approx((x.mean(),)) and raw.std == pytest.approx((x.std(),))


def test_idx_bad_magic_names_file(tmp_path):
    make_mnist(tmp_path, gz=True)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros((10, 28, 28)), gz=True)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_raw("mnist", tmp_path, tmp_path / "cache", download=False)


def test_idx_truncated_and_mismatched(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_raw("mnist", tmp_path, tmp_path / "cache", download=False)
    write_idx(path, np.zeros((19, 28, 28)), gz=False)  # valid file, but 19 images for 20 labels
    with pytest.raises(DataError, match="19 images"):
        load_raw("mnist", tmp_path, tmp_path / "cache", download=False)
    gz = tmp_path / "g" / "MNIST" / "raw"
    make_mnist(tmp_path / "g", gz=True)
    (gz / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_raw("mnist", tmp_path / "g", tmp_path / "cache", download=False)


@pytest.mark.parametrize("gz", [False, True])
def test_emnist_balanced_layout(tmp_path, gz):
    data = make_emnist(tmp_path, gz=gz)
    raw = load_raw("emnist", tmp_path, tmp_path / "cache", download=False)
    assert raw.n_classes == 47 and raw.train_x.shape == (94, 28, 28) and raw.test_x.shape == (47, 28, 28)
    assert torch.equal(raw.train_x, torch.from_numpy(data["train"][0]))  # as stored (not transposed back)
    assert raw.train_y.tolist() == data["train"][1].tolist() and sorted(raw.test_y.tolist()) == list(range(47))


def test_concat_sources_shifts_labels_and_pools_stats(tmp_path):
    make_emnist(tmp_path)
    make_mnist(tmp_path, "FashionMNIST")
    e = load_raw("emnist", tmp_path, tmp_path / "cache", download=False)
    f = load_raw("fmnist", tmp_path, tmp_path / "cache", download=False)
    both = concat_sources([e, f])
    assert both.n_classes == 57 and both.train_x.shape == (94 + 20, 28, 28) and both.test_x.shape == (47 + 10, 28, 28)
    assert both.train_y.tolist() == e.train_y.tolist() + (f.train_y + 47).tolist()
    assert both.test_y[47:].tolist() == (f.test_y + 47).tolist()
    x = both.train_x.double() / 255
    assert both.mean == pytest.approx((x.mean().item(),)) and both.std == pytest.approx((x.std(unbiased=False).item(),))
    with pytest.raises(DataError, match="cannot combine"):
        make_cifar10(tmp_path)
        concat_sources([e, load_raw("cifar10", tmp_path, tmp_path / "cache", download=False)])


# ------------------------------------------------------------------------------------- CIFAR
def test_cifar10_layout(tmp_path):
    make_cifar10(tmp_path)
    raw = load_raw("cifar10", tmp_path, tmp_path / "cache", download=False)
    assert raw.train_x.shape == (10, 3, 32, 32) and raw.test_x.shape == (3, 3, 32, 32)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    assert torch.equal(raw.train_x[:, 0], expected_red(0, 10))  # batches concatenated in order
    assert torch.equal(raw.test_x[:, 0], expected_red(100, 3))
    assert (raw.train_x[:, 1] == 7).all() and (raw.train_x[:, 2] == 200).all()
    assert raw.train_y.tolist() == list(range(10)) and raw.test_y.tolist() == [0, 1, 2]
    assert raw.n_classes == 10 and len(raw.mean) == 3
    red = expected_red(0, 10).double() / 255
    assert raw.mean == pytest.approx((red.mean().item(), 7 / 255, 200 / 255))
    assert raw.std == pytest.approx((red.std(unbiased=False).item(), 0, 0), abs=1e-6)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_pickle(folder / "train", cifar_batch(120, 0, b"fine_labels", 100))
    write_pickle(folder / "test", cifar_batch(4, 96, b"fine_labels", 100))
    raw = load_raw("cifar100", tmp_path, tmp_path / "cache", download=False)
    assert raw.n_classes == 100 and raw.train_x.shape == (120, 3, 32, 32)
    assert raw.train_y.tolist() == [i % 100 for i in range(120)]
    assert raw.test_y.tolist() == [96, 97, 98, 99]
    assert torch.equal(raw.test_x[:, 0], expected_red(96, 4))


def test_cifar_corrupt_pickle(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_raw("cifar10", tmp_path, tmp_path / "cache", download=False)


# ------------------------------------------------------------------------------------- cache
def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    make_mnist(tmp_path / "root")
    first = load_raw("mnist", tmp_path / "root", tmp_path / "cache", download=False)
    assert (tmp_path / "cache" / "mnist.pt").is_file()

    real_reader = sources._read_idx_set

    def must_not_read(files):
        raise AssertionError("cache should have been used")

    monkeypatch.setattr(sources, "_read_idx_set", must_not_read)
    second = load_raw("mnist", tmp_path / "root", tmp_path / "cache", download=False)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert (second.mean, second.std, second.n_classes, second.max_value) == (
        first.mean, first.std, first.n_classes, first.max_value)

    # A changed source file (here: new contents, different size) must be re-read.
    monkeypatch.setattr(sources, "_read_idx_set", real_reader)
    labels = tmp_path / "root" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    images = tmp_path / "root" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    write_idx(labels, np.full(3, 9), gz=False)
    write_idx(images, np.zeros((3, 28, 28)), gz=False)
    third = load_raw("mnist", tmp_path / "root", tmp_path / "cache", download=False)
    assert third.test_y.tolist() == [9, 9, 9]

    # Same size, only a new mtime: also re-read.
    st = labels.stat()
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(sources, "_read_idx_set", must_not_read)
    with pytest.raises(AssertionError, match="cache should"):
        load_raw("mnist", tmp_path / "root", tmp_path / "cache", download=False)


def test_corrupt_cache_is_ignored(tmp_path):
    make_mnist(tmp_path / "root")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "mnist.pt").write_bytes(b"junk")
    raw = load_raw("mnist", tmp_path / "root", tmp_path / "cache", download=False)
    assert raw.train_x.shape == (20, 28, 28)


# -------------------------------------------------------------------------- missing / download
@pytest.mark.parametrize("name,folder,file", [("mnist", "MNIST/raw", "images-idx3"),
                                              ("fmnist", "FashionMNIST/raw", "labels-idx1"),
                                              ("emnist", "EMNIST/raw", "emnist-balanced-{train,test}-"),
                                              ("cifar10", "cifar-10-batches-py", "test_batch"),
                                              ("cifar100", "cifar-100-python", "train")])
def test_missing_without_download(tmp_path, name, folder, file):
    with pytest.raises(DataError) as info:
        load_raw(name, tmp_path, tmp_path / "cache", download=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path.resolve()) in msg and folder in msg and file in msg
    assert "CL_RUNNER_DATA" in msg and "download failed" not in msg
    assert not (tmp_path / "cache").exists()


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    seen = []

    class Offline:
        def __init__(self, root, train, download):
            seen.append(socket.getdefaulttimeout())
            raise RuntimeError("Error downloading\nURLError: no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as info:
        load_raw("cifar10", tmp_path, tmp_path / "cache", download=True)
    msg = str(info.value)
    assert "\n" not in msg and "download failed" in msg and "no network" in msg and "test_batch" in msg
    assert seen == [10] and socket.getdefaulttimeout() == before


def test_download_then_own_reader(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeMNIST:  # stands in for torchvision: writes the raw files where it would
        def __init__(self, root, train, download):
            make_mnist(Path(root), gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    raw = load_raw("mnist", tmp_path / "new", tmp_path / "cache", download=True)
    assert raw.train_x.shape == (20, 28, 28) and raw.test_y.shape == (10,)


def test_emnist_download_asks_for_the_balanced_split(tmp_path, monkeypatch):
    import torchvision.datasets

    seen = []

    class FakeEMNIST:  # torchvision's EMNIST needs split=; it unpacks every split into EMNIST/raw
        def __init__(self, root, split, train, download):
            seen.append((split, train))
            make_emnist(Path(root))

    monkeypatch.setattr(torchvision.datasets, "EMNIST", FakeEMNIST)
    raw = load_raw("emnist", tmp_path / "new", tmp_path / "cache", download=True)
    assert seen == [("balanced", True), ("balanced", False)] and raw.n_classes == 47


def test_unknown_source(tmp_path):
    with pytest.raises(DataError, match="unknown data source"):
        load_raw("stl10", tmp_path, tmp_path, download=False)


# ------------------------------------------------------------------------------------ digits
def test_digits(tmp_path):
    raw = load_raw("digits", tmp_path / "nowhere", tmp_path / "cache", download=False)
    again = load_raw("digits", tmp_path / "nowhere", tmp_path / "cache", download=False)
    assert raw.train_x.shape[1:] == (8, 8) and raw.train_x.dtype == torch.uint8
    assert len(raw.train_x) + len(raw.test_x) == 1797 and raw.n_classes == 10 and raw.max_value == 16
    assert int(raw.train_x.max()) == 16 and int(raw.train_x.min()) == 0
    assert torch.equal(raw.test_x, again.test_x) and torch.equal(raw.train_y, again.train_y)
    train_counts, test_counts = torch.bincount(raw.train_y), torch.bincount(raw.test_y)
    assert len(test_counts) == 10
    # every 5th of each class -> test, so each class's test count is floor(count / 5)
    assert torch.equal(test_counts, (train_counts + test_counts) // 5)
    assert len(raw.mean) == 1 and 0 < raw.mean[0] < 1 and 0 < raw.std[0] < 1
    assert SOURCES == ("digits", "mnist", "fmnist", "emnist", "cifar10", "cifar100", "svhn")


# ------------------------------------------------------------------------------ genuine data
SHARED = Path(os.environ.get("CL_RUNNER_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason=f"no genuine data at {SHARED}")
def test_genuine_mnist_and_fmnist(tmp_path):
    mnist = load_raw("mnist", SHARED, tmp_path, download=False)
    assert torch.bincount(mnist.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                      6265, 5851, 5949]
    assert mnist.train_x.shape == (60000, 28, 28) and len(mnist.test_y) == 10000
    assert mnist.mean[0] == pytest.approx(0.1307, abs=1e-4) and mnist.std[0] == pytest.approx(0.3081, abs=1e-4)
    fmnist = load_raw("fmnist", SHARED, tmp_path, download=False)
    assert torch.bincount(fmnist.train_y).tolist() == [6000] * 10
    assert torch.bincount(fmnist.test_y).tolist() == [1000] * 10
    cached = load_raw("mnist", SHARED, tmp_path, download=False)  # from tmp_path/mnist.pt
    assert torch.equal(cached.train_x, mnist.train_x)


def test_svhn_mat_files_read_as_torchvision_does(tmp_path, make_cfg):
    from fakedata import make_svhn

    make_svhn(tmp_path / "data")
    raw = load_raw("svhn", tmp_path / "data", tmp_path / "cache", download=False)
    assert raw.train_x.shape == (60, 3, 32, 32) and raw.test_x.shape == (30, 3, 32, 32)
    assert raw.train_x[:, 0, 0, 0].tolist() == list(range(60))  # [32, 32, 3, N] -> [N, 3, 32, 32]
    assert raw.train_y[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # label 10 is the digit 0
    from cl_runner.config import validate
    from cl_runner.data import build_stream

    cfg = validate(make_cfg("dataset=split_svhn", "dataset.n_tasks=10", "dataset.normalize=symmetric",
                            "dataset.resize=32", "dataset.download=false"))
    stream = build_stream(cfg, torch.device("cpu"))
    assert len(stream.tasks) == 10 and stream.input_shape == (3, 32, 32)
    x = stream.tasks[0].train.x
    assert x.min() >= -1 and x.max() <= 1


def test_svhn_missing_files_name_them(tmp_path):
    with pytest.raises(DataError, match=r"SVHN/\{train,test\}_32x32.mat"):
        load_raw("svhn", tmp_path / "data", tmp_path / "cache", download=False)
