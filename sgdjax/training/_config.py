"""Training configuration: one validated dataclass, the presets, and the optimizer it describes.

Every hyperparameter of a run is a field of :class:`Config`, with its help text beside
it (``experiments/cifar.py`` derives its flags from these fields). A preset is a
``Config`` value. ``Config`` checks every field when it is built, so library users,
``compare.py`` and the command line get the same errors.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgdjax
from sgdjax import schedules
from sgdjax.training._weight_averaging import swa_every_epoch

OPTIMIZERS = ("sgd", "sgdw", "lars", "schedule_free", "asgd", "muon", "adam", "adamw", "nadam",
              "adagrad")  # fmt: skip
SCHEDULES = ("constant", "cosine", "onecycle", "triangle", "step", "multistep", "exponential")
MODEL_NAMES = ("convnet", "resnet9", "resnet18", "speednet")
APIS = ("linen", "nnx")
PARALLEL_MODES = ("none", "pmap", "sharded", "shard_map", "zero")
FLIPS = ("none", "random", "alternating")
TTA_MODES = ("none", "flip", "flip_shift")
UNITS = ("torch", "airbench")
PLACEMENTS = ("auto", "device", "host")
MAX_EPOCHS = 1_000_000
MAX_SEED = 2**32 - 1  # jax.random.key takes seeds up to 2**63 - 1; uint32 keeps them portable
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ConfigError(ValueError):
    """A :class:`Config` field out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.detail = message


