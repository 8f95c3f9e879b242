"""Shared fixtures: compose configs the way `cl-run` does, with outputs in a temporary folder."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cl-run does; must precede torch's import

SHARED_DATA = Path(os.environ.get("CL_RUNNER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def cli(name: str = "cl-run") -> str:
    """The console script installed beside this interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg("method=joint", ...) -> composed DictConfig; local tracking, outputs under tmp_path."""

    def _make(*overrides: str, data: Path | None = None):
        base = [f"paths.outputs={tmp_path / 'outputs'}", "tracking=local", "progress=off",
                f"paths.data={data or tmp_path / 'data'}"]
        with initialize_config_module("cl_runner.conf", version_base="1.3"):
            return compose("config", overrides=[*base, *overrides])

    return _make


@pytest.fixture
def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CL_RUNNER_DATA")}
    env["CL_RUNNER_OUTPUTS"] = str(tmp_path / "outputs")
    return env


def assert_trains_alike(a, b, task) -> None:
    """Methods a and b (b loaded with a's state_dict) train `task` from the same global RNG state to exactly the
    same parameters and buffers: what a resumed run needs."""
    import torch

    rng = torch.get_rng_state()
    a.fit_task(task)
    torch.set_rng_state(rng)
    b.fit_task(task)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if torch.is_tensor(va):
            assert torch.equal(va, vb), k
