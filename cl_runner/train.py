"""The engine: config → validate → task stream on the device → model → method → train/evaluate per task.

`run(cfg)` is what `cl-run` calls (and what tests and sweepers call directly); it returns the final
class-IL average accuracy. It reads top to bottom: setup, then per task train / evaluate / checkpoint /
log, then finish. The engine knows nothing of a method's internals (a method's own figures come back from
`fit_task` as a dict), a method nothing of tracking.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import checkpoint, launch, plots
from .checkpoint import Checkpoint
from .console import Progress, print_summary
from .config import validate
from .data import Split, Task, build_stream
from .data.describe import describe
from .errors import ConfigError, TrainingError, UserError
from .evaluate import evaluate_tasks, forward_transfer, summary
from .identity import config_hash
from .models import build_model
from .registry import METHODS
from .tracking import mlflow_store, names
from .tracking.results import make_folder, new_record, write_json_atomic
from .tracking.summary import tasks_csv
from .tracking.trackers import LocalTracker, MlflowTracker

log = logging.getLogger("cl_runner")


def setup_hardware(h) -> torch.device:
    if h.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device=cuda but torch sees no CUDA device (use hardware=auto or cpu)")
    use_cuda = h.device == "cuda" or (h.device == "auto" and torch.cuda.is_available())
    torch.set_float32_matmul_precision(h.matmul_precision)
    if h.deterministic:
        if use_cuda:  # cuBLAS needs a fixed workspace for reproducible results; set before CUDA starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda" if use_cuda else "cpu")


def set_threads(h, model: nn.Module, stream, batch_size: int) -> None:
    """hardware.threads wins; then parallel jobs' share of the cores; then a lone job's default, which
    depends on how wide a training step is (launch.default_threads)."""
    threads = h.threads or launch.planned_threads()
    if not threads:
        threads = launch.default_threads(step_macs(model, stream.input_shape, batch_size))
    if threads:
        torch.set_num_threads(threads)
    launch.log_threads(torch.get_num_threads())


@torch.no_grad()
def step_macs(model: nn.Module, input_shape: tuple, batch_size: int) -> int:
    """Multiply-adds of one forward pass over a minibatch through the Linear and Conv2d layers (one sample
    measured with forward hooks, times the batch)."""
    total = 0

    def hook(mod, inputs, out):
        nonlocal total
        k = mod.in_features if isinstance(mod, nn.Linear) else mod.weight[0].numel()
        total += out.numel() * k

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was = model.training
    try:
        model.eval()
        p = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for hd in handles:
            hd.remove()
    return total * batch_size


def joint_task(stream) -> Task:
    """All tasks' training data as one task (for `trains_jointly` methods)."""
    cat = lambda parts: Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))  # noqa: E731
    classes = sorted({c for t in stream.tasks for c in t.classes})
    vals = [t.val for t in stream.tasks if t.val is not None]
    return Task(0, classes, cat([t.train for t in stream.tasks]), cat(vals) if vals else None,
                cat([t.test for t in stream.tasks]))


