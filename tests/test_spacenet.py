"""SpaceNet and its variants (static_sparse, spacenet_rehearsal, the CNN): the spec's invariants, config
errors, capacity, artifacts, checkpoints; fast on the bundled 8x8 digits and tiny synthetic CIFAR, plus a
slow tier on real MNIST (../shared/specs/spacenet.md)."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from cl_runner.config import validate
from cl_runner.data import build_stream
from cl_runner.errors import CapacityError, ConfigError
from cl_runner.models import build_model
from cl_runner.models.masked_net import MaskedNet
from cl_runner.models.masks import MaskedLinear, make_masked
from cl_runner.registry import METHODS
from cl_runner.train import run

from conftest import SHARED_DATA, cli
from fakedata import make_cifar10, make_cifar100

# the MNIST schedule (4 epochs of batch 128), not split_digits' own: quick, and what the invariants assume
SMALL = ("model.hidden=[60,60]", "method.sel=20", "method.spec=5", "method.epochs=4", "method.batch_size=128")


def build(make_cfg, *overrides, method="spacenet"):
    cfg = validate(make_cfg(f"method={method}", "hardware=cpu", *overrides))
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, torch.device("cpu"))
    model = build_model(cfg, stream)
    return METHODS.get(cfg.method.name)(cfg, model, stream, torch.device("cpu")), stream


def watch(method, every_epoch):
    """Call every_epoch(method, task, epoch) after each end_epoch (i.e. after each drop/grow round)."""
    orig = method.end_epoch

    def end_epoch(task, epoch):
        orig(task, epoch)
        every_epoch(method, task, epoch)

    method.end_epoch = end_epoch


def effective(method):
    """Every layer's weights as evaluation sees them (set-aside classifier rows restored) and biases."""
    ws = [m.weight.detach().clone() for m in method.layers]
    ws[-1] += method.aside
    return ws, [m.bias.detach().clone() for m in method.layers]


# ------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("opt", [(), ("method.momentum=0.9", "method.weight_decay=0.01"),
                                 ("method.optimizer=adam", "method.lr=0.001")])
def test_old_tasks_weights_bit_identical(make_cfg, opt):
    method, stream = build(make_cfg, *SMALL, *opt)
    for t, task in enumerate(stream.tasks[:3]):
        if t:
            ws0, bs0 = effective(method)
        method.fit_task(task)
        if not t:
            continue
        ws1, bs1 = effective(method)
        for l, m in enumerate(method.layers):
            old = m.expand(m.frozen(t))
            assert old.any() and torch.equal(ws1[l][old], ws0[l][old]), (t, l)
            # biases that must not move: reserved units (hidden layers), old classes (output)
            keep = (~m.free_units() & (m.unit_owner < t)) if l < len(method.layers) - 1 else \
                torch.isin(torch.arange(len(bs0[l])), torch.tensor(sum((s.classes for s in stream.tasks[:t]), [])))
            assert torch.equal(bs1[l][keep], bs0[l][keep]), (t, l)
            # and nobody's weights appear outside owned positions
            assert not ws1[l][m.expand(m.free())].any()


@pytest.mark.parametrize("grow", ["top", "sample"])
def test_budget_kept_and_grown_weights_start_at_zero(make_cfg, grow):
    method, stream = build(make_cfg, *SMALL, f"method.grow={grow}")
    rounds, grown_checked = [], []
    orig = method._rewire

    def rewire(l, t):
        m = method.layers[l]
        before = m.owned_by(t).clone()
        orig(l, t)
        grown = m.owned_by(t) & ~before
        dropped = before & ~m.owned_by(t)
        assert grown.sum() == dropped.sum() > 0
        assert not m.weight[m.expand(grown)].any()  # grown weights are exactly 0 when grown
        assert not m.weight[m.expand(dropped)].any() and (m.owner[dropped] == -1).all()
        grown_checked.append(l)

    method._rewire = rewire

    def check(method, task, epoch):
        counts = [int(m.owned_by(task.id).sum()) for m in method.layers]
        assert counts == [method.budget(l) for l in range(len(method.layers))], (task.id, epoch, counts)
        rounds.append(epoch)

    watch(method, check)
    for task in stream.tasks[:3]:
        method.fit_task(task)
    assert rounds == [0, 1, 2, 3] * 3 and sorted(set(grown_checked)) == [0, 1]  # output layer not rewired
    assert len(grown_checked) == 2 * 3 * 3  # hidden layers x 3 rounds (every epoch but the last) x 3 tasks


