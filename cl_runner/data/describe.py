"""What a run trained and was tested on, as MLflow's dataset input shows it: the dataset's config name, a
digest of the tensors actually used (after the class order, the split into tasks, the validation hold-out,
permutations and normalisation) and the task split. Two runs with the same digest saw the same numbers.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import TaskStream

DIGEST_CHARS = 16


def _feed(h, t: torch.Tensor) -> None:
    """The tensor's dtype, shape and bytes into the hash (a copy to the host for device tensors)."""
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())


def stream_digest(stream: TaskStream) -> str:
    """SHA-256 over every task's train / validation / test inputs and labels, in task order (CPU: about a
    second for MNIST's 70 000 images; nothing per sample)."""
    h = hashlib.sha256()
    for task in stream.tasks:
        h.update(f"task {task.id} classes {task.classes}".encode())
        for split in (task.train, task.val, task.test):
            if split is not None:
                _feed(h, split.x)
                _feed(h, split.y)
    return h.hexdigest()[:DIGEST_CHARS]


def describe(cfg, choice: str, stream: TaskStream) -> dict:
    """The dataset record a run keeps (results.json `dataset`) and logs to MLflow as its dataset input:
    name (the dataset config chosen), digest, source (where the raw files are read), profile (the task
    split: classes and sample counts per task) and schema (input shape and label space)."""
    n = lambda split: 0 if split is None else len(split.y)  # noqa: E731
    source = ("scikit-learn's bundled digits" if cfg.dataset.name == "split_digits"
              else str(Path(cfg.paths.data).expanduser().resolve()))
    return {
        "name": choice,
        "digest": stream_digest(stream),
        "source": source,
        "profile": {"tasks": len(stream.tasks), "classes": [list(t.classes) for t in stream.tasks],
                    "train": [n(t.train) for t in stream.tasks], "val": [n(t.val) for t in stream.tasks],
                    "test": [n(t.test) for t in stream.tasks], "class_order": str(cfg.dataset.class_order)},
        "schema": {"x": f"float32 {list(stream.input_shape)}", "y": f"int64, {stream.n_outputs} labels",
                   "label_mode": stream.label_mode},
    }
