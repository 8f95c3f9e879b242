"""Config schemas (dataclasses in Hydra's ConfigStore) and validation.

Schemas give types and allowed ranges; the values themselves live in the YAML files under `conf/`.
`validate(cfg)` runs before anything is built: it checks every section against the schema of the
chosen method / dataset / model (wrong type, unknown key, missing key, out-of-range value) and raises
a one-line `ConfigError` naming the key and what is allowed. Keys that take "one number or a
per-layer list" are typed as lists; a scalar is expanded here to one entry per layer.

Run identity is declared here too, once: a key marked `identity=False` says where or how a run runs, never
what it computes. `identity.py` derives from these marks the config hash (resume and skip_finished match
on it), cl-report's rows and Hydra's job folder names (conf/config.yaml).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import ConfigError
from .registry import DATASETS, METHODS, MODELS


def key(*, ge=None, gt=None, le=None, lt=None, choices=None, per_layer=None, default=MISSING, identity=True):
    """A schema field with its allowed range. `per_layer` = "hidden" | "weights" expands a scalar.
    `identity=False`: the key does not change what a run computes (identity.py)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, per_layer=per_layer).items()
            if v is not None}
    if not identity:
        meta["identity"] = False
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------- schemas
@dataclass
class MethodConfig:
    name: str = key()
    optimizer: str = key(choices=("sgd", "adam"))
    lr: float = key(gt=0)
    momentum: float = key(ge=0, lt=1)
    weight_decay: float = key(ge=0)
    epochs: int = key(ge=1)
    batch_size: int = key(ge=1)
    # Keys of the standard loop added later; their defaults here keep the YAML of methods that override the
    # loop (and the hashes of runs made before) valid. The standard-loop methods' YAML files name them.
    steps: int = key(ge=0, default=0)  # minibatches per task, overriding epochs (0 = use epochs)
    active_outputs: str = key(choices=("all", "seen", "task"), default="all")  # output units trained on (Method.active)
    reset_optimizer: bool = key(default=True)  # false: one optimizer for the whole run (its state carries over tasks)


@dataclass
class DatasetConfig:
    name: str = key()
    n_tasks: int = key(ge=1)
    class_order: Any = key()  # "natural" | "shuffle" (seeded) | "vdv" (van de Ven & Tolias's) | explicit list of class ids
    val_fraction: float = key(ge=0, lt=1)
    normalize: str = key(choices=("standard", "unit", "symmetric"))  # symmetric: pixels in [-1, 1] (GANs' tanh)
    label_mode: str = key(choices=("offset", "shared"))
    download: bool = key()  # allow a torchvision download when files are missing
    resize: int = key(ge=0, default=0)  # images resized (bilinear) to resize x resize; 0 = as stored (added later)


@dataclass
class PermutedConfig(DatasetConfig):
    permute_first: bool = key()  # False: task 0 is plain MNIST


@dataclass
class EFMnistConfig(DatasetConfig):
    classes_per_task: List[int] = key(ge=1)  # task sizes in class order; must add up to 57 (NISPA: 10, 13, 13, 11, 10)


@dataclass
class ModelConfig:
    name: str = key()
    head: str = key(choices=("single", "multi"))


@dataclass
class MLPConfig(ModelConfig):
    hidden: List[int] = key(ge=1)
    activation: str = key(choices=("relu", "tanh", "sigmoid", "gelu"))
    # dropout on the inputs and after each hidden layer's activation (HAT's MLP: 0.2 and 0.5); added later,
    # so the defaults live here and not in conf/model/mlp.yaml (the hashes of earlier runs stay)
    dropout_in: float = key(ge=0, lt=1, default=0.0)
    dropout: float = key(ge=0, lt=1, default=0.0)


@dataclass
class CNNConfig(ModelConfig):
    channels: List[int] = key(ge=1)  # the four conv widths (Zenke et al.: 32, 32, 64, 64)
    hidden: List[int] = key(ge=1)  # dense layers after the convs (Zenke et al.: 512)
    dropout_conv: float = key(ge=0, lt=1)
    dropout_dense: float = key(ge=0, lt=1)


@dataclass
class NispaCNNConfig(ModelConfig):
    channels: List[int] = key(ge=1)  # the four conv widths (NISPA: 64, 64, 128, 128)
    hidden: List[int] = key(ge=1)  # dense layers after the convs (NISPA: 1024)