def _field(default: Any, help: str, **metadata: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run (written into ``summary.json``).

    Built values are checked in ``__post_init__``: a field out of range raises a
    :class:`ConfigError` (a ``ValueError``) naming the field and the value. Derive a
    variant with ``dataclasses.replace(config, field=value)`` (checked again).
    """

    # ------------------------------------------------------------ model
    model: str = _field("convnet", "network", choices=MODEL_NAMES)
    api: str = _field(
        "linen", "Flax API of the model: linen, or nnx (convnet's NNX twin, same initial weights)",
        choices=APIS,
    )  # fmt: skip
    widths: tuple[int, ...] | None = _field(
        None, "channels per stage (convnet: 2 values, default 32 64; speednet: 3, 64 256 256)"
    )
    bf16: bool = _field(False, "compute in bfloat16 (parameters stay float32)")
    whiten: bool = _field(
        False, "a frozen 2x2 whitening convolution, computed from training patches, in front"
    )
    whiten_images: int = _field(5000, "training images the whitening kernel is computed from")
    whiten_eps: float = _field(5e-4, "added to the patch covariance's eigenvalues (whitening)")
    whiten_bias_epochs: float | None = _field(
        None, "epochs the whitening bias trains (then frozen); unset: the whole run"
    )
    # ------------------------------------------------------------ data and augmentation
    train_subset: int | None = _field(None, "use a fixed random subset of N training images")
    test_subset: int | None = _field(None, "use a fixed random subset of N test images")
    flip: str = _field(
        "random", "horizontal flips: random per image, or alternating epoch by epoch",
        choices=FLIPS,
    )  # fmt: skip
    crop_padding: int = _field(4, "random crops of the zero-padded image (0: none)")
    translate: int = _field(0, "random shifts by up to N pixels, reflection padding (0: none)")
    # ------------------------------------------------------------ optimization
    epochs: float = _field(10, "epochs to train (fractions allowed: the last epoch is partial)")
    batch_size: int = _field(128, "training examples per step (over all devices)")
    optimizer: str = _field("sgd", "optimizer", choices=OPTIMIZERS)
    learning_rate: float = _field(0.05, "peak learning rate (see --hyperparameter-units)")
    momentum: float = _field(
        0.9, "momentum (schedule_free: its b1; muon: of the non-matrix parameters; asgd, "
        "adam family: unused)"
    )  # fmt: skip
    nesterov: bool = _field(True, "Nesterov momentum (sgd, sgdw, lars, muon's non-matrix part)")
    dampening: float = _field(0.0, "momentum dampening (sgd, sgdw)")
    weight_decay: float = _field(5e-4, "weight decay (see --hyperparameter-units)")
    hyperparameter_units: str = _field(
        "torch",
        "torch: learning rate and decay as torch.optim takes them; airbench: per 1024 "
        "examples with momentum's gain 1/(1-m) divided out (keeps the dynamics when the "
        "batch size or momentum change)",
        choices=UNITS,
    )
    bias_scaler: float = _field(
        1.0, "BatchNorm biases get this times the learning rate and 1/this the decay (sgd, sgdw)"
    )
    schedule: str = _field("onecycle", "learning-rate schedule", choices=SCHEDULES)
    pct_start: float = _field(
        0.25, "onecycle and triangle: fraction of the run spent rising to the peak"
    )
    triangle_start: float = _field(0.2, "triangle: first learning rate, as a fraction of the peak")
    triangle_end: float = _field(0.07, "triangle: last learning rate, as a fraction of the peak")
    step_gamma: float = _field(
        0.1, "step: factor at 1/3 and 2/3 of the run; multistep: at 1/2 and 3/4"
    )
    exponential_final: float = _field(
        0.01,
        "exponential: the last learning rate as a fraction of the first (above 1: growth, "
        "as in the learning-rate range test)",
    )
    warmup_fraction: float = _field(
        0.05, "schedule_free: fraction of the run warming up linearly from 0"
    )
    trust_coefficient: float = _field(0.02, "lars: trust coefficient")
    asgd_lambd: float = _field(
        1e-4, "asgd: lambd of torch's ASGD, the step size lr / (1 + lambd lr t) ** alpha"
    )
    asgd_alpha: float = _field(0.75, "asgd: alpha, the power of the step-size decay")
    asgd_start: float = _field(
        0.5,
        "asgd: fraction of the run's steps after which the iterates are averaged (torch's "
        "t0); scored at the average, BatchNorm statistics recomputed",
    )
    muon_learning_rate: float = _field(
        0.02,
        "muon: peak learning rate of the matrix parameters (conv and dense kernels, "
        "ndim >= 2); the others take Nesterov SGD at learning_rate",
    )
    muon_momentum: float = _field(0.95, "muon: momentum of the matrix parameters")
    muon_weight_decay: float = _field(
        0.0, "muon: decoupled weight decay of the matrix parameters (times their rate)"
    )
    clip_norm: float | None = _field(None, "clip gradients by this global norm")
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy")
    lookahead_period: int | None = _field(
        None, "lookahead on weights and BatchNorm statistics every N steps (unset: off)"
    )
    lookahead_decay: float = _field(
        0.5, "lookahead: the slow weights keep this fraction at each synchronisation"
    )
    lookahead_decay_power: float = _field(
        0.0, "lookahead: the kept fraction grows as decay * (step / total steps) ** power"
    )
    accumulate: int = _field(1, "micro-batches per update (gradient accumulation)")
    sam_rho: float | None = _field(None, "sharpness-aware minimization radius (unset: off)")
    ema_decay: float | None = _field(
        None, "keep a moving average of weights and BatchNorm statistics; evaluate it"
    )
    swa_start: float | None = _field(
        None,
        "stochastic weight averaging after this fraction of the epochs (first whole epoch "
        "at or after it): the weights at each later epoch end averaged, the rate annealed "
        "to swa_lr, scored at the average with BatchNorm statistics recomputed (unset: off)",
    )
    swa_lr: float = _field(
        0.01, "SWA: the learning rate held after swa_start (torch's SWALR; torch's units)"
    )
    swa_anneal_epochs: float = _field(
        1.0, "SWA: epochs of the cosine anneal from the schedule's rate to swa_lr"
    )
    diagnostics: bool = _field(False, "log per-layer gradient/update norms, draw diagnostics.png")
    max_bad_steps: int = _field(20, "stop after N non-finite steps in a row")
    # ------------------------------------------------------------ evaluation
    eval_batch_size: int = _field(1000, "test examples per evaluation batch")
    tta: str = _field(
        "none",
        "test-time augmentation: flip averages each image with its mirror image; "
        "flip_shift adds one-pixel shifts (six views)",
        choices=TTA_MODES,
    )
    eval_every: int = _field(1, "evaluate every N epochs (0: only after the last)")
    # ------------------------------------------------------------ run
    seed: int = _field(0, "seed of initialisation, data order and augmentation")
    max_steps: int | None = _field(None, "limit steps per epoch (smoke tests)")
    checkpoint_every: int = _field(1, "epochs between checkpoints (0: only after the last)")
    checkpoint_every_steps: int = _field(
        0, "also checkpoint every N global steps, mid-epoch too (0: only per epoch)"
    )
    steps_per_call: int | None = _field(
        None, "training steps per compiled program (unset: 1 on CPUs, a whole epoch elsewhere)"
    )
    data_placement: str = _field(
        "auto",
        "device: the uint8 data set lives on the devices; host: batches are fed from the "
        "host; auto: device when the data take under a quarter of the device memory",
        choices=PLACEMENTS,
    )
    parallel: str = _field("none", "data-parallel mode", choices=PARALLEL_MODES)
    num_devices: int | None = _field(None, "devices to use (unset: all)")
    tensorboard: bool = _field(True, "write TensorBoard scalars into the output folder")

    def __post_init__(self):
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(self.widths))  # lists from CLI or JSON
        _check(self)

    @property
    def total_epochs(self) -> int:
        """Epochs the run touches (the last may be partial)."""
        return math.ceil(self.epochs)


# ---------------------------------------------------------------- validation


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check(config: Config) -> None:
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        value = getattr(config, field.name)
        choices = field.metadata.get("choices")
        hint = hints[field.name]
        optional = value is None and type(None) in typing.get_args(hint)
        if optional:
            continue
        if choices is not None and value not in choices:
            raise ConfigError(field.name, f"must be one of {', '.join(choices)}, got {value!r}")
        base = hint if typing.get_origin(hint) is None else typing.get_args(hint)[0]
        if base is bool and not isinstance(value, bool):
            raise ConfigError(field.name, f"must be true or false, got {value!r}")
        if base is int and not _is_int(value):
            raise ConfigError(field.name, f"must be an integer, got {value!r}")
        if base is float:
            if not _is_real(value):
                raise ConfigError(field.name, f"must be a number, got {value!r}")
            if not abs(float(value)) <= FLOAT32_MAX:
                raise ConfigError(field.name, f"must be a finite float32 number, got {value!r}")

    def need(condition: bool, name: str, message: str) -> None:
        if not condition:
            raise ConfigError(name, f"{message}, got {getattr(config, name)!r}")

    positive_ints = ("batch_size", "eval_batch_size", "accumulate", "max_bad_steps",
                     "whiten_images")  # fmt: skip
    for name in positive_ints:
        need(getattr(config, name) > 0, name, "must be positive")
    for name in ("train_subset", "test_subset", "max_steps", "steps_per_call", "num_devices",
                 "lookahead_period"):  # fmt: skip
        value = getattr(config, name)
        need(value is None or value > 0, name, "must be positive")
    need(config.epochs > 0, "epochs", "must be positive")
    need(config.epochs <= MAX_EPOCHS, "epochs", f"must be at most {MAX_EPOCHS}")
    need(0 <= config.seed <= MAX_SEED, "seed", f"must lie in [0, {MAX_SEED}]")
    need(config.learning_rate > 0, "learning_rate", "must be a positive number")
    need(0 <= config.momentum < 1, "momentum", "must lie in [0, 1)")
    need(0 <= config.dampening <= 1, "dampening", "must lie in [0, 1]")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(config.bias_scaler > 0, "bias_scaler", "must be positive")
    need(0 < config.pct_start < 1, "pct_start", "must lie in (0, 1)")
    need(config.triangle_start >= 0, "triangle_start", "must be >= 0")
    need(config.triangle_end >= 0, "triangle_end", "must be >= 0")
    need(0 < config.step_gamma <= 1, "step_gamma", "must lie in (0, 1]")
    need(config.exponential_final > 0, "exponential_final", "must be positive")
    need(0 <= config.warmup_fraction < 1, "warmup_fraction", "must lie in [0, 1)")
    need(config.trust_coefficient > 0, "trust_coefficient", "must be positive")
    need(config.asgd_lambd >= 0, "asgd_lambd", "must be >= 0")
    need(config.asgd_alpha >= 0, "asgd_alpha", "must be >= 0")
    need(0 <= config.asgd_start < 1, "asgd_start", "must lie in [0, 1)")
    need(config.muon_learning_rate > 0, "muon_learning_rate", "must be positive")
    need(0 <= config.muon_momentum < 1, "muon_momentum", "must lie in [0, 1)")
    need(config.muon_weight_decay >= 0, "muon_weight_decay", "must be >= 0")
    need(config.swa_lr > 0, "swa_lr", "must be positive")
    need(config.swa_anneal_epochs >= 0, "swa_anneal_epochs", "must be >= 0")
    _check_averaging(config)
    need(config.clip_norm is None or config.clip_norm > 0, "clip_norm", "must be positive")
    need(0 <= config.label_smoothing < 1, "label_smoothing", "must lie in [0, 1)")
    need(0 <= config.lookahead_decay < 1, "lookahead_decay", "must lie in [0, 1)")
    need(config.lookahead_decay_power >= 0, "lookahead_decay_power", "must be >= 0")
    need(config.sam_rho is None or config.sam_rho > 0, "sam_rho", "must be positive")
    need(config.ema_decay is None or 0 <= config.ema_decay < 1, "ema_decay", "must lie in [0, 1)")
    need(config.crop_padding >= 0, "crop_padding", "must be >= 0")
    need(config.translate >= 0, "translate", "must be >= 0")
    need(config.eval_every >= 0, "eval_every", "must be >= 0")
    need(config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
    need(config.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0")
    need(config.whiten_eps > 0, "whiten_eps", "must be positive")
    need(
        config.whiten_bias_epochs is None or config.whiten_bias_epochs >= 0,
        "whiten_bias_epochs", "must be >= 0",
    )  # fmt: skip
    if config.widths is not None:
        expected = {"convnet": 2, "speednet": 3}.get(config.model)
        need(expected is not None, "widths", f"applies to convnet and speednet, not {config.model}")
        need(
            len(config.widths) == expected and all(_is_int(w) and w > 0 for w in config.widths),
            "widths", f"must be {expected} positive integers for {config.model}",
        )  # fmt: skip
    if config.api == "nnx" and (config.model != "convnet" or config.whiten):
        raise ConfigError("api", f"nnx applies to convnet without whiten, not {config.model}"
                          f"{' with whiten' if config.whiten else ''}")  # fmt: skip
    if config.optimizer in ("sgd", "sgdw", "lars", "muon") and config.nesterov:
        if config.momentum == 0 or (config.optimizer != "lars" and config.dampening != 0):
            raise ConfigError(
                "nesterov",
                "needs momentum > 0 and dampening 0 "
                f"(got momentum {config.momentum}, dampening {config.dampening})",
            )
    if config.sam_rho is not None and config.accumulate > 1:
        raise ConfigError("sam_rho", "cannot be combined with accumulate > 1")
    need(
        config.batch_size % config.accumulate == 0,
        "batch_size", f"must be divisible by accumulate {config.accumulate}",
    )  # fmt: skip
    grouped = config.whiten or config.bias_scaler != 1
    if grouped and config.optimizer not in ("sgd", "sgdw"):
        raise ConfigError(
            "optimizer",
            f"must be sgd or sgdw with whiten or bias_scaler != 1, got {config.optimizer!r}",
        )
    if config.hyperparameter_units == "airbench" and config.optimizer not in ("sgd", "sgdw"):
        raise ConfigError(
            "hyperparameter_units", f"airbench applies to sgd and sgdw, not {config.optimizer}"
        )
    learning_rate, weight_decay = sgd_hyperparameters(config)
    growth = max(config.bias_scaler, 1.0)
    if config.schedule == "exponential":
        growth *= max(config.exponential_final, 1.0)
    if not (learning_rate * growth <= FLOAT32_MAX):
        raise ConfigError("learning_rate", f"is not finite in float32: {config.learning_rate!r}")
    if not weight_decay <= FLOAT32_MAX:
        raise ConfigError("weight_decay", f"is not finite in float32: {config.weight_decay!r}")


def _check_averaging(config: Config) -> None:
    """ASGD and SWA: a start that leaves epochs to average, and no second average."""
    if config.optimizer == "asgd" or config.swa_start is not None:
        if config.api != "linen":
            name = "optimizer" if config.swa_start is None else "swa_start"
            raise ConfigError(name, "needs api linen (BatchNorm statistics are recomputed "
                              f"for the averaged weights), got api {config.api!r}")  # fmt: skip
    if config.swa_start is None:
        return
    if not 0 < config.swa_start < 1:
        raise ConfigError("swa_start", f"must lie in (0, 1), got {config.swa_start!r}")
    if swa_start_epoch(config) >= config.total_epochs:
        raise ConfigError(
            "swa_start",
            f"leaves no epoch to average: {config.swa_start!r} of {config.epochs!r} epochs "
            f"starts at epoch {swa_start_epoch(config)}",
        )
    averaging = {
        "ema_decay": config.ema_decay is not None,
        "lookahead_period": config.lookahead_period is not None,
        f"optimizer {config.optimizer}": config.optimizer in ("asgd", "schedule_free"),
    }
    clashes = [name for name, used in averaging.items() if used]
    if clashes:
        raise ConfigError("swa_start", f"cannot be combined with {', '.join(clashes)} (each "
                          "scores other weights than the trajectory's)")  # fmt: skip


# ---------------------------------------------------------------- optimizer


def swa_start_epoch(config: Config) -> int:
    """The whole epochs before SWA: ``ceil(swa_start * epochs)``; the weights at the ends
    of the later epochs are averaged."""
    return math.ceil(config.swa_start * config.epochs)


def asgd_t0(config: Config, total_steps: int) -> int:
    """ASGD's ``t0``: the iterates after step ``int(asgd_start * total_steps)`` are averaged."""
    return int(config.asgd_start * total_steps)


def sgd_hyperparameters(config: Config) -> tuple[float, float]:
    """``(learning rate, weight decay)`` in torch's units, whatever ``config``'s units.

    With ``airbench`` units, for the mean loss and torch's coupled decay
    (``g + wd * p`` before momentum), with ``k = 1 + 1 / (1 - m)``::

        lr = learning_rate * (batch_size / 1024) / k
        wd = weight_decay / learning_rate

    airbench94 hands torch ``lr_a = learning_rate / (1024 k)`` and
    ``weight_decay = (weight_decay * batch_size / (1024 k)) / lr_a`` on the summed
    loss; dividing its gradient by the batch size gives the two lines above.
    """
    if config.hyperparameter_units == "torch":
        return float(config.learning_rate), float(config.weight_decay)
    gain = 1.0 + 1.0 / (1.0 - config.momentum)
    return (
        config.learning_rate * config.batch_size / 1024 / gain,
        config.weight_decay / config.learning_rate,
    )


def make_schedule(config: Config, total_steps: int) -> sgdjax.Schedule:
    """The learning-rate schedule over the whole run, in optimizer steps."""
    total = max(1, total_steps)
    lr, _ = sgd_hyperparameters(config)
    if config.optimizer == "schedule_free":  # a warm-up only: the averaging replaces decay
        warmup_steps = max(1, int(config.warmup_fraction * total))
        return schedules.warmup(schedules.constant(lr), warmup_steps, start_factor=0.0)
    if config.schedule == "constant":
        return schedules.constant(lr)
    if config.schedule == "cosine":
        return schedules.cosine_annealing(lr, t_max=total)
    if config.schedule == "onecycle":  # one_cycle needs a few steps for its three phases
        return schedules.one_cycle(lr, total_steps=max(total, 8), pct_start=config.pct_start)
    if config.schedule == "triangle":
        knots = jnp.asarray([0.0, float(int(config.pct_start * total)), float(total)], jnp.float32)
        values = jnp.asarray([config.triangle_start, 1.0, config.triangle_end], jnp.float32)
        return lambda count: lr * jnp.interp(jnp.asarray(count, jnp.float32), knots, values)
    if config.schedule == "step":
        return schedules.step_decay(lr, step_size=max(1, total // 3), gamma=config.step_gamma)
    if config.schedule == "multistep":
        milestones = sorted({max(1, total // 2), max(2, 3 * total // 4)})
        return schedules.multistep_decay(lr, milestones=milestones, gamma=config.step_gamma)
    return schedules.exponential_decay(lr, gamma=config.exponential_final ** (1.0 / total))


def label_params(params: Any) -> Any:
    """Parameter groups: ``frozen`` (whitening kernel), ``whiten_bias``, ``norm_bias``
    (BatchNorm biases) and ``other``."""

    def label(path, _):
        names = [str(getattr(entry, "key", entry)) for entry in path]
        if names[0] == "whiten":
            return "frozen" if names[-1] == "kernel" else "whiten_bias"
        module = names[-2] if len(names) > 1 else ""
        if names[-1] == "bias" and (module.startswith("norm") or module.startswith("BatchNorm")):
            return "norm_bias"
        return "other"

    return jax.tree_util.tree_map_with_path(label, params)


def matrix_labels(params: Any) -> Any:
    """Muon's parameter groups: ``muon`` for leaves with two or more axes (conv and dense
    kernels), ``sgd`` for the rest (biases, BatchNorm scales and offsets)."""
    return jax.tree.map(lambda leaf: "muon" if jnp.ndim(leaf) >= 2 else "sgd", params)


def _muon_optimizer(config: Config, lr: Callable, weight_decay: float):
    """Muon on the matrices (Flax's kernels are ``(..., in, out)``: ``matrix_layout=
    "in_out"`` views a 3x3 conv kernel as the ``(9 in, out)`` matrix) at
    ``muon_learning_rate`` times the schedule's shape; Nesterov SGD on the rest."""
    ratio = config.muon_learning_rate / config.learning_rate
    return sgdjax.multi_transform(
        {
            "muon": sgdjax.muon(
                lambda count: ratio * lr(count), weight_decay=config.muon_weight_decay,
                momentum=config.muon_momentum, matrix_layout="in_out",
            ),
            "sgd": sgdjax.sgd(lr, momentum=config.momentum, dampening=config.dampening,
                              nesterov=config.nesterov, weight_decay=weight_decay),
        },
        matrix_labels,
    )  # fmt: skip


def _base_optimizer(config: Config, schedule: Callable, weight_decay: float, scale: float = 1.0,
                    total_steps: int = 0):  # fmt: skip
    lr = schedule if scale == 1.0 else (lambda count: scale * schedule(count))
    options = dict(momentum=config.momentum, dampening=config.dampening,
                   nesterov=config.nesterov, weight_decay=weight_decay)  # fmt: skip
    if config.optimizer == "sgd":
        return sgdjax.sgd(lr, **options)
    if config.optimizer == "sgdw":
        return sgdjax.sgdw(lr, **options)
    if config.optimizer == "lars":
        return sgdjax.lars(
            lr, momentum=config.momentum, weight_decay=weight_decay, nesterov=config.nesterov,
            trust_coefficient=config.trust_coefficient,
            weight_decay_mask=sgdjax.exclude_bias_and_norm,
            trust_ratio_mask=sgdjax.exclude_bias_and_norm,
        )  # fmt: skip
    if config.optimizer == "schedule_free":
        return sgdjax.schedule_free_sgd(lr, b1=config.momentum, weight_decay=weight_decay)
    if config.optimizer == "asgd":
        return sgdjax.asgd(lr, lambd=config.asgd_lambd, alpha=config.asgd_alpha,
                           t0=asgd_t0(config, total_steps), weight_decay=weight_decay)  # fmt: skip
    if config.optimizer == "muon":
        return _muon_optimizer(config, lr, weight_decay)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    optax_optimizer = {"adam": optax.adam, "nadam": optax.nadam, "adagrad": optax.adagrad}
    return sgdjax.chain(
        sgdjax.add_decayed_weights(weight_decay), optax_optimizer[config.optimizer](lr)
    )


def _grouped_optimizer(config: Config, schedule: Callable, steps_per_epoch: int):
    """The parameter groups of the speed run: frozen whitening kernel, whitening bias
    trained for ``whiten_bias_epochs``, BatchNorm biases at ``bias_scaler`` x the rate."""
    _, weight_decay = sgd_hyperparameters(config)
    scaler = config.bias_scaler
    whiten_steps = None
    if config.whiten_bias_epochs is not None:
        whiten_steps = int(config.whiten_bias_epochs * steps_per_epoch)

    def whiten_schedule(count):
        value = schedule(count)
        return value if whiten_steps is None else jnp.where(count < whiten_steps, value, 0.0)

    return sgdjax.multi_transform(
        {
            "other": _base_optimizer(config, schedule, weight_decay),
            "norm_bias": _base_optimizer(config, schedule, weight_decay / scaler, scale=scaler),
            "whiten_bias": _base_optimizer(config, whiten_schedule, weight_decay),
            "frozen": optax.set_to_zero(),
        },
        label_params,
    )


def _swa_schedule(config: Config, schedule: Callable, steps_per_epoch: int) -> Callable:
    """torch's SWA recipe: ``schedule`` for the epochs before ``swa_start``, then SWALR
    from the rate reached there to ``swa_lr`` over ``swa_anneal_epochs``, held after."""
    start = swa_start_epoch(config) * steps_per_epoch
    anneal = schedules.swa_lr(
        float(schedule(start)), config.swa_lr,
        anneal_steps=int(config.swa_anneal_epochs * steps_per_epoch),
    )  # fmt: skip
    return schedules.join([schedule, anneal], boundaries=[start])


def make_optimizer(
    config: Config, steps_per_epoch: int, total_steps: int | None = None
) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer named by ``config`` and its learning-rate schedule.

    sgdjax's ``sgd``, ``sgdw``, ``lars`` (biases and BatchNorm excluded) and
    ``schedule_free`` (schedule-free SGD; the schedule then only warms up), ``asgd``
    (torch's ASGD, averaging after :func:`asgd_t0`), ``muon`` (Muon on the matrices,
    Nesterov SGD on the rest, :func:`matrix_labels`), or optax's
    ``adam``, ``adamw``, ``nadam`` and ``adagrad`` to compare against; with ``whiten``
    or ``bias_scaler`` the parameter groups of the speed run; optional clipping by
    global norm in front; with ``swa_start`` torch's SWA recipe (the schedule, then
    SWALR to ``swa_lr``; the per-epoch average kept by :func:`swa_every_epoch`);
    optional diagnostics; the whole chain wrapped in
    ``skip_non_finite`` so a NaN step is skipped, not applied.

    Args:
      config: the run's configuration.
      steps_per_epoch: optimizer steps in a full epoch.
      total_steps: steps of the whole run (default: ``ceil(epochs * steps_per_epoch)``).
    """
    if total_steps is None:
        total_steps = math.ceil(config.epochs * steps_per_epoch)
    schedule = make_schedule(config, total_steps)
    if config.swa_start is not None:
        schedule = _swa_schedule(config, schedule, steps_per_epoch)
    if config.whiten or config.bias_scaler != 1:
        tx = _grouped_optimizer(config, schedule, steps_per_epoch)
    else:
        weight_decay = sgd_hyperparameters(config)[1]
        tx = _base_optimizer(config, schedule, weight_decay, total_steps=total_steps)
    if config.swa_start is not None:
        start = swa_start_epoch(config) * steps_per_epoch
        tx = sgdjax.chain(tx, swa_every_epoch(steps_per_epoch, start, total_steps))
    if config.clip_norm is not None:
        tx = sgdjax.chain(sgdjax.clip_by_global_norm(config.clip_norm), tx)
    if config.diagnostics:
        tx = sgdjax.diagnostics(tx, clip_threshold=config.clip_norm)
    return sgdjax.skip_non_finite(tx), schedule


# ---------------------------------------------------------------- presets

PRESETS: dict[str, Config] = {
    # The classic tutorial recipe: small CNN, SGD with momentum and weight decay.
    # Flips and 2-pixel translations, no random crops (with crops at lr 0.02 this small
    # net underfits in 10 epochs: 72.2%), and flip TTA: measured in docs/training.md
    # (two seeds: flips alone 74.96-75.12%, with translation 75.96-76.09%, with
    # translation and TTA 76.77-76.89%).
    "tutorial": Config(
        model="convnet",
        epochs=10,
        batch_size=64,
        crop_padding=0,
        translate=2,
        tta="flip",
        learning_rate=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="onecycle",
    ),  # fmt: skip
    # A DAWNBench-style ResNet-9 recipe (D. Page): batch 512, Nesterov SGD,
    # one-cycle learning rate, label smoothing.
    "resnet9": Config(
        model="resnet9",
        epochs=20,
        batch_size=512,
        learning_rate=0.4,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.2,
    ),  # fmt: skip
    # Our JAX take on airbench94 (K. Jordan): whitening, Nesterov SGD in airbench's
    # units with 64x the rate for BatchNorm biases, a triangular schedule, lookahead on
    # weights and statistics, alternating flips, 2-pixel translation, six-view TTA.
    "speedrun": Config(
        model="speednet",
        widths=(64, 256, 256),
        whiten=True,
        whiten_bias_epochs=3,
        epochs=9.9,
        batch_size=1024,
        eval_batch_size=2000,
        learning_rate=11.5,
        momentum=0.85,
        nesterov=True,
        weight_decay=0.0153,
        hyperparameter_units="airbench",
        bias_scaler=64.0,
        schedule="triangle",
        pct_start=0.23,
        label_smoothing=0.2,
        flip="alternating",
        crop_padding=0,
        translate=2,
        lookahead_period=5,
        lookahead_decay=0.95**5,
        lookahead_decay_power=3.0,
        tta="flip_shift",
        eval_every=0,
        checkpoint_every=0,
    ),  # fmt: skip
}
