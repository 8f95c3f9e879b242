"""Crash-safe runs: a checkpoint at every task boundary, finding the run to resume, skipping finished work.

`checkpoint.pt` in the run folder is rewritten atomically after each task (before `results.json`): the
method's state_dict (model, masks, importances and the method's RNGs, see `Method.get_extra_state`), the
global torch RNG states, the accuracy rows, per-task seconds, capacity snapshots and the MLflow run id.
`resume=true` continues the newest unfinished run folder under `paths.outputs` whose config hash matches
(`tracking.config_hash`: the composed config without resume/hardware/tracking/launcher/... keys);
`resume=<run folder>` names one. In a multirun, a job whose config hash already has a finished run is
skipped (`skip_finished=false` reruns it).

This module imports no torch at import time: the skip check runs before a job pays for it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("cl_runner")
CKPT = "checkpoint.pt"
VERSION = 1
# where run folders live under paths.outputs: single runs (runs/<date>/<time>_...) and sweep jobs
# (multirun/<date>/<time>/<job>, deeper when an override holds a "/"); the copies of results.json among
# MLflow's artifacts (mlartifacts/) are not runs
RUN_GLOBS = ("runs/*/*/results.json", "multirun/**/results.json")


def _results(outputs: Path, config_hash: str):
    """(results.json path, its content) of the run folders under `outputs` with this config hash, newest
    first. Every job of a sweep looks before it starts, so a file is parsed only when its text holds the
    hash (2000 runs of 10 KB: 0.06 s, against 0.9 s parsing every file; BENCHMARKS.md)."""
    found = []
    for pattern in RUN_GLOBS:
        for p in Path(outputs).glob(pattern):
            try:
                text = p.read_text()
                if config_hash in text:
                    r = json.loads(text)
                    if r.get("config_hash") == config_hash:
                        found.append((p.stat().st_mtime, p, r))
            except (OSError, ValueError):  # a half-written or foreign file is not a run
                continue
    return [(p, r) for _, p, r in sorted(found, key=lambda f: f[0], reverse=True)]


def find_finished(outputs: Path, config_hash: str) -> dict | None:
    """The newest finished run with this config hash (its results.json content), or None."""
    return next((r for _, r in _results(outputs, config_hash) if r.get("status") == "finished"), None)


def find_resumable(resume, outputs: Path, config_hash: str) -> Path | None:
    """The run folder to continue: `resume` names it, or (resume=true) the newest unfinished run with
    this config hash and a checkpoint. None when resume=true finds nothing (the run starts afresh)."""
    if resume is True:
        for p, r in _results(outputs, config_hash):
            if r.get("status") != "finished" and (p.parent / CKPT).exists():
                return p.parent
        log.info("resume=true: no unfinished run with config hash %s under %s; starting a new run",
                 config_hash, outputs)
        return None
    folder = Path(str(resume)).expanduser().resolve()
    res = folder / "results.json"
    if not res.exists() or not (folder / CKPT).exists():
        raise ConfigError(f"resume={resume}: {folder} holds no results.json and {CKPT} to continue from")
    r = json.loads(res.read_text())
    if r.get("config_hash") != config_hash:
        raise ConfigError(f"resume={resume}: that run's config differs from this one (config hash "
                          f"{r.get('config_hash')} vs {config_hash}); give the same overrides as the run")
    if r.get("status") == "finished":
        raise ConfigError(f"resume={resume}: that run already finished; nothing to continue")
    return folder


def save(run_dir: Path, state: dict) -> None:
    import torch

    path = Path(run_dir) / CKPT
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"version": VERSION, **state}, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def load(run_dir: Path) -> dict:
    import torch

    path = Path(run_dir) / CKPT
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is the user's to know about, in one line
        raise ConfigError(f"cannot read the checkpoint {path}: {e}") from None
    if ck.get("version") != VERSION:
        raise ConfigError(f"{path} is a checkpoint of another format (version {ck.get('version')})")
    return ck


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