@dataclass
class CNNWideConfig(ModelConfig):
    channels: List[int] = key(ge=1)  # the five conv widths (Golkar et al. Tab. 3: 128, 256, 512, 1024, 2048)
    batch_norm: bool = key()  # BatchNorm between each of convs 1-5 and its ReLU (the paper: yes)


# Where and how a run runs. The device, its thread count and matmul precision change float rounding, not
# the experiment: a run resumed or skipped on another machine is the same run, and cl-report averages CPU
# and GPU seeds in one row. (Runs are bit-identical only on the same device and thread count.)
@dataclass
class HardwareConfig:
    device: str = key(choices=("auto", "cpu", "cuda"), identity=False)
    threads: int = key(ge=0, identity=False)  # 0 = leave torch's default
    deterministic: bool = key(identity=False)
    matmul_precision: str = key(choices=("highest", "high", "medium"), identity=False)
    # a step's independent halves on two threads, same bits (methods/overlap.py; DGR); auto: a CPU with a core spare
    overlap: str = key(choices=("auto", "always", "never"), default="auto", identity=False)


@dataclass
class PathsConfig:  # the same data in another folder is the same data
    outputs: str = key(identity=False)
    data: str = key(identity=False)
    cache: str = key(identity=False)


@dataclass
class MlflowConfig:  # where results are logged
    experiment: str = key(identity=False)
    uri: Optional[str] = key(identity=False)  # null: $MLFLOW_TRACKING_URI, else sqlite:///<outputs>/mlflow.db
    connect_timeout_s: float = key(gt=0, le=30, identity=False)


@dataclass
class EvalConfig:
    batch_size: int = key(ge=1, identity=False)  # memory only: each test image's logits do not depend on it
    fwt: bool = key()  # also evaluate each task before it is trained, against a random-init reference
    # task counts k whose class-IL average after task k is also a final metric, final/A<k> (DGM's A5, A10)
    after: List[int] = key(ge=1, default=[], identity=False)


@dataclass
class RunConfig:
    seed: int = key(ge=0)  # identifies the run; cl-report averages over it
    tracking: str = key(choices=("mlflow", "local"), identity=False)
    resume: Any = key(identity=False)  # false | true (newest unfinished run with this config) | a run folder
    progress: str = key(choices=("auto", "bar", "log", "off"), identity=False)
    checkpoint: bool = key(identity=False)  # write checkpoint.pt at every task boundary
    skip_finished: bool = key(identity=False)  # multirun: skip a job whose config already has a finished run
    # what to do when the training loss stops being finite; a run that stays finite computes the same either
    # way, and a stopped run may be resumed with `continue`, so it is not part of the identity
    on_nonfinite: str = key(choices=("stop", "continue"), identity=False)


# top-level sections besides method / dataset / model, each with its own schema
SECTIONS = {"paths": PathsConfig, "mlflow": MlflowConfig, "eval": EvalConfig, "hardware": HardwareConfig}
# conf/launcher/ presets have no schema (their keys feed hydra.launcher): the whole section says how jobs
# are launched, never what they compute
UNCHECKED_SECTIONS_NOT_IDENTITY = ("launcher",)



def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore as `schema/<group>/<name>` (for --info and tooling)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run", node=RunConfig, group="schema")
    for name, schema in SECTIONS.items():
        cs.store(name=name, node=schema, group="schema")
    for group, reg in (("method", METHODS), ("dataset", DATASETS), ("model", MODELS)):
        reg.load_all()
        for name, obj in reg.items():
            cs.store(name=name, node=obj.schema, group=f"schema/{group}")


