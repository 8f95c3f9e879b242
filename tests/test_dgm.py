"""DGM (dgmw / dgma) on the bundled digits resized to 32x32: old classes' generator outputs survive later tasks,
dynamic expansion keeps each layer's free capacity, grown state round-trips through a checkpoint, config checks."""
import pytest
import torch

from cl_runner.config import validate
from cl_runner.data import build_stream
from cl_runner.errors import ConfigError
from cl_runner.models import build_model
from cl_runner.registry import METHODS
from conftest import assert_trains_alike

DGM = ("dataset.n_tasks=10", "dataset.normalize=symmetric", "dataset.resize=32", "dataset.val_fraction=0.15",
       "hardware=cpu", "method.epochs=2", "method.batch_size=32", "method.val_every=1",
       "method.nz=32", "method.ngf=4", "method.ndf=8")  # a small GAN: the invariants do not depend on its size


def build(make_cfg, variant="dgmw", *overrides):
    cfg = validate(make_cfg(f"method={variant}", *DGM, *overrides))
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, torch.device("cpu"))
    return METHODS.get("dgm")(cfg, build_model(cfg, stream), stream, torch.device("cpu")), stream


@torch.no_grad()
def samples(dgm, task_id: int) -> torch.Tensor:
    G = dgm.generator
    G.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        lab = torch.full((16,), dgm.stream.tasks[task_id].classes[0])
        out = G(G.noise(lab), task_id, int(lab[0]), dgm.hp.s_max, binary=True)[0]
    G.train()
    return out


@pytest.mark.parametrize("variant", ["dgmw", "dgma"])
def test_old_classes_images_unchanged_after_later_tasks(make_cfg, variant):
    dgm, stream = build(make_cfg, variant)
    dgm.fit_task(stream.tasks[0])
    first = samples(dgm, 0)
    for t in (1, 2):
        dgm.fit_task(stream.tasks[t])
    assert dgm.growth[0]["added"] != [0, 0, 0]  # the generator grew in between
    torch.testing.assert_close(samples(dgm, 0), first, atol=1e-6, rtol=0)


def test_reserved_weights_stay_bit_identical(make_cfg):
    dgm, stream = build(make_cfg)
    dgm.fit_task(stream.tasks[0])
    G = dgm.generator
    held = [(c.weight.detach().clone(), r.clone().bool()) for c, r in zip(G.convs, G.reserved)]
    dgm.fit_task(stream.tasks[1])
    for (w, r), c in zip(held, G.convs):
        now = c.weight.detach()[:w.shape[0], :w.shape[1]]
        assert r.any() and torch.equal(now[r[:w.shape[0], :w.shape[1]]], w[r])


@pytest.mark.parametrize("variant", ["dgmw", "dgma"])
def test_expansion_keeps_each_layers_free_capacity(make_cfg, variant):
    dgm, stream = build(make_cfg, variant)
    G = dgm.generator
    free0 = [r.numel() - int(r.sum()) for r in G.reserved]
    for task in stream.tasks[:3]:
        before = [c.weight.shape[:2] for c in G.convs]
        dgm.fit_task(task)
        free = [r.numel() - int(r.sum()) for r in G.reserved]
        add = dgm.growth[-1]["added"]
        for l, (f, f0) in enumerate(zip(free, free0)):
            assert f >= f0, (l, f, f0)  # never less free than at the start
            if variant == "dgma":
                assert f == f0  # DGMa: exactly as many channels as were reserved
            elif add[l] > 0:  # DGMw: less than one more output channel's weights over
                c_in, k = G.convs[l].weight.shape[0], G.convs[l].weight.shape[2]
                assert f - f0 < c_in * k * k
        assert [list(c.weight.shape[:2]) for c in G.convs] == [
            [b[0] + (add[l - 1] if l else 0), b[1] + add[l]] for l, b in enumerate(before)]
        free0 = free


def test_checkpoint_round_trip_resumes_bit_identically(make_cfg):
    a, stream = build(make_cfg, "dgma")
    for t in (0, 1):
        a.fit_task(stream.tasks[t])
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in a.state_dict().items()}
    rng = torch.get_rng_state()
    b, _ = build(make_cfg, "dgma", "seed=5")
    b.load_state_dict(state)
    assert [c.weight.shape for c in a.generator.convs] == [c.weight.shape for c in b.generator.convs]
    torch.testing.assert_close(samples(b, 1), samples(a, 1), atol=0, rtol=0)
    x = stream.tasks[0].test.x[:20]
    assert torch.equal(a.predict(x), b.predict(x))
    torch.set_rng_state(rng)
    assert_trains_alike(a, b, stream.tasks[2])


@pytest.mark.parametrize("bad, message", [("dataset.normalize=unit", "normalize=symmetric"),
                                          ("dataset.val_fraction=0", "val_fraction"),
                                          ("dataset.n_tasks=5", "one class per task")])
def test_config_errors_are_one_line(make_cfg, bad, message):
    with pytest.raises(ConfigError, match=message):
        build(make_cfg, "dgmw", bad)


def test_killed_run_resumes_to_the_uninterrupted_matrices(tmp_path):
    """SIGKILL inside task 4 of a DGM run (grown generator, per-task BatchNorms, a wider discriminator), then
    resume=true: the same class-IL matrix as a run never killed."""
    import json
    import subprocess
    from pathlib import Path

    from conftest import cli
    from test_resume import cl_run, env_for, kill_after, results

    args = ["method=dgma", *DGM, "method.epochs=3", "seed=2", "progress=off", "hardware.threads=1", "tracking=local"]
    ref_out = tmp_path / "ref" / "outputs"
    ref_out.parent.mkdir()
    cl_run(ref_out, *args)
    (ref,) = results(ref_out)
    out = tmp_path / "crash" / "outputs"
    out.parent.mkdir()
    proc = subprocess.Popen([cli(), *args], cwd=out.parent, env=env_for(out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = kill_after(proc, out, 3)
    assert killed["status"] == "running" and 3 <= killed["tasks_done"] < 10
    cl_run(out, *args, "resume=true")
    final = json.loads((Path(killed["run_dir"]) / "results.json").read_text())
    assert final["status"] == "finished" and final["acc"] == ref["acc"] and final["capacity"] == ref["capacity"]


def test_a_nonfinite_loss_reaches_the_runs_policy(make_cfg, monkeypatch):
    """Each epoch's summed GAN losses are checked once (on_nonfinite: fail the run, or mark it and go on)."""
    dgm, stream = build(make_cfg)
    calls = []
    dgm.on_nonfinite = lambda task, epoch: calls.append((task.id, epoch))
    dgm.fit_task(stream.tasks[0])
    assert calls == []
    critic = type(dgm)._critic_step
    monkeypatch.setattr(type(dgm), "_critic_step", lambda self, *a: critic(self, *a) * float("nan"))
    dgm.fit_task(stream.tasks[1])
    assert calls == [(1, 0), (1, 1)]  # both epochs of the second task
