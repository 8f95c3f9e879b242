#!/usr/bin/env python
"""Time methods against finetune in one protocol (default: van de Ven & Tolias's class-IL split MNIST).

    python scripts/bench_methods.py                                   # every baseline, 2 repeats
    python scripts/bench_methods.py --methods finetune,ewc,dgr --steps 500 --repeats 3 --threads 1

Each figure is a run's in-process `time/total_s` (training, the end-of-task passes such as the Fisher or
herding, and the evaluation after each task; start-up and figures left out), median over --repeats, with
the methods interleaved within each repeat so that other work on the machine hits them alike. `--steps`
shortens every task to that many minibatches (the per-step cost ratio is what the protocol's 2000 keeps;
the end-of-task passes weigh a little more). Runs go to a temporary outputs folder. Appends a dated
section to BENCHMARKS.md unless --no-write.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CL_RUN = Path(sys.executable).parent / "cl-run"
BASELINES = "finetune,ewc,online_ewc,si,mas,lwf,er,icarl,dgr,dgr_distill,joint"


def run(method: str, args, env: dict, tmp: Path) -> dict:
    cmd = [str(CL_RUN), f"+experiment={args.experiment}", f"method={method}", "tracking=local", "progress=off",
           "hardware=cpu", f"hardware.threads={args.threads}", f"hardware.overlap={args.overlap}",
           f"paths.outputs={tmp}", "checkpoint=false"]
    if args.steps:
        cmd.append(f"++method.steps={args.steps}")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        sys.exit(f"bench_methods: {method} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")
    path = next(ln[9:] for ln in reversed(p.stdout.splitlines()) if ln.startswith("results: "))
    m = json.loads(Path(path).read_text())["metrics"]
    return {"s": m["time/total_s"], "acc": m["final/avg_acc"], "acc_til": m["final/avg_acc_til"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=BASELINES, help=f"comma list; the first is the reference (default {BASELINES})")
    ap.add_argument("--experiment", default="vdv_split_mnist", help="conf/experiment protocol (default vdv_split_mnist)")
    ap.add_argument("--steps", type=int, default=0, help="minibatches per task (default: the protocol's)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method, median reported (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--overlap", default="auto", choices=("auto", "always", "never"),
                    help="hardware.overlap: DGR's step halves on a second thread (auto: when a core is idle)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if not methods or args.repeats < 1:
        sys.exit("bench_methods: need at least one method and one repeat")
    if not os.environ.get("CL_RUNNER_DATA"):
        sys.exit("bench_methods: set CL_RUNNER_DATA to the folder that holds MNIST/raw/ (e.g. ../shared/data)")
    tmp = Path(tempfile.mkdtemp(prefix="cl_bench_methods_"))
    load0 = os.getloadavg()[0]
    try:
        times: dict = {m: [] for m in methods}
        last: dict = {}
        for i in range(args.repeats):
            for m in methods:
                last[m] = run(m, args, dict(os.environ), tmp)
                times[m].append(last[m]["s"])
                print(f"  {m} {i + 1}/{args.repeats}: {last[m]['s']:.1f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = statistics.median(times[methods[0]])
    lines = [f"| method | s (median) | runs | × {methods[0]} | class-IL | task-IL |", "|---|---:|---|---:|---:|---:|"]
    for m in methods:
        med = statistics.median(times[m])
        lines.append(f"| {m} | {med:.1f} | {', '.join(f'{t:.1f}' for t in times[m])} | {med / ref:.2f} | "
                     f"{last[m]['acc']:.2f} | {last[m]['acc_til']:.2f} |")
    steps = f"{args.steps} minibatches per task" if args.steps else "the protocol's minibatches per task"
    head = (f"## {datetime.now():%Y-%m-%d %H:%M}: methods × {methods[0]}, `+experiment={args.experiment}`, {steps}\n\n"
            f"- `scripts/bench_methods.py`, {args.threads} torch thread(s) per run, hardware.overlap={args.overlap},"
            f" {args.repeats} repeat(s) interleaved;"
            f" load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (other work on the machine"
            f" slows every method alike); in-process seconds (`time/total_s`); accuracies of the last repeat, seed 0.\n")
    text = head + "\n" + "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
