"""The quadratic-penalty baselines (ewc, online_ewc, si, mas) and the standard loop's van de Ven & Tolias keys
(method.steps, active_outputs, reset_optimizer), on the bundled digits."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_runner.config import validate
from cl_runner.data import Split, Task, build_stream
from cl_runner.methods.penalty import per_sample_sum
from cl_runner.models import build_model
from cl_runner.registry import METHODS

PENALTIES = ("ewc", "online_ewc", "si", "mas")


def build(make_cfg, *overrides):
    cfg = validate(make_cfg("model.hidden=[16]", "hardware=cpu", *overrides))
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, torch.device("cpu"))
    return METHODS.get(cfg.method.name)(cfg, build_model(cfg, stream), stream, torch.device("cpu")), stream


def small(task, n: int) -> Task:
    return Task(task.id, task.classes, Split(task.train.x[:n], task.train.y[:n]), None, task.test)


def params(method) -> list:
    return [p.detach().clone() for p in method.model.parameters()]


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_lambda_f_delta(make_cfg):
    ewc, _ = build(make_cfg, "method=ewc", "method.lam=3.0")
    ps = list(ewc.model.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # two tasks' (F_t, θ*_t): the first at the current parameters
        for t in range(2):
            for f, a, p in zip(ewc.fisher.list(), ewc.anchor.list(), ps):
                f[t] = torch.rand(p.shape, generator=g)
                a[t] = p if t == 0 else p + torch.randn(p.shape, generator=g)
        ewc.fold(1)
    assert ewc.penalty().item() == 0.0  # exactly, at θ = θ*_1

    with torch.no_grad():
        for p in ps:
            p.add_(torch.randn(p.shape, generator=g))
    for n in (1, 2):
        with torch.no_grad():
            ewc.fold(n)
        for p in ps:
            p.grad = None
        (ewc.strength * ewc.penalty()).backward()
        want = [3.0 * sum(f[t] * (p - a[t]) for t in range(n)).detach()
                for f, a, p in zip(ewc.fisher.list(), ewc.anchor.list(), ps)]
        for p, w in zip(ps, want):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-5)
        direct = sum((f[t] * (p - a[t]) ** 2).sum() for t in range(n)
                     for f, a, p in zip(ewc.fisher.list(), ewc.anchor.list(), ps))
        torch.testing.assert_close(ewc.penalty(), direct, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("setting", [("model.head=single", "method.active_outputs=seen"),
                                     ("model.head=multi", "method.active_outputs=task"),
                                     ("model.head=single", "method.active_outputs=all")])
def test_vectorised_fisher_equals_a_per_sample_loop(make_cfg, setting):
    """Both vectorised paths: torch.func (vmap of grad) and the nn.Linear shortcut the MLP takes."""
    ewc, stream = build(make_cfg, "method=ewc", *setting)
    task = small(stream.tasks[1], 23)
    got = ewc.fisher_diag(task)  # the MLP's nn.Linear shortcut
    nll = lambda active: F.cross_entropy(active, active.argmax(1), reduction="none")  # noqa: E731
    with torch.no_grad():
        func = per_sample_sum(ewc, task, task.train.x, nll, torch.square, chunk=10, func=True)  # torch.func
    want = [torch.zeros_like(p) for p in ewc.model.parameters()]
    ewc.model.eval()
    for i in range(23):  # the 2019 code: batches of one, the model's own label over the active classes
        ewc.model.zero_grad()
        active, _ = ewc.active(ewc.model(task.train.x[i:i + 1]), task)
        F.cross_entropy(active, active.argmax(1)).backward()
        for w, p in zip(want, ewc.model.parameters()):
            w += p.grad ** 2
    for g, f, w in zip(got, func, want):
        torch.testing.assert_close(g, w / 22, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(f, w, rtol=1e-4, atol=1e-7)


def test_mas_importance_equals_a_per_sample_loop(make_cfg):
    mas, stream = build(make_cfg, "method=mas", "method.active_outputs=seen")
    task = small(stream.tasks[1], 17)
    with torch.no_grad():
        mas.consolidate(task)
        func = per_sample_sum(mas, task, task.train.x, lambda out: (out ** 2).sum(1), torch.abs, func=True)
    want = [torch.zeros_like(p) for p in mas.model.parameters()]
    for i in range(17):
        mas.model.zero_grad()
        (mas.active(mas.model(task.train.x[i:i + 1]), task)[0] ** 2).sum().backward()
        for w, p in zip(want, mas.model.parameters()):
            w += p.grad.abs()
    for omega, f, w in zip(mas.prec.list(), func, want):
        torch.testing.assert_close(omega, w / 17, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(f, w, rtol=1e-4, atol=1e-7)
    for centre, p in zip(mas.centre.list(), mas.model.parameters()):
        assert torch.equal(centre, p.detach())


def test_si_importance_is_the_hand_computed_path_integral_of_two_steps(make_cfg):
    """Plain SGD: Δθ_s = −lr g_s, so W = lr Σ_s g_s² and Ω = W / ((Σ_s lr g_s)² + ξ), g_s the gradient of the
    total loss (surrogate included) at step s."""
    lr, xi = 0.1, 0.1
    si, stream = build(make_cfg, "method=si", "method.optimizer=sgd", f"method.lr={lr}", "method.steps=2",
                       "method.batch_size=16", "method.c=2.0", f"method.xi={xi}")
    omega_before = None
    for task in stream.tasks[:2]:
        grads = []
        si.on_step = lambda: grads.append([p.grad.clone() for p in si.params])
        start = params(si)
        omega_before = [o.clone() for o in si.prec.list()]
        si.fit_task(task)
        assert len(grads) == 2
        for j, (o0, o, p0, p) in enumerate(zip(omega_before, si.prec.list(), start, si.params)):
            w = lr * (grads[0][j] ** 2 + grads[1][j] ** 2)
            torch.testing.assert_close(p.detach() - p0, -lr * (grads[0][j] + grads[1][j]))
            torch.testing.assert_close(o, o0 + w / ((lr * (grads[0][j] + grads[1][j])) ** 2 + xi), rtol=1e-4, atol=1e-8)
    # the steps' gradient is the total loss's: away from θ* the surrogate c Σ Ω (θ − θ*)² adds 2cΩ(θ − θ*)
    from cl_runner.methods import Method

    x, y, task = stream.tasks[1].train.x[:16], stream.tasks[1].train.y[:16], stream.tasks[1]
    with torch.no_grad():
        for p in si.params:
            p.add_(0.01 * torch.randn_like(p))
    si.begin_task(task)
    si.model.zero_grad()
    si.loss(si.model(x), y, task).backward()
    total = [p.grad.clone() for p in si.params]
    si.model.zero_grad()
    Method.loss(si, si.model(x), y, task).backward()
    for t, p, o, c in zip(total, si.params, si.prec.list(), si.centre.list()):
        torch.testing.assert_close(t, p.grad + 2 * 2.0 * o * (p - c).detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", PENALTIES)
def test_state_round_trip_resumes_bit_identically(make_cfg, name):
    """After task 1 a fresh method loaded with the state_dict (buffers, RNG, the kept Adam) trains task 2 to
    exactly the parameters of the method that went on."""
    over = (f"method={name}", "method.steps=7", "method.batch_size=32", "method.reset_optimizer=false")
    a, stream = build(make_cfg, *over)
    a.fit_task(stream.tasks[0])
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in a.state_dict().items()}
    b, _ = build(make_cfg, *over, "seed=5")  # other initial weights, all overwritten by the state
    b.load_state_dict(state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if torch.is_tensor(va):
            assert torch.equal(va, vb), k
    assert any(k.startswith(("prec.", "fisher.")) for k in state)
    a.fit_task(stream.tasks[1])
    b.fit_task(stream.tasks[1])
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    for ba, bb in zip(a.buffers(), b.buffers()):
        assert torch.equal(ba, bb)


@pytest.mark.parametrize("reset", [True, False])
def test_method_steps_gives_exactly_that_many_optimizer_steps(make_cfg, reset):
    fine, stream = build(make_cfg, "method=finetune", "method.optimizer=adam", "method.steps=37",
                         "method.batch_size=64", f"method.reset_optimizer={reset}")
    n_train = len(stream.tasks[0].train.y)
    assert 37 * 64 > 2 * n_train  # several passes, each reshuffled
    calls = []
    fine.on_step = lambda: calls.append(1)
    for t, task in enumerate(stream.tasks[:2]):
        assert fine.steps_per_task(task) == 37
        fine.fit_task(task)
        adam_steps = {int(s["step"]) for s in fine.optimizer.state.values()}
        assert adam_steps == {37 if reset else 37 * (t + 1)}
    assert len(calls) == 74


def test_active_outputs_choose_the_trained_units(make_cfg):
    logits = torch.randn(4, 10)
    for active, want in (("all", (0, 10)), ("seen", (0, 6)), ("task", (4, 6))):
        m, stream = build(make_cfg, "method=finetune", f"method.active_outputs={active}")
        out, lo = m.active(logits, stream.tasks[2])
        assert lo == want[0] and torch.equal(out, logits[:, want[0]:want[1]])


def test_vdv_class_order(make_cfg):
    from cl_runner.data import _class_order

    assert _class_order(validate(make_cfg("dataset.class_order=vdv", "seed=0")), 10) == list(range(10))
    p = np.random.RandomState(3).permutation(10)  # the 2019 code: digit c gets label p[c]
    order = _class_order(validate(make_cfg("dataset.class_order=vdv", "seed=3")), 10)
    assert [int(p[c]) for c in order] == list(range(10))


@pytest.mark.parametrize("exp, scenario", [("vdv_split_mnist", "class"), ("vdv_split_mnist_til", "task"),
                                           ("vdv_split_fmnist", "class")])
def test_vdv_experiments_give_each_method_its_scenario_values(make_cfg, exp, scenario):
    want = {"class": {"ewc": {"lam": 1e8}, "online_ewc": {"lam": 1e9, "gamma": 0.8}, "si": {"c": 0.5, "xi": 0.1}},
            "task": {"ewc": {"lam": 1e7}, "online_ewc": {"lam": 1e8, "gamma": 0.8}, "si": {"c": 50.0, "xi": 0.1}}}
    for m in ("finetune", "joint", "ewc", "online_ewc", "si", "mas"):
        cfg = validate(make_cfg(f"method={m}", f"+experiment={exp}"))
        assert (cfg.method.optimizer, cfg.method.lr, cfg.method.batch_size) == ("adam", 0.001, 128)
        assert cfg.method.steps == (10000 if m == "joint" else 2000) and cfg.method.reset_optimizer is False
        assert cfg.method.active_outputs == ("seen" if scenario == "class" else "task")
        assert cfg.model.head == ("single" if scenario == "class" else "multi") and list(cfg.model.hidden) == [400, 400]
        assert cfg.dataset.normalize == "unit" and cfg.dataset.class_order == "vdv"
        assert {k: cfg.method[k] for k in want[scenario].get(m, {})} == want[scenario].get(m, {})
    assert validate(make_cfg("method=ewc", f"+experiment={exp}", "method.lam=5")).method.lam == 5  # the command line wins
    plain = make_cfg("method=ewc")
    assert plain.method.lam == 1e8 and plain.dataset.normalize == "standard" and "protocol" not in plain
