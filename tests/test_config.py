"""Validation: wrong types, unknown keys and out-of-range values stop the run in one line."""
import subprocess
import time

import pytest

from cl_runner.config import validate
from cl_runner.errors import ConfigError

from conftest import cli


@pytest.mark.parametrize("override,message", [
    ("method.lr=-1", "method.lr=-1.0 is out of range (must be > 0)"),
    ("method.optimizer=rmsprop", "method.optimizer='rmsprop' is out of range (must be one of sgd, adam)"),
    ("method.lr=abc", "method.lr='abc' has the wrong type (expected float)"),
    ("+method.foo=1", "method.foo is not a known key"),
    ("dataset.val_fraction=1.5", "dataset.val_fraction=1.5 is out of range"),
    ("dataset.n_tasks=11", "dataset.n_tasks=11 must divide the 10 classes"),
    ("dataset.n_tasks=3", "dataset.n_tasks=3 must divide"),
    ("dataset.class_order=[0,1,2]", "dataset.class_order=[0, 1, 2] must be"),
    ("model.hidden=[400,0]", "model.hidden=0 is out of range"),
    ("model.head=multi", "model.head=multi needs dataset.label_mode=offset"),
    ("seed=-1", "seed=-1 is out of range"),
    ("tracking=wandb", "tracking='wandb' is out of range (must be one of mlflow, local)"),
    ("hardware.threads=-2", "hardware.threads=-2 is out of range"),
])
def test_bad_values_name_the_key(make_cfg, override, message):
    extra = ["dataset.label_mode=shared"] if override == "model.head=multi" else []
    with pytest.raises(ConfigError) as e:
        cfg = validate(make_cfg(override, *extra))
        if override.startswith("dataset.class_order"):  # order is checked against the data's classes
            from cl_runner.data import build_stream

            build_stream(cfg, "cpu")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_valid_default_config_is_typed_and_absolute(make_cfg, tmp_path):
    cfg = validate(make_cfg())
    assert cfg.method.name == "spacenet" and cfg.dataset.name == "split_digits" and cfg.model.name == "mlp"
    assert isinstance(cfg.method.lr, float) and list(cfg.model.hidden) == [400, 400]
    assert cfg.paths.outputs == str(tmp_path / "outputs") and cfg.paths.cache.startswith(cfg.paths.outputs)


def test_per_layer_scalar_is_expanded(make_cfg):
    from dataclasses import dataclass

    from cl_runner.config import MethodConfig, check_section, key, layer_counts
    from omegaconf import OmegaConf

    @dataclass
    class WithSel(MethodConfig):
        sel: list = key(ge=1, per_layer="hidden")

    cfg = validate(make_cfg("method=finetune"))
    node = OmegaConf.merge(OmegaConf.to_container(cfg.method), {"sel": 80})
    out = check_section("method", WithSel, node, layer_counts(cfg.model))
    assert list(out.sel) == [80, 80]
    node.sel = [80, 80, 80]
    with pytest.raises(ConfigError, match="method.sel has 3 entries but the model has 2 hidden layers"):
        check_section("method", WithSel, node, layer_counts(cfg.model))


@pytest.mark.parametrize("args,needle", [
    (["method=nope"], "unknown method 'nope'; available: "),
    (["dataset=imagenet"], "unknown dataset 'imagenet'; available:"),
    (["method.lr=-1"], "method.lr=-1.0 is out of range"),
    (["dataset=split_cifar10", "dataset.download=false"], "cifar-10-batches-py"),
    (["tracking=mlflow", "mlflow.uri=http://127.0.0.1:9"], "unreachable"),
])
def test_cli_errors_are_one_line(tmp_path, cli_env, args, needle):
    t0 = time.monotonic()
    p = subprocess.run([cli(), *args, "progress=off", f"paths.data={tmp_path / 'nodata'}"], cwd=tmp_path,
                       env=cli_env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cl-run: error:") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert time.monotonic() - t0 < 60


def test_help_lists_groups_and_examples(cli_env, tmp_path):
    p = subprocess.run([cli(), "--help"], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "method: " in p.stdout and "finetune, joint" in p.stdout and "CL_RUNNER_DATA" in p.stdout and "cl-report" in p.stdout
