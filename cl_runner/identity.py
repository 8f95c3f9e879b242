"""Which runs are the same run: derived from the `identity=False` marks on the schemas in config.py.

- `config_hash`: resume and skip_finished match runs on it (results.json, the MLflow tag `config_hash`);
- `is_identity_key`: cl-report groups runs by the identity keys that vary (seed aside, the sample axis);
- `job_dirname_exclude_keys`: Hydra names a sweep job's folder after its identifying overrides only
  (conf/config.yaml interpolates it through the resolver registered in cl_runner/__init__.py).

Nothing here imports torch: a sweep job computes its hash before it pays for torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources

from omegaconf import OmegaConf

from .config import SECTIONS, RunConfig

# conf/launcher/ presets have no schema (their keys feed hydra.launcher): the whole section says how jobs
# are launched, never what they compute
LAUNCHER = "launcher"


def not_identity_keys() -> tuple[str, ...]:
    """Dotted keys that do not change what a run computes (a section name stands for all its keys)."""
    out = [f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("identity") is False]
    for section, schema in SECTIONS.items():
        out += [f"{section}.{f.name}" for f in dataclasses.fields(schema) if f.metadata.get("identity") is False]
    return (*out, LAUNCHER)


def is_identity_key(dotted: str) -> bool:
    """Whether a flattened config key (e.g. "method.lr", "hardware.threads") identifies a run."""
    return not any(dotted == k or dotted.startswith(k + ".") for k in not_identity_keys())


# Keys added to the YAML after runs existed, with the value that computes what those runs computed: at that
# value they are left out of the hash, so a finished run is still found (skip_finished, resume).
ADDED_LATER = {"dataset.resize": 0, "model.dropout_in": 0.0, "model.dropout": 0.0}


def identity(config: dict, prefix: str = "") -> dict:
    """A plain config (nested dicts) without its not-identity keys, nor the ADDED_LATER keys at their old
    value; sections left empty disappear."""
    out = {}
    for k, v in config.items():
        dotted = prefix + str(k)
        if not is_identity_key(dotted) or (dotted in ADDED_LATER and v == ADDED_LATER[dotted]):
            continue
        if isinstance(v, dict):
            v = identity(v, f"{prefix}{k}.")
            if not v:
                continue
        out[k] = v
    return out


def config_hash(cfg) -> str:
    """Hash of the composed config (as Hydra made it, before validation) without the not-identity keys.
    It reads no method schema (that would import torch), so every method / dataset / model key counts."""
    plain = identity(OmegaConf.to_container(cfg, resolve=True))
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def job_dirname_exclude_keys() -> list[str]:
    """Hydra's `override_dirname.exclude_keys`: Hydra matches whole override keys, so a section is listed
    with each of its keys (and by name, for a group choice such as `hardware=cpu`); the launcher presets'
    keys are read from their YAML."""
    import yaml

    keys = list(not_identity_keys())
    keys += [s for s, schema in SECTIONS.items()
             if not any(is_identity_key(f"{s}.{f.name}") for f in dataclasses.fields(schema))]
    for f in (resources.files("cl_runner.conf") / LAUNCHER).iterdir():
        if f.name.endswith(".yaml"):
            keys += [f"{LAUNCHER}.{k}" for k in (yaml.safe_load(f.read_text()) or {}).get(LAUNCHER) or {}]
    # Hydra's own groups: the launcher plugin, and the sweep preset (the same in every job of a sweep; the
    # method keys it sets are in each job's config, hence in its hash)
    return sorted({*keys, "hydra/launcher", "sweep"})


def register_resolver() -> None:
    OmegaConf.register_new_resolver("cl_runner.job_dirname_exclude_keys", job_dirname_exclude_keys, replace=True)
