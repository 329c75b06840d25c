"""Training with sgdjax: Flax CNNs, the train state and pure, jitted train/eval steps."""

from sgdjax.training._checkpoint import (
    SAFE_TO_CHANGE,
    Checkpointer,
    CheckpointError,
    ConfigChangedError,
    Restored,
    config_differences,
)
from sgdjax.training._config import (
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    Config,
    ConfigError,
    make_optimizer,
    make_schedule,
)
from sgdjax.training._engine import (
    Engine,
    NonFiniteError,
    SetupError,
    plan_run,
    steps_per_program,
    train_and_evaluate,
    train_seeds,
)
from sgdjax.training._models import (
    KERNEL_GRADS,
    MODELS,
    ConvNet,
    ResNet9,
    ResNet18,
    choose_kernel_grad,
    create_model,
    max_pool_2x2,
)
from sgdjax.training._nnx import NNXConvNet, NNXModel, load_linen_variables, nnx_convnet_like
from sgdjax.training._parallel import (
    MODES,
    ParallelStep,
    Placement,
    make_parallel_train_step,
    make_placement,
    needs_bn_axis,
)
from sgdjax.training._preemption import PREEMPTED_EXIT_STATUS, Preempted, PreemptionGuard
from sgdjax.training._report import environment, plot_curves, save_figure
from sgdjax.training._rundir import (
    RunDirectoryLocked,
    RunLock,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
from sgdjax.training._speednet import SpeedNet, Whitened, whitening_kernel
from sgdjax.training._state import TrainState
from sgdjax.training._step import (
    cross_entropy,
    default_preprocess,
    evaluate,
    find_learning_rate,
    make_eval_step,
    make_multi_step,
    make_train_step,
    tta_logits,
)
from sgdjax.training._swa_bn import recompute_batch_stats
from sgdjax.training._tensorboard import ScalarWriter
from sgdjax.training._weight_averaging import SwaEpochState, swa_every_epoch

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "Config",
    "ConfigChangedError",
    "ConfigError",
    "ConvNet",
    "Engine",
    "KERNEL_GRADS",
    "MODELS",
    "MODES",
    "NNXConvNet",
    "NNXModel",
    "NonFiniteError",
    "OPTIMIZERS",
    "PREEMPTED_EXIT_STATUS",
    "PRESETS",
    "ParallelStep",
    "Placement",
    "Preempted",
    "PreemptionGuard",
    "ResNet18",
    "ResNet9",
    "Restored",
    "RunDirectoryLocked",
    "RunLock",
    "SAFE_TO_CHANGE",
    "SCHEDULES",
    "ScalarWriter",
    "SetupError",
    "SpeedNet",
    "SwaEpochState",
    "TrainState",
    "Whitened",
    "choose_kernel_grad",
    "config_differences",
    "create_model",
    "cross_entropy",
    "default_preprocess",
    "environment",
    "evaluate",
    "find_learning_rate",
    "load_linen_variables",
    "make_eval_step",
    "make_multi_step",
    "make_optimizer",
    "make_parallel_train_step",
    "make_placement",
    "make_schedule",
    "make_train_step",
    "max_pool_2x2",
    "needs_bn_axis",
    "nnx_convnet_like",
    "plan_run",
    "plot_curves",
    "read_jsonl",
    "recompute_batch_stats",
    "save_figure",
    "steps_per_program",
    "swa_every_epoch",
    "train_and_evaluate",
    "train_seeds",
    "tta_logits",
    "whitening_kernel",
    "write_json_atomic",
    "write_jsonl_atomic",
]