def hydra_info() -> tuple[Path | None, dict]:
    """Run folder, config-group choices, overrides and sweep parent from Hydra (if Hydra is running)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, {}
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    info = {"choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
            "overrides": list(hc.overrides.task), "entry_point": "cl-run -m" if multirun else "cl-run"}
    parent = Path(hc.sweep.dir) / "mlflow_parent.json"
    if multirun and parent.exists():
        sweep = json.loads(parent.read_text())
        info["parent_run_id"], info["swept"] = sweep["run_id"], sweep.get("swept", [])
    return Path(hc.runtime.output_dir), info


def run(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train the task sequence `cfg` describes, evaluating every task seen after each one; returns the final
    class-IL average accuracy. A failure ends in one UserError line; results.json keeps the finished tasks."""
    t_start = time.perf_counter()
    # -- setup: what a bad config, folder or tracking store breaks is reported before any data is loaded
    run_hash = config_hash(cfg)  # of the config as composed (identity.py): what resume and skip match on
    cfg = validate(cfg)
    hydra_dir, info = hydra_info()
    resumed = None if cfg.resume in (False, None) else checkpoint.find_resumable(
        cfg.resume, Path(cfg.paths.outputs), run_hash)
    run_dir = Path(resumed or run_dir or hydra_dir
                   or Path(cfg.paths.outputs) / "runs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f"))
    make_folder(Path(cfg.paths.outputs), "paths.outputs")
    make_folder(run_dir, "the run folder", "point hydra.run.dir (or paths.outputs) at a writable folder")
    device = setup_hardware(cfg.hardware)
    tracker = make_tracker(cfg, run_dir, info, run_hash, resumed is not None)
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, device)
    model = build_model(cfg, stream).to(device)
    dataset = describe(cfg, (info.get("choices") or {}).get("dataset") or cfg.dataset.name, stream)
    set_threads(cfg.hardware, model, stream, cfg.method.batch_size)
    method = METHODS.get(cfg.method.name)(cfg, model, stream, device).to(device)
    plan = [joint_task(stream)] if method.trains_jointly else stream.tasks
    T = len(stream.tasks)  # columns of the matrices (a joint run has one row over all tasks)
    ck = (resumed_state(run_dir, method, device, tracker, len(plan)) if resumed is not None
          else fresh_state(cfg, method, stream, run_hash))
    elapsed0 = ck.elapsed_s  # seconds spent by the processes before this one
    tracker.start(torch.get_num_threads(), dataset)
    method.on_nonfinite = nonfinite_policy(cfg.on_nonfinite, tracker, len(plan))
    progress = Progress(cfg.progress, len(plan))

    # -- per task: train, evaluate every task seen, checkpoint, then results.json and MLflow
    status, error = "failed", None
    try:
        for i in range(ck.tasks_done, len(plan)):
            task, t0 = plan[i], time.perf_counter()
            if ck.before_til is not None:
                ck.before_til[i] = evaluate_tasks(method, stream, [i], [i], cfg.eval.batch_size)[1][0]
            method.on_step = progress.task(i, method.steps_per_task(task))
            diagnostics = method_metrics(method, method.fit_task(task))
            seen = list(range(T)) if method.trains_jointly else list(range(i + 1))
            row, row_til = evaluate_tasks(method, stream, seen, seen, cfg.eval.batch_size)
            ck.acc.append(row + [float("nan")] * (T - len(row)))  # NaN: task not seen yet
            ck.acc_til.append(row_til + [float("nan")] * (T - len(row_til)))
            ck.task_s.append(time.perf_counter() - t0)
            cap = method.capacity()
            ck.capacity += [cap] if cap is not None else []
            ck.method_metrics.append(diagnostics)
            if cfg.checkpoint:  # before results.json: a kill between the two resumes from this task's end
                ck.method, ck.rng = method.state_dict(), checkpoint.rng_state(device)
                ck.elapsed_s, ck.mlflow_run_id = elapsed0 + time.perf_counter() - t_start, tracker.mlflow_run_id
                checkpoint.save(run_dir, ck)
            tracker.log_task(i, ck.acc, ck.acc_til, cap, diagnostics, ck.task_s[-1])
            progress.done(i, ck.acc[i], ck.acc_til[i], ck.task_s[-1])
        status = "finished"
    except UserError as e:  # e.g. capacity exhausted, a non-finite loss: keep every finished row
        error = str(e)
        raise
    except KeyboardInterrupt:
        error = "interrupted"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        # -- finish: final metrics and artifacts, whatever happened (the finished tasks are results too)
        progress.stop()
        metrics = final_metrics(ck, elapsed0 + time.perf_counter() - t_start, cfg.eval.get("after", ()))
        artifacts = write_artifacts(run_dir, cfg, ck, method, tracker.state) if ck.acc else {}
        tracker.finish(metrics, artifacts, status, error)
    print_summary(ck.acc, ck.acc_til, metrics, run_dir, None if "parent_run_id" in info else tracker.ui_line())
    return metrics[names.final("avg_acc")]


def fresh_state(cfg, method, stream, run_hash: str) -> Checkpoint:
    """A new run's progress: no rows yet; with eval.fwt, the untrained network's task-IL reference."""
    ck = Checkpoint(method={}, rng={}, acc=[], acc_til=[], task_s=[], capacity=[], method_metrics=[],
                    random_til=None, before_til=None, elapsed_s=0.0, config_hash=run_hash, mlflow_run_id=None)
    if cfg.eval.fwt and not method.trains_jointly:
        T = len(stream.tasks)
        ck.random_til = evaluate_tasks(method, stream, list(range(T)), list(range(T)), cfg.eval.batch_size)[1]
        ck.before_til = [float("nan")] * T
    return ck


def resumed_state(run_dir: Path, method, device, tracker: LocalTracker, n_tasks: int) -> Checkpoint:
    """The checkpoint of the run being resumed, loaded into the method, the RNGs and the tracker."""
    ck = checkpoint.load(run_dir)
    method.load_state_dict(ck.method)
    checkpoint.set_rng_state(ck.rng, device)
    tracker.restore(ck.acc, ck.acc_til, ck.capacity, ck.method_metrics, ck.task_s)
    log.info("resuming %s after task %d of %d", run_dir, ck.tasks_done, n_tasks)
    return ck


