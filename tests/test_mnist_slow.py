"""Slow tier: the baselines on genuine MNIST / Fashion-MNIST (../shared/data), with the runner's protocol
(MLP 784-400-400-10, standardised inputs, batch 128, 4 epochs per task unless stated)."""
import json

import pytest

from cl_runner.train import run

from conftest import SHARED_DATA

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST at {SHARED_DATA}")]


def _run(make_cfg, tmp_path, *overrides) -> dict:
    run(make_cfg(*overrides, "hardware=cpu", data=SHARED_DATA), run_dir=tmp_path / "run")
    return json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]


@pytest.mark.parametrize("dataset,cil,til", [("split_mnist", (15, 25), 90), ("split_fmnist", (15, 25), 85)])
def test_finetune_forgets(make_cfg, tmp_path, dataset, cil, til):
    m = _run(make_cfg, tmp_path, "method=finetune", f"dataset={dataset}")
    assert cil[0] < m["final/avg_acc"] < cil[1] and m["final/avg_acc_til"] > til, m


@pytest.mark.parametrize("dataset,lo,hi", [("split_mnist", 91, 95), ("split_fmnist", 80, 86)])
def test_joint_sgd(make_cfg, tmp_path, dataset, lo, hi):
    m = _run(make_cfg, tmp_path, "method=joint", f"dataset={dataset}")
    assert lo < m["final/avg_acc"] < hi, m


@pytest.mark.parametrize("dataset,lo", [("split_mnist", 97.0), ("split_fmnist", 86.0)])
def test_joint_adam_reaches_the_offline_bound(make_cfg, tmp_path, dataset, lo):
    m = _run(make_cfg, tmp_path, "method=joint", f"dataset={dataset}", "method.optimizer=adam",
             "method.lr=0.001", "method.epochs=5")
    assert m["final/avg_acc"] >= lo, m
