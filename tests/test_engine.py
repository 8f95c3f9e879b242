"""The engine end to end on bundled / synthetic data: streams, models, methods, matrices, results."""
import json
import math
from pathlib import Path

import pytest
import torch

from cl_runner.config import validate
from cl_runner.data import build_stream
from cl_runner.evaluate import evaluate_tasks
from cl_runner.registry import METHODS
from cl_runner.train import run

from fakedata import make_cifar10, make_cifar100, make_mnist


def results(tmp_path) -> dict:
    (path,) = (tmp_path / "outputs" / "runs").rglob("results.json")
    return json.loads(path.read_text())


def test_default_run_returns_final_accuracy_and_writes_results(make_cfg, tmp_path):
    acc = run(make_cfg("method=finetune", "method.epochs=2"))
    r = results(tmp_path)
    assert r["schema_version"] == 1 and r["status"] == "finished" and r["tasks_done"] == 5
    assert acc == pytest.approx(r["metrics"]["final/avg_acc"])
    assert len(r["acc"]) == 5 and all(len(row) == 5 for row in r["acc"])
    for i, row in enumerate(r["acc"]):  # NaN (null) exactly for tasks not seen yet
        assert all((v is None) == (j > i) for j, v in enumerate(row))
    assert r["acc_til"][4][4] > 80  # the last task is learned
    assert r["acc"][4][0] < 50  # ...and finetuning forgets class-IL
    art = Path(r["run_dir"]) / "artifacts"
    for name in ("acc_matrix.json", "acc_matrix.csv", "acc_til_matrix.csv", "acc_heatmap.png", "config.yaml"):
        assert (art / name).stat().st_size > 0