def make_tracker(cfg, run_dir: Path, info: dict, run_hash: str, resumed: bool) -> LocalTracker:
    """results.json always; MLflow too with tracking=mlflow (its store is checked now, before data loads)."""
    record = None if resumed else new_record(
        OmegaConf.to_container(cfg, resolve=True), run_hash, info.get("choices") or
        {"method": cfg.method.name, "dataset": cfg.dataset.name, "model": cfg.model.name},
        info.get("overrides", []), run_dir, mlflow_store.git_commit(),
        info.get("entry_point") or Path(sys.argv[0]).name)
    if record is not None:  # a sweep job's name starts with its swept values (the sweep callback lists the keys)
        record["run_name"] = mlflow_store.run_name(mlflow_store.run_tags(record), info.get("swept", ()))
    if cfg.tracking == "local":
        return LocalTracker(run_dir, record)
    return MlflowTracker(run_dir, record, uri=mlflow_store.tracking_uri(cfg.mlflow.uri, cfg.paths.outputs),
                         experiment=cfg.mlflow.experiment, outputs=Path(cfg.paths.outputs),
                         connect_timeout_s=cfg.mlflow.connect_timeout_s, parent_run_id=info.get("parent_run_id"))


def nonfinite_policy(on_nonfinite: str, tracker: LocalTracker, n_tasks: int):
    """Method.on_nonfinite: mark the run where its loss first went NaN/inf; stop it, or let it go on."""
    first = []

    def hook(task, epoch: int) -> None:
        where = f"task {task.id + 1}/{n_tasks}, epoch {epoch + 1}"
        if not first:
            first.append(where)
            tracker.mark("nonfinite_loss", where)
            if on_nonfinite == "continue":
                log.warning("the training loss became non-finite in %s; training goes on (on_nonfinite=continue) "
                            "and the run is marked nonfinite_loss", where)
        if on_nonfinite == "stop":
            raise TrainingError(f"the training loss became non-finite in {where}; the run stops with the tasks "
                                "finished so far (lower method.lr, or on_nonfinite=continue to train on)")

    return hook


def method_metrics(method, diagnostics) -> dict:
    """What fit_task returned, checked: {name: float} (the engine logs it as method/<name>)."""
    if not isinstance(diagnostics, dict):
        raise TypeError(f"{type(method).__name__}.fit_task returned {type(diagnostics).__name__}; it must return "
                        "a dict {name: float} of diagnostics ({} for none)")
    return {str(k): float(v) for k, v in diagnostics.items()}


def final_metrics(ck: Checkpoint, total_s: float, after=()) -> dict:
    """End-of-run figures: CL metrics over the matrices (none when no task finished), A<k> = the class-IL
    average over the tasks seen after task k for each k in `after` that finished (eval.after), FWT, the last
    capacity snapshot and method diagnostics (cl-report --metrics reads them), and the times."""
    metrics = summary(ck.acc, ck.acc_til) if ck.acc else {}
    for k in after:
        if k <= len(ck.acc):
            metrics[names.final(f"A{k}")] = sum(ck.acc[k - 1][:k]) / k
    if ck.random_til is not None:
        metrics[names.final("fwt_til")] = forward_transfer(ck.before_til, ck.random_til)
    if ck.capacity:
        metrics.update({names.capacity(layer, q): float(v) for layer, qs in ck.capacity[-1].items() for q, v in qs.items()})
    if ck.method_metrics:
        metrics.update({names.method(k): v for k, v in ck.method_metrics[-1].items()})
    metrics[names.TOTAL_TIME] = total_s
    metrics.update({names.task_time(i): s for i, s in enumerate(ck.task_s)})
    return metrics


def write_artifacts(run_dir: Path, cfg, ck: Checkpoint, method, record: dict) -> dict:
    """Matrices (JSON + CSV), heatmap, per-task table, resolved config, capacity JSON + plot: {mlflow subfolder: dir}."""
    acc, acc_til, capacity = ck.acc, ck.acc_til, ck.capacity
    out = run_dir / "artifacts"
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "acc_matrix.json", {"class_il": acc, "task_il": acc_til})
    for name, R in (("acc_matrix.csv", acc), ("acc_til_matrix.csv", acc_til)):
        header = "after_task," + ",".join(f"task_{j + 1}" for j in range(len(R[0])))  # from 1
        lines = [f"{i + 1}," + ",".join("" if math.isnan(v) else f"{v:.4f}" for v in r) for i, r in enumerate(R)]
        (out / name).write_text("\n".join([header, *lines]) + "\n")
    (out / "tasks.csv").write_text(tasks_csv(record))  # per task, numbered from 1: seconds, accuracies
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    plots.accuracy_heatmap(acc, acc_til, out / "acc_heatmap.png")
    if capacity:
        write_json_atomic(out / "capacity.json", capacity)
        plots.capacity_plot(capacity, out / "capacity.png")
    method.write_artifacts(out)
    return {"": out}
