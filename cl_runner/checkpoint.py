"""Crash-safe runs: a checkpoint at every task boundary, finding the run to resume, skipping finished work.

`checkpoint.pt` in the run folder is rewritten atomically after each task (before `results.json`): one
`Checkpoint`, saved as a dict of plain values (torch.load with weights_only). `resume=true` continues the
newest unfinished run folder under `paths.outputs` whose config hash matches (identity.config_hash: the
composed config without the keys that do not change results); `resume=<run folder>` names one. In a
multirun, a job whose config hash already has a finished run is skipped (`skip_finished=false` reruns it).

This module imports no torch at import time: the skip check runs before a job pays for it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .tracking.results import FILE, ResultsError, read_results, runs_with_hash

log = logging.getLogger("cl_runner")
CKPT = "checkpoint.pt"
VERSION = 2  # 2: one Checkpoint record, with method_metrics


@dataclass
class Checkpoint:
    """What a task boundary leaves for a resumed run to go on from, bit for bit."""

    method: dict  # the method's state_dict: model, masks, importances and its own RNGs (Method.get_extra_state)
    rng: dict  # the global torch RNG states (rng_state)
    acc: list  # class-IL rows so far (NaN = task not seen yet)
    acc_til: list  # task-IL rows so far
    task_s: list  # seconds per finished task
    capacity: list  # per task: {layer: {quantity: value}} (empty for methods without capacity)
    method_metrics: list  # per task: what fit_task returned
    random_til: list | None  # eval.fwt: the untrained network's task-IL accuracies, else None
    before_til: list | None  # eval.fwt: each task's task-IL accuracy just before it was trained
    elapsed_s: float  # seconds the run has spent, over every process that worked on it
    config_hash: str
    mlflow_run_id: str | None

    @property
    def tasks_done(self) -> int:
        return len(self.task_s)


def find_finished(outputs: Path, config_hash: str) -> dict | None:
    """The newest finished run with this config hash (its results.json content), or None."""
    return next((r for _, r in runs_with_hash(outputs, config_hash) if r.get("status") == "finished"), None)


def find_resumable(resume, outputs: Path, config_hash: str) -> Path | None:
    """The run folder to continue: `resume` names it, or (resume=true) the newest unfinished run with
    this config hash and a checkpoint. None when resume=true finds nothing (the run starts afresh)."""
    if resume is True:
        for p, r in runs_with_hash(outputs, config_hash):
            if r.get("status") != "finished" and (p.parent / CKPT).exists():
                return p.parent
        log.info("resume=true: no unfinished run with config hash %s under %s; starting a new run",
                 config_hash, outputs)
        return None
    folder = Path(str(resume)).expanduser().resolve()
    if not (folder / FILE).exists() or not (folder / CKPT).exists():
        raise ConfigError(f"resume={resume}: {folder} holds no {FILE} and {CKPT} to continue from")
    try:
        r = read_results(folder / FILE)
    except ResultsError as e:
        raise ConfigError(f"resume={resume}: {e}") from None
    if r.get("config_hash") != config_hash:
        raise ConfigError(f"resume={resume}: that run's config differs from this one (config hash "
                          f"{r.get('config_hash')} vs {config_hash}); give the same overrides as the run")
    if r.get("status") == "finished":
        raise ConfigError(f"resume={resume}: that run already finished; nothing to continue")
    return folder


def save(run_dir: Path, ck: Checkpoint) -> None:
    import torch

    path = Path(run_dir) / CKPT
    tmp = path.with_suffix(".pt.tmp")
    # fields one by one, not dataclasses.asdict: that would deep-copy every tensor of the state_dict
    torch.save({"version": VERSION, **{f.name: getattr(ck, f.name) for f in dataclasses.fields(ck)}}, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def load(run_dir: Path) -> Checkpoint:
    import torch

    path = Path(run_dir) / CKPT
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is the user's to know about, in one line
        raise ConfigError(f"cannot read the checkpoint {path}: {e}") from None
    if ck.get("version") != VERSION:
        raise ConfigError(f"{path} is a checkpoint of another format (version {ck.get('version')}, this cl_runner "
                          f"reads {VERSION}); start the run afresh")
    return Checkpoint(**{f.name: ck[f.name] for f in dataclasses.fields(Checkpoint)})


def rng_state(device) -> dict:
    import torch

    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict, device) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
