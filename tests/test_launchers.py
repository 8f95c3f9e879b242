"""Launch presets (conf/launcher/) and the Optuna sweep (conf/sweep/optuna_spacenet.yaml).

local_parallel runs a real 2-job sweep in parallel processes, each pinned to cores ÷ jobs threads;
slurm and ray at least compose and pass validation (each skipped without its plugin), and the SLURM
path runs one real job through submitit's local executor; a 2-trial Optuna study runs end to end.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

from cl_runner import launch
from cl_runner.config import validate
from cl_runner.errors import ConfigError
from cl_runner.identity import config_hash

from conftest import cli

def need(plugin: tuple[str, str]) -> None:
    """Skip unless the Hydra plugin (module, cl-runner extra) is installed."""
    module, extra = plugin
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'cl-runner[{extra}]')")


def compose_hydra(tmp_path, *overrides: str):
    with initialize_config_module("cl_runner.conf", version_base="1.3"):
        return compose("config", overrides=[f"paths.outputs={tmp_path}", *overrides], return_hydra_config=True)


def run_cl(cwd: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([cli(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"cl-run {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def sweep_results(outputs: Path) -> tuple[Path, list[tuple[Path, dict]]]:
    sweep_dirs = [p for p in (outputs / "multirun").glob("*/*") if p.is_dir()]
    assert len(sweep_dirs) == 1, sweep_dirs
    return sweep_dirs[0], [(f, json.loads(f.read_text())) for f in sorted(sweep_dirs[0].glob("*/results.json"))]


# ------------------------------------------------------------------------------- compose / validate
@pytest.mark.parametrize("name, target, overrides, expect", [
    ("local", "BasicLauncher", [], {}),
    ("local_parallel", "JoblibLauncher", ["launcher.n_jobs=3"], {"n_jobs": 3}),
    ("slurm", "SlurmLauncher",
     ["launcher.partition=gpu", "launcher.gpus_per_task=1", "launcher.time_min=90", "launcher.array_parallelism=4",
      "launcher.setup=[module load cuda]"],
     {"partition": "gpu", "gpus_per_task": 1, "timeout_min": 90, "array_parallelism": 4, "setup": ["module load cuda"]}),
    ("slurm_local", "LocalLauncher", ["launcher.time_min=5"], {"timeout_min": 5}),
    ("ray", "RayLauncher", ["launcher.address=ray://head:10001", "launcher.num_gpus=1"],
     {"ray": {"init": {"address": "ray://head:10001"}, "remote": {"num_cpus": 1, "num_gpus": 1}}}),
])
def test_preset_composes_and_validates(tmp_path, make_cfg, name, target, overrides, expect):
    if name in launch.PLUGINS:
        need(launch.PLUGINS[name])
    cfg = compose_hydra(tmp_path, f"launcher={name}", "hardware=cuda", *overrides)
    hl = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert hl["_target_"].endswith(target)
    for k, v in expect.items():  # the readable launcher.* keys reach hydra.launcher.*
        assert OmegaConf.to_container(cfg.hydra.launcher, resolve=True)[k] == v, k
    job = make_cfg(f"launcher={name}", *overrides)
    out = validate(job)
    assert out.launcher.name == name
    assert config_hash(job) == config_hash(make_cfg())  # how jobs are launched is not what they compute


def test_launcher_combines_with_hardware(make_cfg):
    out = validate(make_cfg("hardware=cpu", "launcher=local_parallel"))
    assert out.hardware.device == "cpu" and out.launcher.name == "local_parallel"


def test_launcher_without_name_is_one_line_error(make_cfg):
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.launcher = "fast"
    with pytest.raises(ConfigError, match="launcher must be a preset with a name"):
        validate(cfg)


def test_unknown_or_missing_plugin_is_one_line(tmp_path, cli_env, monkeypatch):
    for arg, want in (("launcher=nope", "unknown launcher 'nope'; available: local, local_parallel"),
                      ("+sweep=nope", "unknown sweep 'nope'; available:")):
        p = subprocess.run([cli(), arg], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and want in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert launch.missing_plugin("launcher", "slurm") == \
        "launcher=slurm needs the hydra_submitit_launcher plugin: pip install 'cl-runner[slurm]'"
    assert "cl-runner[optuna]" in launch.missing_plugin("sweep", "optuna_spacenet")
    assert launch.missing_plugin("launcher", "local") is None


# ------------------------------------------------------------------------------------ thread pinning
def test_threads_are_cores_over_jobs(monkeypatch):
    monkeypatch.setattr(launch, "_plan", launch._plan)  # restored afterwards, as are the variables below
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch, "cores", lambda: 8)
    par = lambda n, threads=0: OmegaConf.create(  # noqa: E731
        {"launcher": {"name": "local_parallel", "n_jobs": n}, "hardware": {"threads": threads}})
    for n, want in ((2, 4), (3, 2), (-1, 1), (-2, 1), (-5, 2), (16, 1)):
        launch.pin_threads(par(n), multirun=True)
        assert launch.planned_threads() == want and os.environ["OMP_NUM_THREADS"] == str(want), n
    launch.pin_threads(par(2, threads=3), multirun=True)  # an explicit hardware.threads wins
    assert launch.planned_threads() == 3 and os.environ["MKL_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    launch.pin_threads(OmegaConf.create({"launcher": {"name": "local"}, "hardware": {"threads": 0}}), multirun=True)
    assert launch.planned_threads() is None and "OMP_NUM_THREADS" not in os.environ  # a lone job: torch's default
    launch.pin_threads(par(2), multirun=False)  # cl-run launcher=local_parallel without -m: one job
    assert launch.planned_threads() is None and "OMP_NUM_THREADS" not in os.environ


def test_lone_job_threads_follow_the_step_width(monkeypatch):
    """A lone job on <= 2 cores runs 1 thread unless a training step is wide (CLNP's 2000-2000 MLP)."""
    import torch

    from cl_runner.train import step_macs

    mlp = lambda *w: torch.nn.Sequential(torch.nn.Flatten(), *[torch.nn.Linear(a, b) for a, b in zip(w, w[1:])])  # noqa: E731
    small = step_macs(mlp(784, 400, 400, 10), (1, 28, 28), 128)
    wide = step_macs(mlp(784, 2000, 2000, 10), (1, 28, 28), 256)
    assert small == 128 * (784 * 400 + 400 * 400 + 400 * 10)
    assert wide == 256 * (784 * 2000 + 2000 * 2000 + 2000 * 10)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 32 * 32, 10))
    assert step_macs(conv, (3, 32, 32), 2) == 2 * (8 * 32 * 32 * 27 + 8 * 32 * 32 * 10)
    for n_cores, macs, want in ((2, small, 1), (2, wide, None), (1, small, 1), (8, small, None)):
        monkeypatch.setattr(launch, "cores", lambda n=n_cores: n)
        assert launch.default_threads(macs) == want, (n_cores, macs)


