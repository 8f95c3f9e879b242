"""The keys of each mask-based method (types and ranges; values in conf/method/*.yaml) and the checks
that need more than one key, run by config.validate before anything is built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from ..config import MethodConfig, key
from ..errors import ConfigError


@dataclass
class SpaceNetConfig(MethodConfig):
    init: str = key(choices=("xavier", "model"))
    sel: List[int] = key(ge=0, per_layer="hidden")  # 0 = every free neuron
    spec: List[int] = key(ge=0, per_layer="hidden")
    budget_unit: str = key(choices=("selected", "layer", "count"))
    budget: List[float] = key(gt=0, per_layer="weights")
    rewire: bool = key()
    r: float = key(ge=0, lt=1)
    rewire_output: bool = key()
    rewire_last_epoch: bool = key()
    grow: str = key(choices=("top", "sample"))
    neuron_importance: str = key(choices=("cumulative", "sum"))
    importance_reset: str = key(choices=("task", "epoch"))
    train_bias: str = key(choices=("free", "selected", "none"))
    out_bias: str = key(choices=("task", "seen"))
    set_aside: bool = key()
    rehearsal: bool = key()
    memory: int = key(ge=0)  # stored samples per old task; 0 = all its training data
    figures: bool = key()


def _widths(model_cfg) -> list:
    return [*model_cfg.get("channels", []), *model_cfg.hidden]


def budget_fit(cfg, l: int, n_in: int, n_out: int, total: int, name: str) -> int:
    """n_l for weight layer l (`total` connections, `n_in × n_out` positions between selected neurons);
    a budget that cannot fit those positions is a one-line ConfigError."""
    b, unit = cfg.method.budget[l], cfg.method.budget_unit
    if unit == "count" and b != int(b):
        raise ConfigError(f"method.budget[{l}]={b} must be a whole number of connections (budget_unit=count)")
    if unit != "count" and b > 1:
        raise ConfigError(f"method.budget[{l}]={b} must be a fraction <= 1 (budget_unit={unit})")
    n = int(b) if unit == "count" else max(1, round(b * (total if unit == "layer" else n_in * n_out)))
    if n > n_in * n_out:
        raise ConfigError(f"method.budget[{l}]={b:g} asks for {n} connections in {name} but only "
                          f"{n_in} x {n_out} = {n_in * n_out} positions join its selected neurons "
                          "(lower method.budget or raise method.sel)")
    return n


def check_spacenet(cfg) -> None:
    m, widths = cfg.method, _widths(cfg.model)
    for i, (w, s, p) in enumerate(zip(widths, m.sel, m.spec)):
        if s > w:
            raise ConfigError(f"method.sel={s} exceeds the {w} units of hidden layer {i + 1}")
        if p > (s or w):
            raise ConfigError(f"method.spec={p} exceeds method.sel={s or w} in hidden layer {i + 1}")
    sizes, n_conv = [s or w for s, w in zip(m.sel, widths)], len(cfg.model.get("channels", []))
    for i in range(1, len(widths)):  # the layers whose size needs the data are checked in __init__
        if i != n_conv:
            budget_fit(cfg, i, sizes[i - 1], sizes[i], widths[i - 1] * widths[i], f"weight layer {i + 1}")
    if m.rehearsal and cfg.model.head != "single":
        raise ConfigError("method.rehearsal=true replays old classes: it needs model.head=single")


@dataclass
class CLNPConfig(MethodConfig):
    l1: List[float] = key(ge=0, per_layer="weights")  # λ_l (Sec. 2.2)
    margin: float = key(ge=0)  # m, in accuracy points (absolute) or percent of `best` (relative)
    margin_mode: str = key(choices=("absolute", "relative"))
    threshold: str = key(choices=("per_layer", "shared"))
    scan: str = key(choices=("bisect", "grid"))
    scan_steps: int = key(ge=1)  # validation passes per scanned θ (the scan's bound)
    scan_order: str = key(choices=("last_first", "first_last"))
    activity_split: str = key(choices=("train", "val"))
    reinit_free: bool = key()
    out_bias: str = key(choices=("first_task", "zero"))
    finetune_epochs: int = key(ge=0)
    finetune_lr: float = key(gt=0)
    depleted: str = key(choices=("stop", "transfer"))
    init: str = key(choices=("model", "xavier"))


def check_clnp(cfg) -> None:
    if cfg.dataset.val_fraction <= 0:
        raise ConfigError("method=clnp needs dataset.val_fraction > 0 (the threshold scan runs on the "
                          "validation split; the paper holds out 0.1)")
    if cfg.model.get("activation", "relu") != "relu":
        raise ConfigError(f"method=clnp prunes by mean ReLU activity: it needs model.activation=relu, "
                          f"got {cfg.model.activation}")
    if cfg.method.depleted == "transfer" and cfg.model.head != "multi":
        raise ConfigError("method.depleted=transfer (head-only training once the last hidden layer is "
                          "full) needs model.head=multi")


@dataclass
class NISPAConfig(MethodConfig):
    # `epochs` = e, the epochs of one phase (the release's phase_epochs)
    sparsity: float = key(ge=0, lt=1)  # fraction of every masked layer's connections absent from the start
    dense_first_conv: bool = key()  # the first conv keeps all its (out, in) channel pairs [release]
    a_f: float = key(ge=0)  # accuracy points a phase may lose against the best before the task stops
    k: float = key(gt=0)  # the schedule's step parameter (cosine: phases until p reaches 0)
    p_schedule: str = key(choices=("cosine", "linear", "exp_decay"))
    p_min: float = key(ge=0, lt=100)  # percent: a phase whose p is at or below it ends the task
    min_phases: int = key(ge=1)  # the accuracy stop rule applies after this many phases
    grow: bool = key()
    grow_init: str = key(choices=("normal", "uniform", "zero"))
    rewire: str = key(choices=("full_random", "forward_random", "flow_random"))
    reinit: bool = key()
    init: str = key(choices=("release", "model"))
    replay_memory: int = key(ge=0)  # 0: task-incremental | N: class-IL with N stored samples, output layer unfrozen
    replay_lambda: float = key(ge=0)  # weight of the replayed minibatch's loss


def check_nispa(cfg) -> None:
    if cfg.dataset.val_fraction <= 0:
        raise ConfigError("method=nispa needs dataset.val_fraction > 0 (each phase keeps its best validation "
                          "epoch; the release holds out 0.1)")
    if cfg.model.head != "single" or cfg.dataset.label_mode != "offset":
        raise ConfigError("method=nispa has one shared output layer over all classes: it needs model.head=single "
                          "and dataset.label_mode=offset")
    if cfg.model.get("activation", "relu") != "relu":
        raise ConfigError(f"method=nispa ranks units by mean ReLU activation: it needs model.activation=relu, "
                          f"got {cfg.model.activation}")


# ------------------------------------------------------------- the quadratic-penalty baselines (penalty.py)
@dataclass
class EWCConfig(MethodConfig):
    lam: float = key(ge=0)  # λ: weight of the EWC penalty λ/2 Σ F (θ − θ*)²


@dataclass
class OnlineEWCConfig(EWCConfig):
    gamma: float = key(ge=0, le=1)  # γ: decay of the running Fisher


@dataclass
class SIConfig(MethodConfig):
    c: float = key(ge=0)  # weight of the surrogate loss c Σ Ω (θ − θ*)²
    xi: float = key(gt=0)  # ξ: damping of Ω += W / (Δθ² + ξ)


@dataclass
class MASConfig(MethodConfig):
    lam: float = key(ge=0)  # λ: weight of the MAS penalty λ Σ Ω (θ − θ*)²


@dataclass
class ERConfig(MethodConfig):
    memory: int = key(ge=1)  # stored samples in total, class-balanced (the authors' code: 1000)
    weighting: str = key(choices=("vdv", "sum"))  # vdv: (1/t) current + (1 - 1/t) replayed | sum: + replay_lambda x
    replay_lambda: float = key(ge=0)  # weight of the replayed minibatch's loss with weighting=sum



@dataclass
class LwFConfig(MethodConfig):
    temperature: float = key(gt=0)  # T of the distillation (the 2019 code: 2)
    weighting: str = key(choices=("vdv", "sum"))  # vdv: (1/t) CE + (1 - 1/t) KD | sum: CE + replay_lambda x KD
    replay_lambda: float = key(ge=0)  # weight of the distillation loss with weighting=sum


@dataclass
class ICaRLConfig(MethodConfig):
    memory: int = key(ge=1)  # exemplars in total: memory // (classes seen) per class (the 2019 code: 2000)
    temperature: float = key(gt=0)  # T of the old classes' sigmoid(score / T) targets (the 2019 code: 2)
    herding: bool = key()  # exemplars by herding (iCaRL) | false: a random draw


def check_icarl(cfg) -> None:
    if cfg.model.head != "single" or cfg.method.active_outputs == "task":
        raise ConfigError("method=icarl classifies by the nearest mean of exemplars over every class seen: it is "
                          "class-incremental only (model.head=single, method.active_outputs=seen or all)")


@dataclass
class DGRConfig(MethodConfig):
    targets: str = key(choices=("hard", "soft"))  # replayed labels: the previous model's argmax | its scores (KD)
    temperature: float = key(gt=0)  # T of the distillation with targets=soft (the 2019 code: 2)
    weighting: str = key(choices=("vdv", "sum"))  # vdv: (1/t) current + (1 - 1/t) replayed | sum: + replay_lambda x
    replay_lambda: float = key(ge=0)  # weight of the replayed minibatch's loss with weighting=sum
    z_dim: int = key(ge=1)  # the VAE's latent size (the 2019 code: 100)
    gen_hidden: List[int] = key(ge=1)  # the VAE encoder's hidden widths, mirrored by the decoder (400, 400)
    gen_lr: float = key(gt=0)  # the VAE's Adam learning rate (the 2019 code: the classifier's, 0.001)


def check_dgr(cfg) -> None:
    if cfg.dataset.normalize != "unit":
        raise ConfigError("method=dgr's VAE models pixels in [0, 1] with a per-pixel binary cross-entropy: it needs "
                          f"dataset.normalize=unit (got {cfg.dataset.normalize})")


@dataclass
class HATConfig(MethodConfig):
    s_max: float = key(gt=1)  # the gates' largest scale (the release: 400)
    lamb: float = key(ge=0)  # λ of the attention regulariser (the release: 0.75)
    clipgrad: float = key(gt=0)  # gradient-norm clipping (the release: 10000)
    thres_cosh: float = key(gt=0)  # clamp of s·e inside the compensation's cosh (the release: 50)
    thres_emb: float = key(gt=0)  # embeddings clamped to ±this after each step (the release: 6)
    lr_patience: int = key(ge=1)  # epochs without a better validation loss before lr / lr_factor (5)
    lr_factor: float = key(gt=1)  # (3)
    lr_min: float = key(ge=0)  # training stops when lr falls below it (1e-4)


def check_hat(cfg) -> None:
    if cfg.model.head != "multi":
        raise ConfigError("method=hat gates each task's units by its own embedding and needs the task id: it is "
                          "task-incremental, with a head per task (model.head=multi)")
    if cfg.model.get("activation", "relu") != "relu" or cfg.model.get("batch_norm", False):
        raise ConfigError("method=hat gates units before a ReLU (equal to gating after it) and shares no BatchNorm "
                          "statistics across tasks: it needs model.activation=relu and no batch_norm")


@dataclass
class DGMConfig(MethodConfig):
    masks: str = key(choices=("weights", "channels"))  # plasticity masks on every weight (DGMw) | channel (DGMa)
    nz: int = key(ge=1)  # noise size (the label's one-hot overwrites its first n_classes entries): 128
    ngf: int = key(ge=1)  # generator width: layers 4·ngf, 2·ngf, ngf (DGMw 6, DGMa 20)
    ndf: int = key(ge=1)  # discriminator width: 32
    lr_d: float = key(gt=0)  # Adam lr of the discriminator (2e-3 MNIST)
    lr_g: float = key(gt=0)  # Adam lr of the generator (2e-3 MNIST)
    beta1: float = key(ge=0, lt=1)  # Adam β1 of both (0.5)
    s_max: float = key(gt=1)  # the masks' largest scale (DGMw 1e4, DGMa 1e5)
    lamb: float = key(ge=0)  # λ of the mask-sparsity penalty before growth scaling (DGMw 0.08, DGMa 0.01)
    lambda_adv: float = key(gt=0)  # weight of the generator's adversarial loss (1)
    lambda_gp: float = key(ge=0)  # weight of the WGAN gradient penalty (1)
    aux_g: bool = key()  # also train the generator on the auxiliary head's cross-entropy (the MNIST release: no)
    clipgrad: float = key(gt=0)  # generator gradient-norm clipping (10000)
    thres_cosh: float = key(gt=0)  # clamp of s·e inside the compensation's cosh (50)
    val_every: int = key(ge=1)  # epochs between validations (the release: 2); the best one's classifier is kept


def check_dgm(cfg) -> None:
    d = cfg.dataset
    if d.val_fraction <= 0:
        raise ConfigError(f"method={cfg.method.name} keeps the classifier of its best validation: it needs "
                          "dataset.val_fraction > 0 (the release holds out 0.15)")
    if d.normalize != "symmetric" or d.get("resize", 0) != 32:
        raise ConfigError(f"method={cfg.method.name}'s generator draws 32x32 images through a tanh: it needs "
                          f"dataset.resize=32 and dataset.normalize=symmetric (got {d.get('resize', 0)}, {d.normalize})")