def test_no_connection_enters_or_leaves_a_reserved_neuron(make_cfg):
    method, stream = build(make_cfg, *SMALL, "dataset.n_tasks=5")
    L = len(method.layers)

    def check(method, task, epoch):
        t = task.id
        for n in range(1, L):  # hidden neuron layer n: rows of weight layer n-1, columns of layer n
            res = method.layers[n - 1].unit_owner
            for who in res[res >= 0].unique().tolist():
                units = (res == who).nonzero().squeeze(1)
                ins, outs = method.layers[n - 1].owner[units], method.layers[n].owner[:, units]
                assert (ins <= who).all() and (outs <= who).all(), (t, epoch, n, who)  # no later task

    watch(method, check)
    for task in stream.tasks:
        method.fit_task(task)
    for m, spec in zip(method.layers[:-1], (5, 5)):
        assert int((m.unit_owner >= 0).sum()) == spec * 5


def test_reserved_neurons_are_the_most_important_selected(make_cfg):
    method, stream = build(make_cfg, *SMALL)
    method.fit_task(stream.tasks[0])
    for n in (1, 2):
        reserved = method.layers[n - 1].unit_owner == 0
        a = getattr(method, f"imp_{n}")
        sel = method.selected(n)
        assert reserved.sum() == 5 and sel[reserved].all()
        assert a[reserved].min() >= a[sel & ~reserved].max()
    for l in (0, 1):  # the running sums behind the per-step neuron importance match Ω
        torch.testing.assert_close(method.omega_sums[l].row_sum, method.omega(l).sum(1))
    torch.testing.assert_close(method.omega_sums[0].col_sum, method.omega(0).sum(0))


def full_grad(m) -> torch.Tensor:
    """The weight gradient at full size; a leaf-mode layer holds it on its trained block."""
    if m.live is None:
        return m.weight.grad.clone()
    g = torch.zeros_like(m.weight)
    if m.run_in is None:
        g[m.rows] = m.live.grad
    else:
        g[m.rows[:, None], m.run_in[None, :]] = m.live.grad
    return g


