"""NISPA (../shared/specs/nispa.md): zero forgetting, constant density, stable units frozen bit for bit,
growth into plastic units only, grown weights as specified, masked logits; fast on the bundled digits."""
import pytest
import torch

from cl_runner.config import validate
from cl_runner.data import build_stream
from cl_runner.errors import ConfigError
from cl_runner.models import build_model
from cl_runner.models.masks import FREE
from cl_runner.registry import METHODS
from cl_runner.train import run

SMALL = ("method=nispa", "model.hidden=[48,48]", "dataset.val_fraction=0.2", "dataset.normalize=unit", "method.lr=0.002",
         "method.epochs=2", "method.batch_size=64", "method.k=8", "hardware=cpu")


def build(make_cfg, *overrides):
    cfg = validate(make_cfg(*SMALL, *overrides))
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, torch.device("cpu"))
    model = build_model(cfg, stream)
    return METHODS.get("nispa")(cfg, model, stream, torch.device("cpu")), stream


def present(method):
    return [int((m.owner != FREE).sum()) for m in method.layers]


def test_density_and_growth_rules_hold_in_every_phase(make_cfg):
    """Each drop is matched by a grow in the same layer (hidden layers have plastic units to grow into);
    nothing grows into a stable or candidate unit; plastic units keep an outgoing connection."""
    method, stream = build(make_cfg)
    start = present(method)
    total = [m.owner.numel() for m in method.layers]
    assert all(abs(p / n - 0.2) < 0.05 for p, n in zip(start, total))  # 80 % sparse, i.i.d.
    orig, checked = method._grow, []

    def grow(dropped, t):
        S = method._stable(t, candidates=True)
        before = [m.owner.clone() for m in method.layers]
        grown = orig(dropped, t)
        for l, (m, b) in enumerate(zip(method.layers, before)):
            new = (b == FREE) & (m.owner != FREE)
            assert not new[S[l + 1]].any()  # never into a stable / candidate unit
            if l < len(method.layers) - 1:  # hidden targets: as many grown as dropped
                assert grown[l] == dropped[l] == int(new.sum())
        checked.append(t)
        return grown

    method._grow = grow
    for task in stream.tasks[:2]:
        method.fit_task(task)
        hidden = present(method)[:-1]
        assert hidden == start[:-1], (task.id, hidden, start)
    assert checked


def test_stable_weights_and_biases_bit_identical_and_zero_forgetting(make_cfg):
    method, stream = build(make_cfg)
    method.fit_task(stream.tasks[0])
    S = method._stable(1)
    frozen = method._frozen(1)
    assert any(int(s.sum()) for s in S[1:-1])  # task 0 kept stable units
    w0 = [m.weight.detach().clone() for m in method.layers]
    b0 = [m.bias.detach().clone() for m in method.layers]
    x, task0 = stream.tasks[0].test.x, stream.tasks[0]
    method.model.eval()
    logits0 = method.predict(x)[:, task0.classes]
    for task in stream.tasks[1:3]:
        method.fit_task(task)
    for l, m in enumerate(method.layers):
        assert torch.equal(m.weight[m.expand(frozen[l])], w0[l][m.expand(frozen[l])])
        assert torch.equal(m.bias[S[l + 1]], b0[l][S[l + 1]])
        rows = S[l + 1]  # stable units read only stable units (no connection from a plastic one)
        assert not ((m.owner != FREE)[rows][:, ~method.net.cols(l, S[l])]).any()
    method.model.eval()
    assert torch.equal(method.predict(x)[:, task0.classes], logits0)


def test_run_task_il_columns_constant_and_diagnostics(make_cfg, tmp_path):
    run(make_cfg(*SMALL))
    import json
    r = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert r["status"] == "finished"
    for j in range(5):  # forgetting is exactly 0 in the task-incremental setting
        assert all(r["acc_til"][i][j] == r["acc_til"][j][j] for i in range(j, 5))
    for d, cap in zip(r["method_metrics"], r["capacity"]):
        assert 1 <= d["phases"] <= 8 and 0 < d["final_p"] <= 100 and d["phase_1/val_acc"] >= 0
        assert cap["fc1"]["units_reserved"] + cap["fc1"]["units_free"] + cap["fc1"]["units_shared"] == 48
    assert r["metrics"]["final/forgetting_til"] == 0.0
    assert (next((tmp_path / "outputs").rglob("results.json")).parent / "artifacts" / "nispa_phases.png").stat().st_size


def test_logits_outside_the_task_are_zero_in_the_loss(make_cfg):
    method, stream = build(make_cfg)
    task = stream.tasks[1]
    method.out_mask.zero_()[task.classes] = 1.0
    logits = torch.randn(4, stream.n_outputs)
    y = torch.tensor(task.classes * 2)
    masked = logits.clone()
    masked[:, [c for c in range(stream.n_outputs) if c not in task.classes]] = 0.0
    torch.testing.assert_close(method.loss(logits, y, task), torch.nn.functional.cross_entropy(masked, y))


def test_grown_weights_are_drawn_as_specified(make_cfg):
    method, _ = build(make_cfg)
    m = method.layers[1]
    w = method._new_weights(m, (200000, 1))
    nz = m.weight.detach()[m.weight != 0]
    assert abs(float(w.mean() - nz.mean())) < 0.01 and abs(float(w.std() - nz.std(unbiased=False))) < 0.01
    method.hp.grow_init = "zero"
    assert not method._new_weights(m, (5, 1)).any()


