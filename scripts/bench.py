#!/usr/bin/env python
"""Time a split-MNIST protocol end to end, as a user runs it (`make bench`; `--experiment` picks it).

Each figure is the wall clock around a `cl-run +experiment=<protocol> progress=off ...`
subprocess (median of --repeats, conditions interleaved, after one untimed warm-up run that fills the
data cache), plus the per-task seconds that the run itself writes to results.json. Runs go to a
temporary outputs folder, so the user's outputs/ and MLflow database are left alone. Appends a dated
section to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CL_RUN = Path(sys.executable).parent / "cl-run"
PROTOCOL = ["+experiment=finetune_split_mnist", "progress=off"]  # --experiment replaces the first item
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_TRAIN = 60000  # training images over the 5 tasks
HEADER = """# Benchmarks

`make bench` (`scripts/bench.py`) times the split-MNIST finetune protocol (`+experiment=finetune_split_mnist`:
MLP 784-400-400-10, SGD lr 0.01, batch 128, 4 epochs per task, 5 tasks) end to end, as a user runs it:
the wall clock around a `cl-run ... progress=off` subprocess, start-up included, median of N repeats
(conditions interleaved) after one untimed warm-up run that fills the data cache.

- *s/epoch* and *samples/s*: from `timings.task_s` in `results.json` (training plus the evaluation
  after each task; 60000 training images x 4 epochs).
- *in-process*: `time/total_s`, from the start of `run()` until training and evaluation end; *outside
  it*: wall minus that (interpreter, Hydra, `import torch`, the artifacts and their matplotlib plots, exit).
- MLflow rows: `tracking=mlflow` into a fresh SQLite database each repeat (*first database*), then once
  more into an existing one; Δ is against the local row on the same device.

Timings on a shared machine are noisy (each section says how busy the machine was); compare sections
taken on the same machine only. Newest last.
"""


def fail(msg: str) -> None:
    sys.exit(f"bench: {msg}")


def timed(cmd: list, env: dict, timeout: float) -> tuple[float, str]:
    """Wall seconds and stdout of one subprocess; a failure or timeout ends the benchmark."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(f"timed out after {timeout:.0f}s: {' '.join(map(str, cmd))}")
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "\n  ".join((p.stderr.strip() or p.stdout.strip()).splitlines()[-6:])
        fail(f"exit status {p.returncode} from: {' '.join(map(str, cmd))}\n  {tail}")
    return wall, p.stdout


def cl_run(overrides: list, env: dict, timeout: float) -> dict:
    """One timed `cl-run`; the wall clock plus the figures from its results.json."""
    wall, out = timed([CL_RUN, *PROTOCOL, *overrides], env, timeout)
    path = next((ln[9:] for ln in reversed(out.splitlines()) if ln.startswith("results: ")), None)
    if path is None:
        fail("cl-run printed no 'results: <path>' line")
    res = json.loads(Path(path).read_text())
    task_s, cfg, m = res["timings"]["task_s"], res["config"], res["metrics"]
    epochs = cfg["method"]["epochs"]
    train = sum(task_s)
    return {"wall": wall, "total": m["time/total_s"], "outside": wall - m["time/total_s"],
            "epoch": train / (epochs * len(task_s)),
            "sps": MNIST_TRAIN * (1 - cfg["dataset"]["val_fraction"]) * epochs / train,
            "acc": (m["final/avg_acc"], m["final/avg_acc_til"])}


def step(label: str, fn):
    """Run one measurement and report it on stderr as it finishes (a full bench takes minutes)."""
    out = fn()
    print(f"  {label}: {out['wall'] if isinstance(out, dict) else out:.2f}s", file=sys.stderr, flush=True)
    return out


def machine(env: dict, timeout: float) -> dict:
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'threads': torch.get_num_threads(), 'cuda': c, 'gpu': torch.cuda.get_device_name(0) if c else None}))")
    info = json.loads(timed([sys.executable, "-c", code], env, timeout)[1])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return {**info, "cpu": cpu, "nproc": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
            "git": git.stdout.strip() or "no commit"}