def test_restricted_forward_matches_the_full_network(make_cfg):
    method, stream = build(make_cfg, *SMALL)
    method.fit_task(stream.tasks[0])
    task = stream.tasks[1]
    method.begin_task(task)
    x, y = task.train.x[:32], task.train.y[:32]
    grads = []
    sizes = [len(m.run_out) for m in method.layers]
    assert sizes[0] < 60 and sizes[-1] == 2  # only the task's live part runs
    for restricted in (True, False):
        if not restricted:
            method.net.release()
        method.model.zero_grad()
        logits = method.model(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        method.after_backward(task)  # the gradients that train: task-t weights, trainable biases
        grads.append([(full_grad(m), m.bias.grad.clone()) for m in method.layers] + [logits.detach()])
    assert method.layers[0].run_out is None
    for a, b in zip(*grads):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_sparse_layer_ownership_and_capacity():
    conv, out = make_masked(torch.nn.Conv2d(3, 4, 3)), make_masked(torch.nn.Linear(4, 2))
    assert conv.owner.shape == (4, 3) and conv.expand(conv.free()).shape == conv.weight.shape
    conv.owner[0, :2] = 0
    conv.owner[1, 0] = 1
    conv.unit_owner[0] = 0
    out.owner[0, 0] = 1  # task 1 reads task 0's reserved map 0
    cap = MaskedNet(torch.nn.Sequential(conv, out), [conv, out], ["conv1", "out"]).capacity(2, newest=1)
    c = cap["conv1"]
    assert (c["conn_task1"], c["conn_task2"], c["conn_free"], c["conn_used_pct"]) == (2, 1, 9, 25.0)
    assert (c["units_reserved"], c["units_shared"], c["units_free"], c["units_used_pct"]) == (1, 1, 2, 25.0)
    assert (c["units_new"], c["units_reused"]) == (0, 1) and "units_reserved" not in cap["out"]
    assert isinstance(make_masked(torch.nn.Linear(2, 2)), MaskedLinear)


# ------------------------------------------------------------------------------------- variants
def test_static_sparse_never_rewires(make_cfg):
    method, stream = build(make_cfg, *SMALL, method="static_sparse")
    assert not method.hp.rewire
    method._rewire = lambda l, t: pytest.fail("static_sparse rewired")
    first = {}

    def same_as_allocated(method, task, epoch):
        owners = [m.owned_by(task.id).clone() for m in method.layers]
        first.setdefault(task.id, owners)
        assert all(torch.equal(a, b) for a, b in zip(first[task.id], owners))

    watch(method, same_as_allocated)
    for task in stream.tasks[:2]:
        method.fit_task(task)
    assert set(first) == {0, 1}


def test_rehearsal_replays_old_data(make_cfg):
    method, stream = build(make_cfg, *SMALL, "method.memory=30", method="spacenet_rehearsal")
    trained = []
    orig = method.train_epochs

    def train_epochs(task, split, epochs):
        trained.append((task.id, split.y.clone()))
        return orig(task, split, epochs)

    method.train_epochs = train_epochs
    for task in stream.tasks[:3]:
        method.fit_task(task)
    for t, y in trained:  # the task's own data plus 30 stored samples of each old task
        assert len(y) == len(stream.tasks[t].train.y) + 30 * t
        assert method.steps_per_task(stream.tasks[t]) == method.hp.epochs * -(-len(y) // method.hp.batch_size)
        for old in stream.tasks[:t]:
            assert int(torch.isin(y, torch.tensor(old.classes)).sum()) == 30
    assert not method.hp.set_aside and not method.aside.any()


# ------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides,message", [
    (("method.sel=500",), "method.sel=500 exceeds the 400 units of hidden layer 1"),
    (("method.sel=[80,30]", "method.spec=40"), "method.spec=40 exceeds method.sel=30 in hidden layer 2"),
    (("method.sel=40", "method.budget_unit=count", "method.budget=[10000,1640,80]"),
     "method.budget[1]=1640 asks for 1640 connections in weight layer 2 but only 40 x 40 = 1600 positions"),
    (("method.budget=[0.2,1.5,0.5]",), "method.budget[1]=1.5 must be a fraction <= 1"),
    (("method.budget=[0.2,0.3]",), "method.budget has 2 entries but the model has 3 weights layers"),
])
def test_config_errors_are_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("method=spacenet", *overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_release_budget_does_not_fit_the_8x8_digits(make_cfg):
    """10000 input connections need more than 64 inputs x 80 neurons: caught before training starts."""
    with pytest.raises(ConfigError) as e:
        build(make_cfg, "method.budget_unit=count", "method.budget=[10000,1640,80]")
    assert "10000 connections in fc1 but only 64 x 80 = 5120" in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_the_sel_40_error_in_one_line(tmp_path, cli_env):
    p = subprocess.run([cli(), "+experiment=spacenet_split_mnist", "method.sel=40", "tracking=local"],
                       cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "1600 positions" in p.stderr


def test_capacity_error_names_layer_and_task(make_cfg, tmp_path):
    # 2 free neurons are left after two tasks reserve 14 + 14 of 30: task 3 cannot select 15
    with pytest.raises(CapacityError, match=r"task 2: fc1 has 2 free neurons left, fewer than method.sel=15"):
        run(make_cfg("method=spacenet", "model.hidden=[30,30]", "method.sel=15", "method.spec=14",
                     "method.epochs=1"))
    (res,) = (tmp_path / "outputs" / "runs").rglob("results.json")
    r = json.loads(res.read_text())
    assert r["status"] == "failed" and r["tasks_done"] == 2 and len(r["capacity"]) == 2


# ------------------------------------------------------------------------------------- end to end
def test_run_capacity_and_artifacts(make_cfg, tmp_path):
    run(make_cfg("method=spacenet", *SMALL, "method.epochs=2"))
    (res,) = (tmp_path / "outputs" / "runs").rglob("results.json")
    r = json.loads(res.read_text())
    assert r["status"] == "finished" and len(r["capacity"]) == 5
    for t, cap in enumerate(r["capacity"]):
        for name, total, width in (("fc1", 60 * 64, 60), ("fc2", 60 * 60, 60), ("out", 10 * 60, None)):
            c = cap[name]
            assert sum(c[f"conn_task{k}"] for k in range(1, 6)) + c["conn_free"] == total  # conserved
            assert all(c[f"conn_task{k}"] == 0 for k in range(t + 2, 6))
            if width:
                assert c["units_reserved"] + c["units_shared"] + c["units_free"] == width
                assert c["units_reserved"] == 5 * (t + 1)
    art = Path(r["run_dir"]) / "artifacts"
    for name in ("capacity.json", "capacity.png", "spacenet_fig4_activations.png",
                 "spacenet_fig5_connections.png", "spacenet_fig6_input_connections.png"):
        assert (art / name).stat().st_size > 0, name


def test_state_dict_round_trip(make_cfg):
    method, stream = build(make_cfg, *SMALL)
    for task in stream.tasks[:2]:
        method.fit_task(task)
    state = method.state_dict()
    assert {"model.hidden.0.owner", "model.hidden.1.unit_owner", "omega_0", "imp_1", "aside", "task"} <= set(state)
    fresh, _ = build(make_cfg, *SMALL, "seed=5")
    fresh.load_state_dict(state)
    for a, b in zip(method.layers, fresh.layers):
        assert torch.equal(a.owner, b.owner) and torch.equal(a.unit_owner, b.unit_owner)
    x = stream.tasks[0].test.x
    assert torch.equal(method.predict(x), fresh.predict(x))
    fresh.fit_task(stream.tasks[2])  # and it carries on where the original stopped
    assert int(fresh.task) == 2 and fresh.layers[0].owned_by(2).any()


def test_compacts_connections_and_remembers_old_tasks(make_cfg, tmp_path):
    """Faithful behaviour on a tiny stream: drop/grow piles a task's connections onto fewer neurons
    (Fig. 5), and old tasks keep class-IL accuracy where fine-tuning keeps none."""
    tiny = ("method.lr=0.1", "method.epochs=8", "method.batch_size=32", "hardware=cpu")
    method, stream = build(make_cfg, *tiny, "method.budget=0.5")
    method.begin_task(stream.tasks[0])
    used_before = [int(m.owned_by(0).any(1).sum()) for m in method.layers[:2]]
    method.optimizer = method.make_optimizer(method.model.parameters())
    method.train_epochs(stream.tasks[0], stream.tasks[0].train, 8)
    used_after = [int(m.owned_by(0).any(1).sum()) for m in method.layers[:2]]
    assert all(a < 0.8 * b for a, b in zip(used_after, used_before)), (used_before, used_after)

    accs = {}
    for name, extra in (("spacenet", ["method.budget=0.5"]), ("finetune", [])):
        run(make_cfg(f"method={name}", *tiny, *extra), run_dir=tmp_path / name)
        accs[name] = json.loads((tmp_path / name / "results.json").read_text())["acc"][-1]
    old = {k: sum(v[:-1]) / 4 for k, v in accs.items()}
    assert old["finetune"] < 1 and old["spacenet"] > 60, accs


def test_cnn_variant_end_to_end(make_cfg, tmp_path):
    make_cifar10(tmp_path / "data")
    make_cifar100(tmp_path / "data", n_train=300, n_test=100)
    cfg = make_cfg("+experiment=spacenet_cifar10_100", "dataset.n_tasks=3", "model.channels=[4,4,8,8]",
                   "model.hidden=[16]", "method.spec=[1,1,2,2,4]", "method.epochs=2", "method.batch_size=8",
                   "dataset.normalize=unit",  # the fake images have constant channels (std 0)
                   "hardware=cpu")
    method, stream = build(lambda *o: cfg)
    assert [m.weight.dim() for m in method.layers] == [4, 4, 4, 4, 2, 2] and method.net.group[4] == 36
    for task in stream.tasks:
        w0 = effective(method)[0]
        method.fit_task(task)
        w1 = effective(method)[0]
        for l, m in enumerate(method.layers):
            assert torch.equal(w1[l][m.expand(m.frozen(task.id))], w0[l][m.expand(m.frozen(task.id))])
            assert not w1[l][m.expand(m.free())].any()  # kernels are whole: owned or all zero
            assert int(m.owned_by(task.id).sum()) == method.budget(l)
    conv1 = method.layers[0]
    assert conv1.owner.shape == (4, 3) and int((conv1.unit_owner >= 0).sum()) == 3
    run(cfg)
    (res,) = (tmp_path / "outputs" / "runs").rglob("results.json")
    r = json.loads(res.read_text())
    assert r["status"] == "finished" and len(r["acc"]) == 3 and set(r["capacity"][-1]) == {
        "conv1", "conv2", "conv3", "conv4", "fc1", "out"}


# ------------------------------------------------------------------------------------- slow tier
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST at {SHARED_DATA}")
@pytest.mark.parametrize("experiment,lo,hi", [("spacenet_split_mnist", 65, 78), ("static_sparse_split_mnist", 45, 72),
                                              ("spacenet_rehearsal_split_mnist", 85, 99)])
def test_paper_protocols_on_mnist(make_cfg, tmp_path, experiment, lo, hi):
    """Seed 0 of each protocol (10-seed means: `make reproduce-spacenet`)."""
    run(make_cfg(f"+experiment={experiment}", "hardware=cpu", data=SHARED_DATA), run_dir=tmp_path / "run")
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert lo < r["metrics"]["final/avg_acc"] < hi, r["metrics"]
    assert r["capacity"][-1]["fc1"]["conn_task5"] == 10000 and r["capacity"][-1]["fc2"]["units_reserved"] == 200
