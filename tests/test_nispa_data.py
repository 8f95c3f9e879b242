"""NISPA's data and network: dataset=ef_mnist on tiny files in torchvision's real layouts, model=nispa_cnn."""
import json

import pytest
import torch
from torch import nn

from cl_runner.config import validate
from cl_runner.data import build_stream
from cl_runner.errors import ConfigError, DataError
from cl_runner.models import build_model
from cl_runner.train import run

from fakedata import make_cifar10, make_emnist, make_mnist

TASKS = [list(range(0, 10)), list(range(10, 23)), list(range(23, 36)), list(range(36, 47)), list(range(47, 57))]


def results(tmp_path) -> dict:
    (path,) = (tmp_path / "outputs" / "runs").rglob("results.json")
    return json.loads(path.read_text())


@pytest.fixture
def ef_files(tmp_path):
    """EMNIST-balanced (94 train / 47 test, every class) and Fashion-MNIST (20 / 10) under tmp_path/data."""
    emnist = make_emnist(tmp_path / "data", gz=True)
    fmnist = make_mnist(tmp_path / "data", "FashionMNIST")
    return emnist, fmnist


# ------------------------------------------------------------------------------------ ef_mnist
def test_ef_mnist_stream(make_cfg, ef_files):
    emnist, fmnist = ef_files
    stream = build_stream(validate(make_cfg("dataset=ef_mnist")), torch.device("cpu"))
    assert stream.n_outputs == 57 and stream.input_shape == (1, 28, 28) and stream.label_mode == "offset"
    assert [t.classes for t in stream.tasks] == TASKS and stream.classes_per_task == 13
    test_y = torch.cat([t.test.y for t in stream.tasks])
    assert sorted(test_y.tolist()) == sorted(emnist["test"][1].tolist() + (fmnist["t10k"][1] + 47).tolist())
    for t in stream.tasks:
        for split in (t.train, t.val, t.test):
            assert set(split.y.tolist()) <= set(t.classes) and split.x.shape[1:] == (1, 28, 28)
            assert split.x.dtype == torch.float32 and split.x.min() >= 0 and split.x.max() <= 1  # unit scaling
    # the last task is exactly Fashion-MNIST, pixels / 255 with no mean/std
    fm_test = torch.from_numpy(fmnist["t10k"][0]).float().div(255).unsqueeze(1)
    assert torch.equal(stream.tasks[4].test.x, fm_test)
    assert stream.tasks[4].test.y.tolist() == (fmnist["t10k"][1] + 47).tolist()
    # 10 % of each task's training data held out: 114 training images in all
    n_train = [len(t.train.y) + len(t.val.y) for t in stream.tasks]
    assert n_train == [20, 26, 26, 22, 20] and [len(t.val.y) for t in stream.tasks] == [2, 3, 3, 2, 2]


def test_ef_mnist_keys(make_cfg, ef_files):
    two = build_stream(validate(make_cfg("dataset=ef_mnist", "dataset.n_tasks=2", "dataset.val_fraction=0")), "cpu")
    assert [t.classes for t in two.tasks] == TASKS[:2] and two.n_outputs == 23 and two.tasks[0].val is None
    cut = build_stream(validate(make_cfg("dataset=ef_mnist", "dataset.classes_per_task=[47,10]",
                                         "dataset.n_tasks=2")), "cpu")
    assert [len(t.classes) for t in cut.tasks] == [47, 10]
    shared = build_stream(validate(make_cfg("dataset=ef_mnist", "dataset.label_mode=shared")), "cpu")
    assert shared.n_outputs == 13 and shared.tasks[4].classes == list(range(10))  # the largest task's labels
    std = build_stream(validate(make_cfg("dataset=ef_mnist", "dataset.normalize=standard")), "cpu")
    assert abs(torch.cat([t.train.x for t in std.tasks] + [t.val.x for t in std.tasks]).mean().item()) < 1e-4
    for override, needle in (("dataset.classes_per_task=[10,13]", "must add up to the 57 classes"),
                             ("dataset.n_tasks=6", "dataset.n_tasks=6 must be at most the 5 tasks"),
                             ("dataset.classes_per_task=[57,0]", "dataset.classes_per_task=0 is out of range")):
        with pytest.raises(ConfigError, match=needle) as e:
            validate(make_cfg("dataset=ef_mnist", override))
        assert "\n" not in str(e.value)


def test_ef_mnist_missing_emnist_is_one_line(make_cfg, tmp_path):
    make_mnist(tmp_path / "data", "FashionMNIST")  # Fashion-MNIST present, EMNIST not
    with pytest.raises(DataError) as e:
        build_stream(validate(make_cfg("dataset=ef_mnist", "dataset.download=false")), "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "EMNIST/raw/emnist-balanced-{train,test}-{images-idx3,labels-idx1}-ubyte" in msg
    assert str((tmp_path / "data").resolve()) in msg and "CL_RUNNER_DATA" in msg


def test_finetune_on_ef_mnist_multi_head(make_cfg, tmp_path, ef_files):
    acc = run(make_cfg("method=finetune", "dataset=ef_mnist", "model.head=multi", "model.hidden=[32]",
                       "method.epochs=1", "method.batch_size=8"))
    r = results(tmp_path)
    assert r["status"] == "finished" and len(r["acc"]) == 5 and None not in r["acc_til"][4]
    assert 0 <= acc <= 100


# ----------------------------------------------------------------------------------- nispa_cnn
def test_nispa_cnn_layers_and_logits(make_cfg, tmp_path):
    make_cifar10(tmp_path / "data")
    cfg = validate(make_cfg("method=finetune", "dataset=split_cifar10", "model=nispa_cnn"))
    stream = build_stream(cfg, "cpu")
    model = build_model(cfg, stream)
    convs = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in model.convs]
    assert convs == [(3, 64, (3, 3), (1, 1), (1, 1)), (64, 64, (3, 3), (1, 1), (1, 1)),
                     (64, 128, (3, 3), (1, 1), (1, 1)), (128, 128, (3, 3), (1, 1), (1, 1))]
    assert isinstance(model.hidden, nn.ModuleList) and all(isinstance(m, nn.Linear) for m in model.hidden)
    assert [(m.in_features, m.out_features) for m in model.hidden] == [(128 * 8 * 8, 1024)]
    assert (model.out.in_features, model.out.out_features) == (1024, 10)
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm2d, nn.BatchNorm1d)) for m in model.modules())
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, 1024)
    # 28x28 grey inputs: 28 → 14 → 7
    small = validate(make_cfg("method=finetune", "model=nispa_cnn", "model.channels=[4,4,8,8]", "model.hidden=[16,16]"))
    net = build_model(small, type("S", (), {"input_shape": (1, 28, 28), "n_outputs": 57})())
    assert net.hidden[0].in_features == 8 * 7 * 7 and len(net.hidden) == 2
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 57)
    with pytest.raises(ConfigError, match="4 conv widths"):
        validate(make_cfg("method=finetune", "model=nispa_cnn", "model.channels=[4,4,8]"))


def test_finetune_nispa_cnn_on_split_cifar10(make_cfg, tmp_path):
    make_cifar10(tmp_path / "data")
    run(make_cfg("method=finetune", "dataset=split_cifar10", "model=nispa_cnn",
                 "method.epochs=1", "method.batch_size=4"))  # the default widths
    r = results(tmp_path)
    assert r["status"] == "finished" and len(r["acc"]) == 5
