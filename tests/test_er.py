"""Experience replay: the memory holds memory // (classes seen) random samples per seen class, stored
samples enter the loss with the authors' (1/t, 1 − 1/t) weights, and the memory rides in checkpoints."""
import torch

from cl_runner.config import validate
from cl_runner.data import build_stream
from cl_runner.models import build_model
from cl_runner.registry import METHODS


def build(make_cfg, *overrides):
    cfg = validate(make_cfg("method=er", "method.memory=40", "method.epochs=1", "hardware=cpu", *overrides))
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, torch.device("cpu"))
    return METHODS.get("er")(cfg, build_model(cfg, stream), stream, torch.device("cpu")), stream


def test_memory_is_class_balanced_and_replayed_with_the_authors_weights(make_cfg):
    method, stream = build(make_cfg, "method.active_outputs=seen")
    for t, task in enumerate(stream.tasks[:3]):
        method.fit_task(task)
        kept = method.memory[method.memory[:, 0] >= 0]
        seen = 2 * (t + 1)
        assert all(int((kept[:, 2] == c).sum()) == 40 // seen for c in range(seen))
        labels = torch.stack([stream.tasks[int(j)].train.y[int(i)] for j, i, _ in kept.tolist()])
        assert torch.equal(labels, kept[:, 2])
    task = stream.tasks[3]
    method.begin_task(task)
    x, y = task.train.x[:8], task.train.y[:8]
    gen_state = method.shuffle_gen.get_state()
    total = method.loss(method.model(x), y, task)
    method.shuffle_gen.set_state(gen_state)
    method.replayer.order = None
    xm, ym = method.replayer.next()
    hi = 8  # classes of tasks 0-3 (active_outputs=seen)
    expect = (torch.nn.functional.cross_entropy(method.model(x)[:, :hi], y) / 4
              + 0.75 * torch.nn.functional.cross_entropy(method.model(xm)[:, :hi], ym))
    torch.testing.assert_close(total, expect)


def test_task_incremental_replay_reads_each_stored_samples_own_head(make_cfg):
    method, stream = build(make_cfg, "model.head=multi")
    method.fit_task(stream.tasks[0])
    method.begin_task(stream.tasks[1])
    xm, ym = method.replayer.x, method.replayer.y
    out = method.model(xm)
    own = torch.nn.functional.cross_entropy(out[:, :2], ym)  # task 0's head
    method.replayer.bs = len(ym)
    method.replayer.order = None
    gen_state = method.shuffle_gen.get_state()
    loss = method.loss(method.model(stream.tasks[1].train.x[:4]), stream.tasks[1].train.y[:4], stream.tasks[1])
    method.shuffle_gen.set_state(gen_state)
    cur = torch.nn.functional.cross_entropy(method.model(stream.tasks[1].train.x[:4])[:, 2:4], stream.tasks[1].train.y[:4] - 2)
    torch.testing.assert_close(loss, cur / 2 + own / 2)


def test_memory_round_trips_through_a_checkpoint(make_cfg):
    method, stream = build(make_cfg)
    method.fit_task(stream.tasks[0])
    fresh, _ = build(make_cfg)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.memory, method.memory) and torch.equal(fresh.gen.get_state(), method.gen.get_state())
