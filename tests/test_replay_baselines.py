"""The replay and distillation baselines (lwf, icarl, dgr, dgr_distill) on the bundled digits: their losses
against hand computations of the 2019 code's formulas, iCaRL's herding and exemplar memory, DGR's replayed
labels, and a checkpoint round trip that resumes bit-identically."""
import pytest
import torch
import torch.nn.functional as F

from cl_runner.config import validate
from cl_runner.data import build_stream
from cl_runner.data.memory import herding_order
from cl_runner.methods import overlap
from cl_runner.methods.replay import kd_loss, mix, replayed_loss
from cl_runner.models import build_model
from cl_runner.registry import METHODS
from conftest import assert_trains_alike

UNIT = "dataset.normalize=unit"  # DGR's VAE needs pixels in [0, 1]; the others do not mind


def build(make_cfg, *overrides):
    cfg = validate(make_cfg("model.hidden=[16]", "hardware=cpu", "method.steps=6", "method.batch_size=32", UNIT,
                            *overrides))
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, torch.device("cpu"))
    return METHODS.get(cfg.method.name)(cfg, build_model(cfg, stream), stream, torch.device("cpu")), stream


def test_kd_loss_pads_the_old_models_probabilities_and_scales_by_t_squared():
    scores, old = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.3, -0.2]])
    q = torch.softmax(old / 2, 1)[0]
    log_p = torch.log_softmax(scores / 2, 1)[0]
    hand = -(q[0] * log_p[0] + q[1] * log_p[1]) * 4  # the third class: probability 0 under the old model
    torch.testing.assert_close(kd_loss(scores, old, 2.0), hand)


def test_lwf_loss_is_weighted_ce_plus_distillation_class_il(make_cfg):
    lwf, stream = build(make_cfg, "method=lwf", "method.active_outputs=seen")
    lwf.fit_task(stream.tasks[0])
    old = lwf.previous(stream.tasks[1].train.x[:8])
    assert torch.equal(old, lwf.model(stream.tasks[1].train.x[:8]))  # the copy after task 1
    task, x, y = stream.tasks[1], stream.tasks[1].train.x[:8], stream.tasks[1].train.y[:8]
    with torch.no_grad():
        lwf.model.out.weight.add_(0.1)  # make the current model differ from the previous one
    out = lwf.model(x)[:, :4]  # the classes of tasks 1-2
    hand = F.cross_entropy(out, y) / 2 + kd_loss(out, old[:, :2], 2.0) / 2
    torch.testing.assert_close(lwf.batch_loss(task, x, y), hand)


def test_lwf_task_il_distils_each_previous_tasks_own_units(make_cfg):
    lwf, stream = build(make_cfg, "method=lwf", "model.head=multi", "method.active_outputs=task")
    lwf.fit_task(stream.tasks[0])
    lwf.fit_task(stream.tasks[1])
    task, x, y = stream.tasks[2], stream.tasks[2].train.x[:8], stream.tasks[2].train.y[:8]
    with torch.no_grad():
        lwf.model.out.weight.add_(0.1)
    out, old = lwf.model(x), lwf.previous(x)
    kd = (kd_loss(out[:, 0:2], old[:, 0:2], 2.0) + kd_loss(out[:, 2:4], old[:, 2:4], 2.0)) / 2
    hand = F.cross_entropy(out[:, 4:6], y - 4) / 3 + kd * 2 / 3
    torch.testing.assert_close(lwf.batch_loss(task, x, y), hand)


def _herding_by_the_book(f: torch.Tensor, m: int, mu: torch.Tensor) -> list:
    """The 2019 code's loop (exemplars.py): distances of the running means, the picked row pushed away."""
    f, chosen, picked = f.clone(), [], []
    for k in range(m):
        mean = (f + sum(chosen, torch.zeros_like(mu))) / (k + 1) if k else f
        i = int(torch.norm(mean - mu, dim=1).argmin())
        picked.append(i)
        chosen.append(f[i].clone())
        f[i] += 10000
    return picked


def test_herding_picks_the_known_exemplars():
    # 1-D toy: mean 2; the nearest point first (2.1), then the one that pulls the running mean back (1.0, since
    # (2.1 + 1.0)/2 = 1.55 beats (2.1 + 3.0)/2 = 2.55), then 3.0 ((2.1+1+3)/3 = 2.03), then 5.0 is never needed
    f = torch.tensor([[0.0], [1.0], [2.1], [3.0], [3.9]])
    assert herding_order(f, 3).tolist() == [2, 1, 3]
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(200, 6, generator=g), dim=1)
    mu = F.normalize(f.mean(0), dim=0)
    assert herding_order(f, 40, mu).tolist() == _herding_by_the_book(f, 40, mu)


