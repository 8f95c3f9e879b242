"""Run identity, declared once on the schemas (config.py, identity=False) and derived by identity.py: the
config hash (resume, skip_finished), cl-report's rows and Hydra's job folder names agree on it."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from cl_runner.identity import config_hash, is_identity_key, job_dirname_exclude_keys, not_identity_keys
from cl_runner.report import RunRecord, summarise, swept_keys

# keys that say where or how a run runs (each entry is a decision; README "Resume and skipping finished work")
NOT_IDENTITY = {"tracking", "resume", "progress", "checkpoint", "skip_finished", "on_nonfinite",
                "paths.outputs", "paths.data", "paths.cache", "mlflow.experiment", "mlflow.uri",
                "mlflow.connect_timeout_s", "eval.batch_size", "eval.after", "hardware.device", "hardware.threads",
                "hardware.deterministic", "hardware.matmul_precision", "hardware.overlap", "launcher"}
SAME_RUN = ["eval.batch_size=7", "hardware.threads=2", "hardware.overlap=never", "hardware=cpu", "skip_finished=false", "progress=bar",
            "checkpoint=false", "on_nonfinite=continue", "paths.data=/elsewhere", "mlflow.experiment=other",
            "resume=true", "eval.after=[2]", "launcher=local_parallel", "launcher.n_jobs=2"]


def test_the_not_identity_keys_are_the_declared_ones():
    assert set(not_identity_keys()) == NOT_IDENTITY
    assert is_identity_key("method.lr") and is_identity_key("seed") and is_identity_key("eval.fwt")
    assert not is_identity_key("launcher.n_jobs") and not is_identity_key("hardware.threads")


def test_config_hash_ignores_how_a_run_runs(make_cfg):
    base = config_hash(make_cfg())
    # keys added after runs existed, at the value that computes what those runs did, leave the hash alone
    assert config_hash(make_cfg("dataset.resize=0", "model.dropout=0.0")) == base
    assert config_hash(make_cfg("dataset.resize=32")) != base
    for override in SAME_RUN[:-1]:  # launcher.n_jobs needs its preset
        assert config_hash(make_cfg(override)) == base, override
    assert config_hash(make_cfg(*SAME_RUN)) == base
    for override in ("method.lr=0.5", "seed=1", "eval.fwt=true", "dataset.n_tasks=1", "model.hidden=[10,10]"):
        assert config_hash(make_cfg(override)) != base, override


def test_job_folders_name_only_identifying_overrides(tmp_path):
    with initialize_config_module("cl_runner.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.outputs={tmp_path}", "method.lr=0.5", "seed=3", *SAME_RUN],
                      return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "method.lr=0.5,seed=3"
    assert {"hardware", "launcher.n_jobs", "hydra/launcher", "sweep", "eval.batch_size"} <= set(job_dirname_exclude_keys())


def record(seed: int, value: float, when: float, **params) -> RunRecord:
    p = {"seed": str(seed), "method.lr": "0.01", "skip_finished": "True", "eval.batch_size": "2000", **params}
    return RunRecord("finetune", "split_mnist", seed, p, {"final/avg_acc": value}, time=when)


def test_report_rows_group_on_identity_keys_only():
    runs = [record(0, 10.0, 1), record(1, 20.0, 2, skip_finished="False", **{"eval.batch_size": "64"}),
            record(2, 30.0, 3, **{"hardware.threads": "1"})]
    assert swept_keys(runs) == []
    (row,) = summarise(runs)
    assert row.n == 3 and row.older == 0


def test_a_config_and_seed_that_ran_again_counts_once_with_its_newest_run():
    """Three runs of seed 7 (one with skip_finished=false) are one sample: n = 1, the newest value."""
    runs = [record(7, 50.0, 1), record(7, 60.0, 3, skip_finished="False"), record(7, 55.0, 2),
            record(8, 70.0, 1)]
    (row,) = summarise(runs)
    assert row.n == 2 and row.older == 2
    assert row.stats["acc (class-IL)"] == (pytest.approx(65.0), pytest.approx(7.0710678))  # 60 (newest) and 70