# ------------------------------------------------------------------------------------- validation
def _range_text(meta: dict) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    parts = [f"{op} {meta[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in meta]
    return " and ".join(parts)


def _in_range(v, meta: dict) -> bool:
    if "choices" in meta:
        return v in meta["choices"]
    return not (("gt" in meta and not v > meta["gt"]) or ("ge" in meta and not v >= meta["ge"])
                or ("lt" in meta and not v < meta["lt"]) or ("le" in meta and not v <= meta["le"]))


def layer_counts(model_cfg: DictConfig) -> dict:
    # fully convolutional models (cnn_wide) have no `hidden` key
    n_hidden = len(model_cfg.get("hidden", [])) + (len(model_cfg.channels) if "channels" in model_cfg else 0)
    return {"hidden": n_hidden, "weights": n_hidden + 1}


def check_section(prefix: str, schema: type, node: Any, layers: Optional[dict] = None) -> DictConfig:
    """Merge `node` into `schema`; return the typed section or raise a one-line ConfigError."""
    prefix = f"{prefix}." if prefix else ""  # top-level keys have no section prefix
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{prefix[:-1]} must be a mapping, got {node!r}")
    node = node.copy()
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for name in node.keys():
        if name not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{prefix}{name} is not a known key (known keys: {known})")
    # a scalar given for a per-layer key becomes a one-element list, expanded below
    for name, f in fields.items():
        if f.metadata.get("per_layer") and name in node and not isinstance(node[name], ListConfig):
            node[name] = [node[name]]
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node)
    except ConfigKeyError as e:
        raise ConfigError(f"{prefix}{e.key} is not a known key") from None
    except OmegaConfBaseException as e:
        name = str(e.full_key).split(".")[0].split("[")[0]
        value = node[name] if name in node else None
        want = fields[name].type if name in fields else "another type"
        raise ConfigError(f"{prefix}{name}={value!r} has the wrong type (expected {want})") from None
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required but not set")
    for name, f in fields.items():
        meta, value = f.metadata, typed[name]
        if isinstance(value, DictConfig):
            continue  # nested sections are checked on their own
        values = list(value) if isinstance(value, ListConfig) else [value]
        if meta.get("per_layer") and layers is not None:
            want = layers[meta["per_layer"]]
            if len(values) == 1:
                values = values * want
                typed[name] = values
            elif len(values) != want:
                raise ConfigError(f"{prefix}{name} has {len(values)} entries but the model has {want} "
                                  f"{meta['per_layer']} layers (give one number or one per layer)")
        for v in values:
            if meta and v is not None and not _in_range(v, meta):
                raise ConfigError(f"{prefix}{name}={v!r} is out of range (must be {_range_text(meta)})")
    return typed


def validate(cfg: DictConfig) -> DictConfig:
    """Check the whole composed config; return a typed, per-layer-expanded copy with absolute paths."""
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key or 'config'}: {str(e).splitlines()[0]}") from None
    for section in ("method", "dataset", "model"):
        if section not in cfg or "name" not in cfg[section]:
            raise ConfigError(f"{section}.name is required")
    model_cls = MODELS.get(cfg.model.name)
    dataset_cls = DATASETS.get(cfg.dataset.name)
    method_cls = METHODS.get(cfg.method.name)

    top = {k: v for k, v in cfg.items() if k not in ("method", "dataset", "model", "launcher", *SECTIONS)}
    # conf/launcher/: each preset has its own keys (they feed hydra.launcher), so only the name is checked
    launcher = cfg.get("launcher")
    if launcher is not None and not (isinstance(launcher, DictConfig) and isinstance(launcher.get("name"), str)):
        raise ConfigError(f"launcher must be a preset with a name (launcher=local|local_parallel|slurm|ray), "
                          f"got {launcher!r}")
    sections = {"config": check_section("", RunConfig, OmegaConf.create(top))}
    for name, schema in SECTIONS.items():
        if name not in cfg:
            raise ConfigError(f"the {name} section is missing from the config")
        sections[name] = check_section(name, schema, cfg[name])
    sections["model"] = check_section("model", model_cls.schema, cfg.model)
    sections["dataset"] = check_section("dataset", dataset_cls.schema, cfg.dataset)
    sections["method"] = check_section("method", method_cls.schema, cfg.method, layer_counts(sections["model"]))

    for name in ("outputs", "data", "cache"):
        sections["paths"][name] = str(Path(sections["paths"][name]).expanduser().resolve())
    out = OmegaConf.create(OmegaConf.to_container(sections.pop("config")))
    for name, node in sections.items():
        out[name] = OmegaConf.to_container(node)
    if launcher is not None:
        out["launcher"] = OmegaConf.to_container(launcher)
    # cross-section checks owned by the components themselves
    for obj in (dataset_cls, model_cls, method_cls):
        check = getattr(obj, "check_config", None)
        if check is not None:
            check(out)
    if out.resume is not True and out.resume not in (False, None) and not isinstance(out.resume, str):
        raise ConfigError(f"resume={out.resume!r} must be false, true or a run folder")
    OmegaConf.set_struct(out, True)
    return out