def test_same_seed_same_matrices_on_cpu(make_cfg, tmp_path):
    run(make_cfg("seed=3", "method.epochs=1", "hardware=cpu"), run_dir=tmp_path / "a")
    run(make_cfg("seed=3", "method.epochs=1", "hardware=cpu"), run_dir=tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a["acc"] == b["acc"] and a["acc_til"] == b["acc_til"]
    run(make_cfg("seed=4", "method.epochs=1", "hardware=cpu"), run_dir=tmp_path / "c")
    c = json.loads((tmp_path / "c" / "results.json").read_text())
    assert c["acc"] != a["acc"]


def test_joint_has_one_row_over_all_tasks(make_cfg, tmp_path):
    run(make_cfg("method=joint", "method.optimizer=adam", "method.lr=0.001", "method.epochs=5"))
    r = results(tmp_path)
    assert len(r["acc"]) == 1 and None not in r["acc"][0]
    assert r["metrics"]["final/avg_acc"] > 80
    assert r["metrics"]["final/bwt"] is None  # undefined for one row


@pytest.mark.parametrize("name", sorted(METHODS.load_all() or METHODS))
def test_every_registered_method_runs(make_cfg, tmp_path, name):
    """Smoke test for free: each method in the registry with its own default config."""
    # a validation split for the methods that need one (CLNP's threshold scan); unused by the others;
    # DGR's VAE needs pixels in [0, 1]; 30 minibatches for the methods whose default is van de Ven's 2000
    # HAT is task-incremental: a head per task
    extra = {"dgr": ["dataset.normalize=unit"], "dgr_distill": ["dataset.normalize=unit"],
             "hat": ["model.head=multi"],
             "dgm": ["dataset.n_tasks=10", "dataset.normalize=symmetric", "dataset.resize=32"]}.get(name, [])
    assert math.isfinite(run(make_cfg(f"method={name}", "method.epochs=1", "dataset.n_tasks=2",
                                      "dataset.val_fraction=0.2", "++method.steps=30", *extra)))


def test_class_and_task_il_from_one_forward_pass(make_cfg):
    cfg = validate(make_cfg())
    stream = build_stream(cfg, torch.device("cpu"))

    class AlwaysFirstLabel:  # predicts label 0 for every input: right on class 0 only
        device, model = torch.device("cpu"), torch.nn.Identity()

        def predict_pair(self, x, task_id):
            logits = torch.zeros(len(x), stream.n_outputs)
            logits[:, 0] = 1.0
            logits[:, 2::2] = 0.5  # second best: the first label of every later task
            return logits, logits

    acc, acc_til = evaluate_tasks(AlwaysFirstLabel(), stream, [0, 1], [0, 1], 7)
    for j, (a, t) in enumerate(zip(acc, acc_til)):
        y = stream.tasks[j].test.y
        first = stream.tasks[j].classes[0]
        assert a == pytest.approx(100.0 * (y == 0).float().mean().item())  # class-IL: always label 0
        assert t == pytest.approx(100.0 * (y == first).float().mean().item())  # task-IL: first of the task


def test_split_stream_labels_order_and_val(make_cfg, tmp_path):
    make_mnist(tmp_path / "data", n_train=200, n_test=50)
    cfg = validate(make_cfg("dataset=split_mnist", "dataset.class_order=shuffle", "dataset.val_fraction=0.2", "seed=1"))
    stream = build_stream(cfg, torch.device("cpu"))
    assert stream.n_outputs == 10 and [t.classes for t in stream.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    n_train = sum(len(t.train.y) + len(t.val.y) for t in stream.tasks)
    assert n_train == 200 and all(abs(len(t.val.y) / (len(t.val.y) + len(t.train.y)) - 0.2) < 0.05 for t in stream.tasks)
    for t in stream.tasks:
        assert set(t.train.y.tolist()) <= set(t.classes) and set(t.test.y.tolist()) <= set(t.classes)
    assert stream.input_shape == (1, 28, 28)
    # standardised on the training set's statistics
    assert abs(torch.cat([t.train.x for t in stream.tasks]).mean().item()) < 0.2


def test_permuted_stream(make_cfg, tmp_path):
    make_mnist(tmp_path / "data", n_train=40, n_test=20)
    cfg = validate(make_cfg("dataset=permuted_mnist", "dataset.n_tasks=3", "dataset.permute_first=false"))
    s = build_stream(cfg, torch.device("cpu"))
    assert s.n_outputs == 10 and all(t.classes == list(range(10)) for t in s.tasks)
    t0, t1, t2 = s.tasks
    assert torch.equal(t0.train.y, t1.train.y)
    # same pixels, reordered: the sorted values of every image agree, the images do not
    assert torch.equal(t0.train.x.flatten(1).sort(1).values, t1.train.x.flatten(1).sort(1).values)
    assert not torch.equal(t0.train.x, t1.train.x) and not torch.equal(t1.train.x, t2.train.x)
    off = build_stream(validate(make_cfg("dataset=permuted_mnist", "dataset.n_tasks=3", "dataset.label_mode=offset")), "cpu")
    assert off.n_outputs == 30 and off.tasks[2].classes == list(range(20, 30))


def test_cifar10_100_with_multi_head_cnn(make_cfg, tmp_path):
    make_cifar10(tmp_path / "data")
    make_cifar100(tmp_path / "data", n_train=300, n_test=100)
    cfg = make_cfg("method=finetune", "dataset=cifar10_100", "dataset.n_tasks=3", "model=cnn", "model.channels=[4,4,8,8]",
                   "model.hidden=[16]", "method.epochs=1", "method.batch_size=8")
    stream = build_stream(validate(cfg), torch.device("cpu"))
    assert stream.n_outputs == 30 and [t.classes[0] for t in stream.tasks] == [0, 10, 20]
    assert stream.input_shape == (3, 32, 32)
    run(cfg)
    r = results(tmp_path)
    assert r["status"] == "finished" and len(r["acc_til"]) == 3


def test_fwt_reference(make_cfg, tmp_path):
    run(make_cfg("eval.fwt=true", "method.epochs=1"))
    assert math.isfinite(results(tmp_path)["metrics"]["final/fwt_til"])


def nan_from_task_2(monkeypatch) -> None:
    """The training loss of the second task (and after) is NaN."""
    from cl_runner.methods import Method

    loss = Method.loss
    monkeypatch.setattr(Method, "loss", lambda self, logits, y, task: loss(self, logits, y, task)
                        * (float("nan") if task.id >= 1 else 1.0))


def test_a_nonfinite_loss_stops_the_run_keeps_the_finished_task_and_tags_it(make_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cl_runner.errors import TrainingError

    nan_from_task_2(monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TrainingError, match=r"non-finite in task 2/5, epoch 1;"):
        run(make_cfg("method=finetune", "method.epochs=2", "tracking=mlflow", f"mlflow.uri={uri}"))
    r = results(tmp_path)
    assert r["status"] == "failed" and r["tasks_done"] == 1 and r["nonfinite_loss"] == "task 2/5, epoch 1"
    assert r["acc_til"][0][0] > 80 and "non-finite" in r["error"]
    mlrun = MlflowClient(uri).get_run(r["mlflow_run_id"])
    assert mlrun.info.status == "FAILED" and mlrun.data.tags["nonfinite_loss"] == "task 2/5, epoch 1"
    assert mlrun.data.metrics["acc_til/task_1"] == r["acc_til"][0][0]


def test_on_nonfinite_continue_trains_on_and_marks_the_run(make_cfg, tmp_path, monkeypatch):
    nan_from_task_2(monkeypatch)
    run(make_cfg("method=finetune", "method.epochs=1", "on_nonfinite=continue"))
    r = results(tmp_path)
    assert r["status"] == "finished" and r["tasks_done"] == 5 and r["nonfinite_loss"] == "task 2/5, epoch 1"


def test_fit_task_diagnostics_are_logged_as_method_metrics(make_cfg, tmp_path, monkeypatch):
    """What fit_task returns goes to MLflow as method/<name> (step = tasks trained) and into results.json."""
    from mlflow.tracking import MlflowClient

    from cl_runner.methods import Method
    from cl_runner.methods.finetune import Finetune

    monkeypatch.setattr(Finetune, "fit_task", lambda self, task: {**Method.fit_task(self, task), "probe": task.id + 0.5})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run(make_cfg("method=finetune", "method.epochs=1", "tracking=mlflow", f"mlflow.uri={uri}"))
    r = results(tmp_path)
    assert r["method_metrics"] == [{"probe": j + 0.5} for j in range(5)] and r["metrics"]["method/probe"] == 4.5
    hist = MlflowClient(uri).get_metric_history(r["mlflow_run_id"], "method/probe")
    assert sorted((m.step, m.value) for m in hist) == [(j + 1, j + 0.5) for j in range(5)]

    monkeypatch.setattr(Finetune, "fit_task", lambda self, task: 0.5)
    with pytest.raises(TypeError, match="Finetune.fit_task returned float; it must return a dict"):
        run(make_cfg("method=finetune", "method.epochs=1"))