def test_icarl_memory_per_class_herding_prefix_and_nearest_mean(make_cfg):
    icarl, stream = build(make_cfg, "method=icarl", "method.memory=24")
    icarl.fit_task(stream.tasks[0])
    first = icarl.memory[icarl.memory[:, 0] >= 0].clone()
    assert [int((first[:, 2] == c).sum()) for c in (0, 1)] == [12, 12]
    icarl.fit_task(stream.tasks[1])
    kept = icarl.memory[icarl.memory[:, 0] >= 0]
    assert [int((kept[:, 2] == c).sum()) for c in range(4)] == [6, 6, 6, 6]
    for c in (0, 1):  # an old class keeps the first of its exemplars, in herding order
        assert torch.equal(kept[kept[:, 2] == c], first[first[:, 2] == c][:6])
    # class means: the normalised mean of each class's exemplars' normalised features; predict = nearest mean
    x = torch.cat([stream.tasks[t].train.x[i] for t, i, _ in kept.tolist()]).view(len(kept), -1)
    f = F.normalize(icarl.model.features(x.view(len(kept), *stream.input_shape)), dim=1)
    for c in range(4):
        torch.testing.assert_close(icarl.means[c], F.normalize(f[kept[:, 2] == c].mean(0), dim=0))
    xt = stream.tasks[1].test.x[:10]
    ft = F.normalize(icarl.model.features(xt), dim=1)
    near = torch.stack([(ft - icarl.means[c]).norm(dim=1) for c in range(4)], 1).argmin(1)
    assert torch.equal(icarl.predict(xt)[:, :4].argmax(1), near)


def test_icarl_targets_of_old_classes_are_the_previous_models_sigmoids(make_cfg):
    icarl, stream = build(make_cfg, "method=icarl", "method.memory=24")
    icarl.fit_task(stream.tasks[0])
    with torch.no_grad():
        icarl.model.out.weight.add_(0.1)
    task, x, y = stream.tasks[1], stream.tasks[1].train.x[:8], stream.tasks[1].train.y[:8]
    out = icarl.model(x)[:, :4]
    targets = torch.cat([torch.sigmoid(icarl.previous(x)[:, :2] / 2), F.one_hot(y, 4)[:, 2:].float()], 1)
    hand = F.binary_cross_entropy_with_logits(out, targets, reduction="none").sum(1).mean()
    torch.testing.assert_close(icarl.batch_loss(task, x, y), hand)


def test_icarl_refuses_task_incremental_heads(make_cfg):
    with pytest.raises(Exception, match="class-incremental only"):
        build(make_cfg, "method=icarl", "model.head=multi")


@pytest.mark.parametrize("head", ["single", "multi"])
def test_dgr_replays_generated_inputs_labelled_by_the_previous_model(make_cfg, head):
    extra = ("model.head=multi", "method.active_outputs=task") if head == "multi" else ()
    dgr, stream = build(make_cfg, "method=dgr", *extra)
    gen0 = [p.detach().clone() for p in dgr.generator.parameters()]
    dgr.fit_task(stream.tasks[0])
    assert any(not torch.equal(a, b) for a, b in zip(gen0, dgr.generator.parameters()))  # the VAE trained
    task, x, y = stream.tasks[1], stream.tasks[1].train.x[:8], stream.tasks[1].train.y[:8]
    with torch.no_grad():
        dgr.model.out.weight.add_(0.1)
    state = torch.get_rng_state()
    xr = dgr.previous_generator.net.sample(8)  # what the step draws first
    assert xr.min() >= 0 and xr.max() <= 1
    out, old = dgr.model(xr), dgr.previous(xr)
    lo = 0 if head == "single" else 2
    cur = F.cross_entropy(dgr.model(x)[:, lo:4], y - lo)
    hand = cur / 2 + F.cross_entropy(out[:, :(4 if head == "single" else 2)], old[:, :2].argmax(1)) / 2
    torch.set_rng_state(state)
    torch.testing.assert_close(dgr.step(task, x, y), hand.detach())


