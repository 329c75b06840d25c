"""Training with sgdjax: Flax CNNs, the train state and pure, jitted train/eval steps."""

from sgdjax.training._checkpoint import Checkpointer
from sgdjax.training._config import (
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    Config,
    make_optimizer,
    make_schedule,
)
from sgdjax.training._loop import NonFiniteError, train_and_evaluate
from sgdjax.training._models import (
    MODELS,
    ConvNet,
    ResNet9,
    ResNet18,
    create_model,
    max_pool_2x2,
)
from sgdjax.training._parallel import MODES, ParallelStep, make_parallel_train_step, needs_bn_axis
from sgdjax.training._speednet import SpeedNet, whitening_kernel
from sgdjax.training._speedrun import SpeedrunConfig, speedrun
from sgdjax.training._state import TrainState
from sgdjax.training._swa_bn import recompute_batch_stats
from sgdjax.training._step import (
    cross_entropy,
    default_preprocess,
    evaluate,
    find_learning_rate,
    make_eval_step,
    make_multi_step,
    make_train_step,
)
from sgdjax.training._tensorboard import ScalarWriter

__all__ = [
    "Checkpointer",
    "Config",
    "ConvNet",
    "MODELS",
    "MODES",
    "NonFiniteError",
    "OPTIMIZERS",
    "PRESETS",
    "ParallelStep",
    "ResNet18",
    "ResNet9",
    "SCHEDULES",
    "ScalarWriter",
    "SpeedNet",
    "SpeedrunConfig",
    "TrainState",
    "create_model",
    "cross_entropy",
    "default_preprocess",
    "evaluate",
    "find_learning_rate",
    "make_eval_step",
    "make_multi_step",
    "make_optimizer",
    "make_parallel_train_step",
    "make_schedule",
    "make_train_step",
    "max_pool_2x2",
    "needs_bn_axis",
    "recompute_batch_stats",
    "speedrun",
    "train_and_evaluate",
    "whitening_kernel",
]
