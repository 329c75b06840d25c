"""sgdjax: SGD-family gradient transformations for JAX.

Every transform is an ``optax.GradientTransformation``: sgdjax and optax pieces mix
in one chain. ``sgdjax.sgd`` follows ``torch.optim.SGD`` exactly, and
``sgdjax.schedules`` follows ``torch.optim.lr_scheduler``.
"""

from sgdjax import schedules
from sgdjax._alias import sgd, sgdw
from sgdjax._asgd import AsgdState, asgd, asgd_averaged_params
from sgdjax._averaging import EmaState, ema_init, ema_update, ema_value
from sgdjax._base import ScalarOrSchedule, Schedule
from sgdjax._clipping import (
    adaptive_grad_clip,
    clip,
    clip_by_global_norm,
    clip_by_norm,
    global_norm,
    unitwise_norm,
)
from sgdjax._combine import (
    apply_updates,
    chain,
    inject_hyperparams,
    masked,
    multi_transform,
    named_chain,
)
from sgdjax._decay import (
    DecoupledWeightDecayState,
    add_decayed_weights,
    decoupled_weight_decay,
)
from sgdjax._diagnostics import DiagnosticsState, diagnostics, diagnostics_metrics
from sgdjax._flatten import flatten
from sgdjax._lars import exclude_bias_and_norm, lars, scale_by_trust_ratio
from sgdjax._lookahead import LookaheadState, lookahead
from sgdjax._momentum import MomentumState, momentum
from sgdjax._muon import MuonState, muon, scale_by_muon
from sgdjax._scale import ScaleByLearningRateState, scale, scale_by_learning_rate
from sgdjax._schedule_free import (
    ScheduleFreeState,
    schedule_free_eval_params,
    schedule_free_sgd,
)
from sgdjax._skip import SkipNonFiniteState, all_finite, skip_non_finite
from sgdjax._swa import SwaState, swa_init, swa_update, swa_value

__version__ = "0.1.0"

__all__ = [
    "AsgdState",
    "DecoupledWeightDecayState",
    "DiagnosticsState",
    "EmaState",
    "LookaheadState",
    "MomentumState",
    "MuonState",
    "ScalarOrSchedule",
    "ScaleByLearningRateState",
    "Schedule",
    "ScheduleFreeState",
    "SkipNonFiniteState",
    "SwaState",
    "adaptive_grad_clip",
    "add_decayed_weights",
    "all_finite",
    "apply_updates",
    "asgd",
    "asgd_averaged_params",
    "chain",
    "clip",
    "clip_by_global_norm",
    "clip_by_norm",
    "decoupled_weight_decay",
    "diagnostics",
    "diagnostics_metrics",
    "ema_init",
    "ema_update",
    "ema_value",
    "exclude_bias_and_norm",
    "flatten",
    "global_norm",
    "inject_hyperparams",
    "lars",
    "lookahead",
    "masked",
    "momentum",
    "multi_transform",
    "muon",
    "named_chain",
    "scale",
    "scale_by_learning_rate",
    "scale_by_muon",
    "scale_by_trust_ratio",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "schedules",
    "sgd",
    "sgdw",
    "skip_non_finite",
    "swa_init",
    "swa_update",
    "swa_value",
    "unitwise_norm",
]