def fused_dgr_step(dgr, task, x, y):
    """DGR's step as one backward pass per network (the 2019 code's order, and this package's before the
    halves): the reference the split step must match bit for bit."""
    xr = dgr.previous_generator.net.sample(len(x)) if task.id else None
    current = dgr.loss(dgr.model(x), y, task)
    loss = current if xr is None else mix(current, replayed_loss(
        dgr, dgr.model(xr), dgr.previous(xr), task, dgr.hp.targets, dgr.hp.temperature), task, dgr.hp)
    dgr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dgr.optimizer.step()
    gen_loss = dgr.generator.loss(x)
    if xr is not None:
        gen_loss = mix(gen_loss, dgr.generator.loss(xr), task, dgr.hp)
    dgr.gen_optimizer.zero_grad(set_to_none=True)
    gen_loss.backward()
    dgr.gen_optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("name,extra", [("dgr", ()), ("dgr_distill", ()), ("dgr", ("model.head=multi",)),
                                        ("dgr", ("method.weighting=sum", "method.replay_lambda=0.7"))])
def test_dgr_split_step_has_the_bits_of_one_backward_pass_on_one_thread_or_two(make_cfg, name, extra):
    """The step's halves, their gradients summed, on two threads (hardware.overlap=always) or one (never), train
    three tasks to exactly the parameters, buffers and Adam moments of one backward pass per network."""
    runs = {}
    for mode in ("fused", "always", "never"):
        dgr, stream = build(make_cfg, f"method={name}", f"hardware.overlap={'never' if mode == 'fused' else mode}",
                            *extra)
        if mode == "fused":
            dgr.step = lambda task, x, y, d=dgr: fused_dgr_step(d, task, x, y)
        for task in stream.tasks[:3]:
            dgr.fit_task(task)
        assert dgr._overlap is (mode == "always") or mode == "fused"
        runs[mode] = dgr
    ref = runs["fused"].state_dict()
    for mode in ("always", "never"):
        for k, v in runs[mode].state_dict().items():
            if torch.is_tensor(v):
                assert torch.equal(v, ref[k]), (mode, k)
        moments = [s["exp_avg_sq"] for s in runs[mode].gen_optimizer.state.values()]
        assert all(torch.equal(a, b) for a, b in
                   zip(moments, [s["exp_avg_sq"] for s in runs["fused"].gen_optimizer.state.values()]))


def test_overlap_stays_off_where_threads_would_change_the_bits(make_cfg):
    """Dropout draws random numbers and BatchNorm updates statistics in the forward pass: `always` then runs
    the halves one after the other."""
    dgr, stream = build(make_cfg, "method=dgr", "hardware.overlap=always", "model.dropout=0.2")
    dgr.fit_task(stream.tasks[0])
    assert dgr._overlap is False
    assert overlap.safe(torch.nn.Linear(2, 2)) and not overlap.safe(torch.nn.BatchNorm1d(2))


@pytest.mark.parametrize("name", ["lwf", "icarl", "dgr", "dgr_distill"])
def test_state_round_trip_resumes_bit_identically(make_cfg, name):
    """After task 1 a fresh method loaded with the state_dict (the previous model, exemplars, the VAE and its kept
    Adam) and the global RNG trains task 2 to exactly the parameters of the method that went on."""
    a, stream = build(make_cfg, f"method={name}")
    a.fit_task(stream.tasks[0])
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in a.state_dict().items()}
    rng = torch.get_rng_state()
    b, _ = build(make_cfg, f"method={name}", "seed=5")  # other initial weights, all overwritten by the state
    b.load_state_dict(state)
    assert any(k.startswith("previous.") for k in state)
    torch.set_rng_state(rng)
    assert_trains_alike(a, b, stream.tasks[1])


def test_overlap_auto_takes_a_core_only_when_one_is_idle(monkeypatch):
    from cl_runner import launch

    net, cpu = torch.nn.Linear(2, 2), torch.device("cpu")
    monkeypatch.setattr(launch, "cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(launch, "_plan", (None, 1))
    assert overlap.wanted("auto", cpu, net)  # a lone job on 2 cores with 1 thread
    assert not overlap.wanted("auto", torch.device("cuda"), net)
    assert not overlap.wanted("never", cpu, net)
    monkeypatch.setattr(launch, "_plan", (1, 2))  # two sweep jobs share the 2 cores
    assert not overlap.wanted("auto", cpu, net) and overlap.wanted("always", cpu, net)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(launch, "_plan", (None, 1))  # one job already on both cores
    assert not overlap.wanted("auto", cpu, net)