# ------------------------------------------------------------------------------------------ real runs
def test_local_parallel_runs_jobs_at_once_one_share_each(tmp_path, cli_env):
    need(launch.PLUGINS["local_parallel"])
    run_cl(tmp_path, cli_env, "-m", "launcher=local_parallel", "launcher.n_jobs=2", "seed=0,1", "tracking=local",
           "progress=off", "method.epochs=1")
    sweep_dir, results = sweep_results(tmp_path / "outputs")
    assert len(results) == 2 and all(r["status"] == "finished" for _, r in results)
    want = max(1, launch.cores() // 2)
    assert [r["threads"] for _, r in results] == [want, want]
    for f, _ in results:
        assert f"threads: {want} (cores {launch.cores()} / jobs 2)" in "".join(
            p.read_text() for p in f.parent.glob("*.log"))
    # parallel: each job started before the other finished (results.json is last written at the end)
    spans = [(r["timings"]["start_unix"], f.stat().st_mtime) for f, r in results]
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans


def test_slurm_path_runs_a_job_through_submitit(tmp_path, cli_env):
    need(launch.PLUGINS["slurm_local"])
    run_cl(tmp_path, cli_env, "-m", "launcher=slurm_local", "seed=0", "tracking=local", "progress=off",
           "method.epochs=1")
    sweep_dir, results = sweep_results(tmp_path / "outputs")
    assert len(results) == 1 and results[0][1]["status"] == "finished"
    assert results[0][1]["config"]["launcher"]["name"] == "slurm_local" and results[0][1]["threads"] >= 1
    assert (sweep_dir / ".submitit").is_dir()  # the job went through submitit's pickle / subprocess path


def test_ray_runs_jobs_on_a_private_instance(tmp_path, cli_env):
    need(launch.PLUGINS["ray"])
    env = {k: v for k, v in cli_env.items() if k != "OMP_NUM_THREADS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    run_cl(tmp_path, env, "-m", "launcher=ray", "launcher.address=null", "seed=0,1", "tracking=local",
           "progress=off", "method.epochs=1")
    _, results = sweep_results(tmp_path / "outputs")
    assert len(results) == 2 and all(r["status"] == "finished" for _, r in results)
    assert [r["threads"] for _, r in results] == [1, 1]  # Ray sets OMP_NUM_THREADS to the task's num_cpus


def test_optuna_sweep_end_to_end(tmp_path, cli_env):
    need(launch.SWEEP_PLUGINS["optuna"])
    run_cl(tmp_path, cli_env, "-m", "method=spacenet", "+sweep=optuna_spacenet", "hydra.sweeper.n_trials=2",
           "method.epochs=1", "tracking=local", "progress=off")
    sweep_dir, results = sweep_results(tmp_path / "outputs")
    assert len(results) == 2 and all(r["status"] == "finished" for _, r in results)
    for _, r in results:  # the search space keeps spec <= sel, and ε is one density for every layer
        m = r["config"]["method"]
        assert all(1 <= p <= s for p, s in zip(m["spec"], m["sel"])) and 20 <= m["sel"][0] <= 80
        assert m["budget_unit"] == "selected" and len(set(m["budget"])) == 1
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    accs = [r["metrics"]["final/avg_acc"] for _, r in results]
    assert best["best_value"] == pytest.approx(max(accs))  # the sweeper saw what cl-run returned


def test_optuna_trial_with_an_invalid_draw_fails_and_the_study_goes_on(tmp_path, cli_env):
    """A drawn config that cannot run (sel > layer width) fails its trial in one line, no traceback."""
    need(launch.SWEEP_PLUGINS["optuna"])
    p = run_cl(tmp_path, cli_env, "-m", "method=spacenet", "+sweep=optuna_spacenet", "hydra.sweeper.n_trials=3",
               "method.sel=choice(40,999)", "method.epochs=1", "tracking=local", "progress=off")
    out = p.stdout + p.stderr
    assert "cl-run: error: method.sel=999 exceeds the 400 units" in out and "Traceback" not in out, out
    sweep_dir, results = sweep_results(tmp_path / "outputs")
    assert len(results) == 2 and all(r["config"]["method"]["sel"] == [40, 40] for _, r in results)
    assert len([d for d in sweep_dir.iterdir() if d.is_dir() and d.name[0].isdigit()]) == 3  # the seed draws 999 third
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(r["metrics"]["final/avg_acc"] for _, r in results))


def test_optuna_study_where_every_trial_fails_ends_in_one_line(tmp_path, cli_env):
    """Every drawn config fails: the plugin's "No trials are completed yet" traceback becomes one line, exit 1,
    and the sweep's MLflow parent run is not left RUNNING (no job got as far as a child run: it is deleted)."""
    need(launch.SWEEP_PLUGINS["optuna"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = subprocess.run([cli(), "-m", "method=spacenet", "+sweep=optuna_spacenet", "hydra.sweeper.n_trials=2",
                        "method.sel=choice(998,999)", "method.epochs=1", f"mlflow.uri={uri}", "progress=off"],
                       cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "cl-run: error: no Optuna trial finished (2 drawn" in out and "Traceback" not in out, out
    assert out.count("cl-run: error: method.sel=998 exceeds the 400 units") == 2, out  # each trial said why first
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cl_runner").experiment_id
    assert client.search_runs([exp]) == []  # the parent had no child, so it went
    assert [r.info.status for r in client.search_runs([exp], run_view_type=ViewType.ALL)] == ["FAILED"]
