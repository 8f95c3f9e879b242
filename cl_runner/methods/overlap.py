"""Two independent halves of a training step on two CPU threads (hardware.overlap), with the same bits as one
backward pass on one thread.

A step whose loss is a sum of terms over disjoint inputs (DGR: the current minibatch's and the replayed
minibatch's, for the classifier and for its generator) can take each term's gradients apart, with
`torch.autograd.grad`, and add them: backward adds the two branches' gradients of a parameter the same way,
and a + b == b + a in floating point, so the sum is bit-identical to `loss.backward()` of the whole. The
halves read the same weights and write nothing shared, so one can run on a second thread (`submit`) while the
caller runs the other, and optimizer steps of separate networks can run there too. On a machine whose second
core would otherwise idle (a lone job on 2 cores runs torch with 1 thread, launch.default_threads), that is
the second core's work.

What the caller must keep: neither half draws random numbers (draw them before, in the serial order) nor
updates module state (BatchNorm statistics), which `safe` checks; and it waits for (`Future.result`) whatever
the second thread still writes before reading it.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .. import launch

log = logging.getLogger(__name__)
_pool: ThreadPoolExecutor | None = None  # one worker thread for the process (sweeps run jobs one after another)


def safe(*modules: nn.Module) -> bool:
    """Whether forward passes of `modules` may run on two threads at once and give the same bits as one
    after the other: no dropout (random numbers) and no batch normalisation (running statistics)."""
    for m in (sub for mod in modules for sub in mod.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
    return True


def spare_core() -> bool:
    """Whether this job's torch threads leave a core of its allocation idle (threads × jobs sharing it < cores)."""
    return torch.get_num_threads() * launch.jobs_sharing() < launch.cores()


def wanted(mode: str, device: torch.device, *modules: nn.Module) -> bool:
    """hardware.overlap: `always` (when `safe`), `never`, or `auto`: on a CPU with a core to spare."""
    if mode == "never":
        return False
    if not safe(*modules):
        if mode == "always":
            log.warning("hardware.overlap=always: the model has dropout or BatchNorm, whose forward passes would "
                        "differ on two threads; the step stays on one")
        return False
    on = mode == "always" or (device.type == "cpu" and spare_core())
    if on:
        log.info("overlap: the step's halves on two threads (hardware.overlap=%s; the same results as one)", mode)
    return on


def submit(fn, overlap: bool) -> Future:
    """fn's future: run on the worker thread, after what was submitted before it (one thread: first in, first
    out), when `overlap`; else run now, here. `.result()` waits, and raises fn's exception."""
    global _pool
    if not overlap:
        done: Future = Future()
        done.set_result(fn())
        return done
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="cl_runner-overlap")
    return _pool.submit(fn)


def gradients(loss: torch.Tensor, params: list) -> list:
    """d loss / d params (None for a parameter the loss does not reach), leaving every `.grad` alone."""
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def set_grads(params: list, *parts: list | None) -> None:
    """p.grad = the sum of the parts' gradients of p (a part None: no gradients), as backward sums a parameter's
    branches (for two parts, a + b: the same bits in either order); None where no part reaches p (optimizers
    skip it)."""
    parts = tuple(part for part in parts if part is not None)
    for i, p in enumerate(params):
        grad = None
        for g in (part[i] for part in parts):
            grad = g if grad is None else grad if g is None else grad + g
        p.grad = grad
