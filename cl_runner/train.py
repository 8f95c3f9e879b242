"""The engine: config → validate → task stream on the device → model → method → train/evaluate per task.

`run(cfg)` is what `cl-run` calls (and what tests and sweepers call directly); it returns the final
class-IL average accuracy. The engine knows nothing of a method's internals, a method nothing of
tracking.
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

from . import checkpoint, plots
from .config import validate
from .data import Split, Task, build_stream
from .errors import ConfigError, UserError
from .evaluate import evaluate_tasks, forward_transfer, summary
from .models import build_model
from .registry import METHODS
from .tracking import LocalTracker, MlflowTracker, config_hash, write_json_atomic

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
    from . import launch

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
    info = {"choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
            "overrides": list(hc.overrides.task)}
    parent = Path(hc.sweep.dir) / "mlflow_parent.json"
    if str(hc.mode) == "RunMode.MULTIRUN" and parent.exists():
        info["parent_run_id"] = json.loads(parent.read_text())["run_id"]
    return Path(hc.runtime.output_dir), info


class Progress:
    """A rich progress bar on a terminal; one log line per task otherwise."""

    def __init__(self, mode: str, n_tasks: int):
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=True)
            self.bar.start()
        self.quiet, self.n_tasks = mode == "off", n_tasks

    def task(self, i: int, steps: int):
        if self.bar is None:
            return lambda: None
        bar_id = self.bar.add_task(f"task {i + 1}/{self.n_tasks}", total=steps)
        return lambda: self.bar.advance(bar_id)

    def done(self, i: int, row: list, row_til: list, seconds: float) -> None:
        if self.quiet:
            return
        fmt = lambda r: " ".join("  -  " if math.isnan(v) else f"{v:5.1f}" for v in r)  # noqa: E731
        msg = f"task {i + 1}/{self.n_tasks} done in {seconds:.1f}s | class-IL {fmt(row)} | task-IL {fmt(row_til)}"
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            log.info(msg)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run(cfg: DictConfig, run_dir: Path | None = None) -> float:
    t_start = time.perf_counter()
    raw = cfg
    cfg = validate(cfg)
    hydra_dir, info = hydra_info()
    info["config_hash"] = config_hash(raw)  # of the config as composed: what resume and skip match on
    resumed = None if cfg.resume in (False, None) else checkpoint.find_resumable(
        cfg.resume, Path(cfg.paths.outputs), info["config_hash"])
    info["resume"] = resumed is not None
    run_dir = Path(resumed or run_dir or hydra_dir
                   or Path(cfg.paths.outputs) / "runs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f"))
    info.setdefault("choices", {"method": cfg.method.name, "dataset": cfg.dataset.name, "model": cfg.model.name})
    device = setup_hardware(cfg.hardware)
    # the tracker comes first: an unreachable server is reported before any data is loaded
    tracker = (MlflowTracker if cfg.tracking == "mlflow" else LocalTracker)(cfg, run_dir, info)
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, device)
    model = build_model(cfg, stream).to(device)
    set_threads(cfg.hardware, model, stream, int(cfg.method.get("batch_size", 1)))
    method = METHODS.get(cfg.method.name)(cfg, model, stream, device).to(device)

    T = len(stream.tasks)
    plan = [joint_task(stream)] if method.trains_jointly else stream.tasks
    nan_row = lambda: [float("nan")] * T  # noqa: E731
    acc, acc_til, task_s = [], [], []
    random_til = before_til = None
    elapsed0, start = 0.0, 0  # seconds spent and tasks done before this process (resume)
    if resumed is not None:
        ck = checkpoint.load(run_dir)
        method.load_state_dict(ck["method"])
        checkpoint.set_rng_state(ck["rng"], device)
        acc, acc_til, task_s = ck["acc"], ck["acc_til"], ck["task_s"]
        random_til, before_til, elapsed0, start = ck["random_til"], ck["before_til"], ck["elapsed_s"], len(task_s)
        tracker.restore(acc, acc_til, ck["capacity"], task_s)
        log.info("resuming %s after task %d of %d", run_dir, start, len(plan))
    elif cfg.eval.fwt and not method.trains_jointly:  # reference: the untrained network, task-IL
        random_til = evaluate_tasks(method, stream, list(range(T)), list(range(T)), cfg.eval.batch_size)[1]
        before_til = [float("nan")] * T
    tracker.start()
    progress = Progress(cfg.progress, len(plan))
    status, error = "failed", None
    try:
        for i, task in enumerate(plan):
            if i < start:
                continue
            t0 = time.perf_counter()
            if before_til is not None:
                before_til[i] = evaluate_tasks(method, stream, [i], [i], cfg.eval.batch_size)[1][0]
            method.on_step = progress.task(i, method.steps_per_task(task))
            method.fit_task(task)
            seen = list(range(T)) if method.trains_jointly else list(range(i + 1))
            row, row_til = evaluate_tasks(method, stream, seen, seen, cfg.eval.batch_size)
            acc.append(nan_row()), acc_til.append(nan_row())
            acc[i][: len(row)], acc_til[i][: len(row_til)] = row, row_til
            task_s.append(time.perf_counter() - t0)
            cap = method.capacity()
            if cfg.checkpoint:  # before results.json: a kill between the two resumes from this task's end
                checkpoint.save(run_dir, {
                    "method": method.state_dict(), "rng": checkpoint.rng_state(device), "acc": acc,
                    "acc_til": acc_til, "task_s": task_s, "random_til": random_til, "before_til": before_til,
                    "capacity": [*tracker.state["capacity"], *([cap] if cap is not None else [])],
                    "elapsed_s": elapsed0 + time.perf_counter() - t_start, "config_hash": info["config_hash"],
                    "mlflow_run_id": tracker.mlflow_run_id})
            tracker.log_task(i, acc, acc_til, cap, task_s[-1], {f"time/task_{i}_s": task_s[-1]})
            progress.done(i, acc[i], acc_til[i], task_s[-1])
        status = "finished"
    except UserError as e:  # e.g. capacity exhausted: keep every finished row
        error = str(e)
        raise
    except KeyboardInterrupt:
        error = "interrupted"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        progress.stop()
        metrics = summary(acc, acc_til) if acc else {}
        if random_til is not None:
            metrics["final/fwt_til"] = forward_transfer(before_til, random_til)
        if tracker.state["capacity"]:  # the last capacity snapshot is final too (cl-report --metrics capacity/...)
            metrics.update({f"capacity/{layer}/{q}": float(v) for layer, qs in tracker.state["capacity"][-1].items()
                            for q, v in qs.items()})
        metrics["time/total_s"] = elapsed0 + time.perf_counter() - t_start
        metrics.update({f"time/task_{i}_s": s for i, s in enumerate(task_s)})
        artifacts = write_artifacts(run_dir, cfg, acc, acc_til, tracker.state["capacity"], method) if acc else {}
        tracker.finish(metrics, artifacts, status, error)
    print_summary(acc, acc_til, metrics, run_dir)
    return metrics["final/avg_acc"]


def write_artifacts(run_dir: Path, cfg, acc, acc_til, capacity, method) -> dict:
    """Matrices (JSON + CSV), heatmap, resolved config, capacity JSON + plot: {mlflow subfolder: dir}."""
    out = run_dir / "artifacts"
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "acc_matrix.json", {"class_il": acc, "task_il": acc_til})
    for name, R in (("acc_matrix.csv", acc), ("acc_til_matrix.csv", acc_til)):
        header = "after_task," + ",".join(f"task_{j}" for j in range(len(R[0])))
        lines = [f"{i}," + ",".join("" if math.isnan(v) else f"{v:.4f}" for v in r) for i, r in enumerate(R)]
        (out / name).write_text("\n".join([header, *lines]) + "\n")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    plots.accuracy_heatmap(acc, acc_til, out / "acc_heatmap.png")
    if capacity:
        write_json_atomic(out / "capacity.json", capacity)
        plots.capacity_plot(capacity, out / "capacity.png")
    method.write_artifacts(out)
    return {"": out}


def print_summary(acc, acc_til, metrics, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True, width=max(100, Console().width))
    for title, R in (("class-IL accuracy (%)", acc), ("task-IL accuracy (%)", acc_til)):
        table = Table(title=f"{title}  (row: after task i, column: on task j)", title_justify="left")
        table.add_column("after")
        for j in range(len(R[0])):
            table.add_column(f"T{j}", justify="right")
        for i, r in enumerate(R):
            table.add_row(str(i), *("-" if math.isnan(v) else f"{v:.2f}" for v in r))
        console.print(table)
    f = lambda k: "n/a" if math.isnan(metrics.get(k, float("nan"))) else f"{metrics[k]:.2f}"  # noqa: E731
    console.print(f"final avg acc: class-IL {f('final/avg_acc')} | task-IL {f('final/avg_acc_til')} | "
                  f"BWT {f('final/bwt')} | forgetting {f('final/forgetting')} | {metrics['time/total_s']:.1f}s")
    console.print(f"results: {run_dir / 'results.json'}")
