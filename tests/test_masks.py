"""The one mask mechanism (models/masks.py, masked_net.py, units.py) on its own: exact freezing under
every optimizer, soft (float) gradient scales, the compact path, BlockSum, unit hooks and growth."""
import pytest
import torch
from torch import nn

from cl_runner.models.masked_net import Block, BlockSum, MaskedNet, PlainSGD
from cl_runner.models.masks import CUT, FREE, make_masked
from cl_runner.models.units import UnitHooks


def mlp(seed=0, widths=(6, 8, 8, 3)):
    torch.manual_seed(seed)
    layers = [make_masked(nn.Linear(a, b)) for a, b in zip(widths[:-1], widths[1:])]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    return model, layers, MaskedNet(model, layers, ["fc1", "fc2", "out"])


def own_half(layers, t=0):
    """Task t owns a random half of every layer's connections; the rest are FREE and hold exact zeros."""
    g = torch.Generator().manual_seed(1)
    for m in layers:
        m.owner[torch.rand(m.owner.shape, generator=g) < 0.5] = t
        m.weight.data[m.free()] = 0.0


OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1),
              "momentum+decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
              "adam+decay": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)}


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("compact", [False, True])
def test_frozen_entries_bit_identical_under_every_optimizer(opt, compact):
    model, layers, net = mlp()
    own_half(layers, 0)
    for m in layers:  # task 1 owns the other half
        m.owner[m.owner == FREE] = 1
    before = [m.weight.detach().clone() for m in layers]
    frozen_bias = [torch.arange(len(m.bias)) % 2 == 0 for m in layers]
    net.train_only([m.owned_by(1) for m in layers], [~f for f in frozen_bias], hold=opt != "sgd",
                   live_out=torch.ones(3, dtype=torch.bool) if compact else None)
    bias0 = [m.bias.detach().clone() for m in layers]
    optimizer = OPTIMIZERS[opt](net.params())
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        net.mask_grads()
        optimizer.step()
        net.restore()
    net.end_phase()
    for m, w0, b0, fb in zip(layers, before, bias0, frozen_bias):
        frozen = m.frozen(1)
        assert torch.equal(m.weight[frozen], w0[frozen])  # bit-identical
        assert not torch.equal(m.weight[m.owned_by(1)], w0[m.owned_by(1)])  # the task's own weights learned
        assert torch.equal(m.bias[fb], b0[fb])
    assert all(p.requires_grad for p in model.parameters())  # end_phase gives every gradient back


def test_compact_leaf_path_matches_the_full_network():
    """The compact path (only the live part runs, trained rows as leaf blocks) gives the full network's
    loss and masked gradients; PlainSGD then steps exactly the trained entries."""
    grads = {}
    for compact in (False, True):
        model, layers, net = mlp()
        own_half(layers, 0)
        masks = [m.owned_by(0) for m in layers]
        net.train_only(masks, [torch.ones_like(m.bias, dtype=torch.bool) for m in layers], hold=False,
                       live_out=torch.ones(3, dtype=torch.bool) if compact else None, leaf=compact)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        net.mask_grads()
        full = []
        for l, m in enumerate(layers):
            b = net.block(l)
            g = torch.zeros_like(m.weight)
            if b.cols is None:
                g[b.rows] = b.grad
            else:
                g[b.rows[:, None], b.cols[None, :]] = b.grad
            full.append(g)
        PlainSGD(net.params, 0.5).step()
        net.end_phase()
        grads[compact] = (loss.detach(), full, [m.weight.detach().clone() for m in layers])
    (l0, g0, w0), (l1, g1, w1) = grads[False], grads[True]
    torch.testing.assert_close(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(a, b)


def test_float_masks_scale_gradients_without_restoring():
    """HAT-style soft plasticity: a float mask multiplies the gradient; nothing is put back."""
    model, layers, net = mlp()
    scale = [torch.full(m.owner.shape, 0.25) for m in layers]
    net.train_only(scale, [None] * 3, hold=True)
    model(torch.randn(4, 6)).sum().backward()
    raw = [m.weight.grad.clone() for m in layers]
    net.mask_grads()
    for m, g in zip(layers, raw):
        torch.testing.assert_close(m.weight.grad, 0.25 * g)
    assert all(held is None for *_, held in net.entries)


def test_block_sum_matches_dense_accumulation():
    buf = torch.zeros(5, 4)
    acc = BlockSum(buf, track_rows=True, track_cols=True)
    dense = torch.zeros(5, 4)
    rows, cols = torch.tensor([0, 3]), torch.tensor([1, 2])
    for _ in range(3):
        inc = torch.rand(2, 2)
        acc.add(Block(rows, cols, inc), inc.clone())
        dense[rows[:, None], cols[None, :]] += inc
        torch.testing.assert_close(acc.row_sum, dense.sum(1))
        torch.testing.assert_close(acc.col_sum, dense.sum(0))
    torch.testing.assert_close(acc.value(), dense)
    assert acc.value() is buf


def test_unit_hooks_gate_and_measure_activity():
    model, layers, net = mlp()
    hooks = UnitHooks(layers[:2], [None, None])
    x = torch.randn(10, 6)
    act = hooks.mean_activity(lambda: model(x))
    torch.testing.assert_close(act[0], torch.relu(layers[0](x)).mean(0))
    hooks.gates[0] = torch.zeros(8)
    gated = model(x)
    hooks.clear()
    torch.testing.assert_close(gated, layers[2](torch.relu(layers[1](torch.zeros(10, 8)))))


def test_growth_adds_free_units_that_old_units_never_see():
    """DGM's dynamic expansion: a layer gains output units, the next layer input columns; old outputs are
    unchanged, the new units and connections are FREE, and capacity counts the new width."""
    model, layers, net = mlp()
    own_half(layers, 0)
    x = torch.randn(7, 6)
    y0 = model(x).detach()
    layers[0].grow_out(4, init=nn.init.normal_)
    layers[1].grow_in(4)
    assert layers[0].weight.shape == (12, 6) and layers[1].weight.shape == (8, 12) and layers[0].out_features == 12
    assert (layers[0].unit_owner[8:] == FREE).all() and (layers[1].owner[:, 8:] == FREE).all()
    torch.testing.assert_close(model(x), y0)  # the new columns hold exact zeros
    cap = MaskedNet(model, layers, ["fc1", "fc2", "out"]).capacity(1, newest=0)
    assert cap["fc1"]["units_free"] + cap["fc1"]["units_shared"] + cap["fc1"]["units_reserved"] == 12
    assert cap["fc1"]["conn_task1"] + cap["fc1"]["conn_free"] == 72


def test_cut_connections_count_apart_and_unit_states():
    _, layers, net = mlp()
    layers[0].owner[0, :3] = CUT
    layers[0].owner[1, :] = 0
    layers[0].unit_owner[1] = 0
    cap = net.capacity(2, newest=0)["fc1"]
    assert (cap["conn_cut"], cap["conn_task1"], cap["conn_free"]) == (3, 6, 48 - 9)
    assert cap["units_reserved"] == 1 and cap["units_new"] == 1
    assert layers[0].held(1)[0, :3].all() and not layers[0].frozen(1)[0, :3].any()