def cpu_busy() -> tuple[float, float, float]:
    """(wall, CPU-seconds used by the whole machine, CPU-seconds used by this process and its children)."""
    try:  # /proc/stat cpu line: user nice system idle iowait irq softirq steal ...
        j = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        machine_s = (sum(j) - j[3] - j[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        machine_s = float("nan")
    own = os.times()
    return time.perf_counter(), machine_s, own.user + own.system + own.children_user + own.children_system


def table(rows: list) -> str:
    """rows: (label, values, reference median or None, digits)."""
    lines = ["| figure | median | runs | Δ vs local |", "|---|---:|---|---:|"]
    for label, xs, ref, d in rows:
        med = statistics.median(xs)
        delta = "" if ref is None else f"{med - ref:+.{d}f}"
        lines.append(f"| {label} | {med:.{d}f} | {', '.join(f'{x:.{d}f}' for x in xs)} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported; default 3)")
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                    help="all: CPU, plus CUDA when torch sees a GPU (default)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, nothing appended to BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only; do not append to BENCHMARKS.md")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per subprocess (default 600)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="file to append to")
    ap.add_argument("--experiment", default="finetune_split_mnist",
                    help="conf/experiment protocol on split MNIST to time (default finetune_split_mnist)")
    ap.add_argument("--no-mlflow", action="store_true", help="skip the MLflow rows (local tracking only)")
    args = ap.parse_args()
    PROTOCOL[0] = f"+experiment={args.experiment}"
    n = 1 if args.quick else args.repeats
    if n < 1:
        fail("--repeats must be at least 1")

    data = Path(os.environ["CL_RUNNER_DATA"]).resolve() if os.environ.get("CL_RUNNER_DATA") else ROOT / "data"
    missing = [f for f in MNIST_FILES if not any((data / "MNIST/raw" / f"{f}{s}").is_file() for s in ("", ".gz"))]
    if missing:
        fail(f"MNIST not found in {data / 'MNIST/raw'} (missing {', '.join(missing)}); "
             "set CL_RUNNER_DATA to the folder that holds MNIST/raw/")
    if not CL_RUN.exists():
        fail(f"no cl-run next to {sys.executable}; install the package first (make install)")

    load0, busy0 = os.getloadavg()[0], cpu_busy()  # other work on the machine makes the figures noisy
    signal.signal(signal.SIGTERM, lambda *_: fail("terminated"))  # still kill the running child, remove tmp
    tmp = Path(tempfile.mkdtemp(prefix="cl_bench_"))
    env = {**os.environ, "CL_RUNNER_DATA": str(data), "CL_RUNNER_OUTPUTS": str(tmp)}
    try:
        info = machine(env, args.timeout)
        devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
        if not info["cuda"]:
            if args.device == "cuda":
                fail("--device cuda, but torch sees no CUDA device")
            devices = ["cpu"]
        ref_dev = devices[0]  # MLflow runs use the first device, and compare against its local row
        run = lambda dev, *extra: cl_run([f"hardware={dev}", *extra], env, args.timeout)  # noqa: E731

        print(f"bench: {info['cpu']} x{info['nproc']}, torch {info['torch']}, {n} repeat(s); outputs in {tmp}",
              file=sys.stderr)
        local, first, rows = {dev: [] for dev in devices}, [], []
        for dev in devices:
            step(f"warm-up {dev} (fills the data cache)", lambda: run(dev, "tracking=local"))
        # conditions interleaved, so that a burst of other work on the machine hits them alike
        db = lambda i: f"mlflow.uri=sqlite:///{tmp}/mlflow_{i}.db"  # noqa: E731
        for i in range(n):
            for dev in devices:
                local[dev].append(step(f"local {dev} {i + 1}/{n}", lambda: run(dev, "tracking=local")))
            if not args.no_mlflow:
                first.append(step(f"mlflow {ref_dev}, first database {i + 1}/{n}",
                                  lambda: run(ref_dev, "tracking=mlflow", db(i))))
        existing = [] if args.no_mlflow else [
            step(f"mlflow {ref_dev}, existing database", lambda: run(ref_dev, "tracking=mlflow", db(n - 1)))]
        cfg_job = [step(f"cl-run --cfg job {i + 1}/{n}", lambda: timed([CL_RUN, *PROTOCOL, "--cfg", "job"], env,
                                                                    args.timeout)[0]) for i in range(n)]
        imp = {m: [step(f"import {m} {i + 1}/{n}", lambda: timed([sys.executable, "-c", f"import {m}"], env,
                                                               args.timeout)[0]) for i in range(n)]
               for m in ("torch", "mlflow")}

        get = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        for dev in devices:
            ref = statistics.median(get(local[ref_dev], "wall")) if dev != ref_dev else None
            rows += [(f"`cl-run` local, {dev}: wall (s)", get(local[dev], "wall"), ref, 2),
                     (f"  in-process `time/total_s`, {dev} (s)", get(local[dev], "total"), None, 2),
                     (f"  outside it (start-up, plots, exit), {dev} (s)", get(local[dev], "outside"), None, 2),
                     (f"  s/epoch, {dev}", get(local[dev], "epoch"), None, 3),
                     (f"  training samples/s, {dev}", get(local[dev], "sps"), None, 0)]
        ref = statistics.median(get(local[ref_dev], "wall"))
        if not args.no_mlflow:
            rows += [(f"`cl-run` mlflow, first database, {ref_dev}: wall (s)", get(first, "wall"), ref, 2),
                     (f"`cl-run` mlflow, existing database, {ref_dev}: wall (s)", get(existing, "wall"), ref, 2)]
        rows += [("`cl-run --cfg job` (start-up, no torch) (s)", cfg_job, None, 2),
                 ("`python -c 'import torch'` (s)", imp["torch"], None, 2),
                 ("`python -c 'import mlflow'` (s)", imp["mlflow"], None, 2)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    busy1 = cpu_busy()
    others = max(0.0, (busy1[1] - busy0[1]) - (busy1[2] - busy0[2])) / (busy1[0] - busy0[0])
    accs = sorted({f"class-IL {a:.2f} % / task-IL {t:.2f} %" for dev in devices for a, t in get(local[dev], "acc")})
    md = table(rows)
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ", no GPU"
    section = "\n".join([
        f"## {datetime.now():%Y-%m-%d %H:%M}: `{args.experiment}`, {info['cpu']}, {info['nproc']} cores{gpu}", "",
        f"- machine: {info['cpu']}; nproc {info['nproc']}; torch {info['torch']} ({info['threads']} threads); "
        f"Python {info['python']}{gpu}",
        f"- code: {info['git']}; {n} timed run(s) per figure (median; runs in order), after 1 warm-up run"
        + ("; existing-database row is 1 run" if n > 1 and not args.no_mlflow else ""),
        f"- other work on the machine: load average {load0:.2f} at the start; {others:.2f} cores busy with "
        "other processes on average during the bench" + (" (figures disturbed)" if others > 0.2 else ""),
        f"- final accuracy of the timed local runs (sanity): {'; '.join(accs)}", "", md, ""])
    print(md)
    print(f"\nfinal accuracy (timed local runs): {'; '.join(accs)}"
          f"\nother work: load {load0:.2f} at start, {others:.2f} cores busy with other processes during the bench")
    if args.no_write or args.quick:
        return
    text = args.output.read_text() if args.output.exists() else HEADER
    args.output.write_text(text.rstrip("\n") + "\n\n" + section)
    print(f"appended to {args.output}")


if __name__ == "__main__":
    main()