def test_checkpoint_round_trip(make_cfg):
    method, stream = build(make_cfg)
    method.fit_task(stream.tasks[0])
    fresh, _ = build(make_cfg)
    fresh.load_state_dict(method.state_dict())
    for a, b in zip(method.layers, fresh.layers):
        assert torch.equal(a.owner, b.owner) and torch.equal(a.unit_owner, b.unit_owner)
    x = stream.tasks[0].test.x
    assert torch.equal(method.predict(x), fresh.predict(x))


@pytest.mark.parametrize("overrides,words", [
    (("dataset.val_fraction=0",), "dataset.val_fraction > 0"),
    (("model.head=multi",), "model.head=single"),
    (("method.sparsity=1.0",), "method.sparsity"),
])
def test_config_errors(make_cfg, overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        validate(make_cfg(*SMALL, *overrides))


def test_cnn_first_conv_dense_others_sparse_and_zero_forgetting(make_cfg, tmp_path):
    """NISPA's CNN on synthetic CIFAR-100 in its real on-disk format: the first conv keeps every channel pair,
    the others are masked per (out, in) pair; conv2/conv4 activity is read after their max-pool; columns
    of the task-IL matrix stay constant."""
    from fakedata import make_cifar100

    make_cifar100(tmp_path / "data", n_train=300, n_test=100)
    cnn = ("model=nispa_cnn", "model.channels=[4,4,8,8]", "model.hidden=[16]", "dataset=split_cifar100",
           "dataset.n_tasks=20", "dataset.normalize=unit", "method.sparsity=0.5")
    method, _ = build(make_cfg, *cnn)
    assert (method.layers[0].owner != FREE).all() and method.units.taps[1] is method.model.pool
    assert 0.3 < float((method.layers[2].owner != FREE).float().mean()) < 0.7
    run(make_cfg(*SMALL, *cnn))
    import json
    r = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert r["status"] == "finished"
    T = len(r["acc_til"])
    for j in range(T):
        assert all(r["acc_til"][i][j] == r["acc_til"][j][j] for i in range(j, T))


@pytest.mark.parametrize("protocol,fake", [("nispa_ef_mnist", "emnist"), ("nispa_cifar10", "cifar10"),
                                           ("nispa_cifar100", "cifar100")])
def test_paper_protocols_end_to_end_on_files_in_the_real_formats(make_cfg, tmp_path, protocol, fake):
    """The pinned protocols, shrunk in width and phases only, on small files written in torchvision's layouts."""
    import json

    import fakedata

    data = tmp_path / "data"
    if fake == "emnist":
        fakedata.make_emnist(data, n_train=570, n_test=114)
        fakedata.make_mnist(data, folder="FashionMNIST", n_train=100, n_test=20)
    elif fake == "cifar10":
        fakedata.make_cifar10(data)
    else:
        fakedata.make_cifar100(data, n_train=300, n_test=100)
    small = ["method.epochs=1", "method.k=3", "hardware=cpu"]
    small += ["model.hidden=[32,32,32]"] if fake == "emnist" else ["model.channels=[4,4,8,8]", "model.hidden=[16]",
                                                                   "dataset.normalize=unit"]
    run(make_cfg(f"+experiment={protocol}", *small,
                 data=data))
    r = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert r["status"] == "finished" and r["tasks_done"] == len(r["acc_til"])
    want = {"nispa_ef_mnist": ("ef_mnist", 0.8, 512), "nispa_cifar10": ("split_cifar10", 0.9, 128),
            "nispa_cifar100": ("split_cifar100", 0.9, 64)}[protocol]
    c = r["config"]
    assert (c["dataset"]["name"], c["method"]["sparsity"], c["method"]["batch_size"]) == want
    assert all(d["phases"] >= 1 for d in r["method_metrics"])


def test_replay_variant_class_balanced_memory_and_unfrozen_output(make_cfg):
    """method=nispa_replay: the memory holds replay_memory // (classes seen) random samples of every seen
    class, replayed minibatches enter the loss, and the output layer keeps learning old classes."""
    method, stream = build(make_cfg, "method=nispa_replay", "method.replay_memory=40", "method.batch_size=32")
    assert method.replay and not method.memory.ge(0).any()
    for t, task in enumerate(stream.tasks[:3]):
        out0 = method.layers[-1].weight.detach().clone()
        method.fit_task(task)
        kept = method.memory[method.memory[:, 0] >= 0]
        seen = 2 * (t + 1)
        assert len(kept) == 40 // seen * seen
        labels = torch.stack([stream.tasks[int(j)].train.y[int(i)] for j, i, _ in kept.tolist()])
        assert torch.equal(labels, kept[:, 2]) and all(int((kept[:, 2] == c).sum()) == 40 // seen for c in range(seen))
        if t:  # old classes' output rows move (the release never freezes the output layer)
            assert not torch.equal(method.layers[-1].weight[:2 * t], out0[:2 * t])
    logits = torch.randn(4, stream.n_outputs)
    y = torch.tensor([4, 5, 4, 5])
    assert method.loss(logits, y, stream.tasks[2]) > torch.nn.functional.cross_entropy(logits, y)  # + replay term
