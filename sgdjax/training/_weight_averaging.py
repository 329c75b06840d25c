"""Averaged weights in training: SWA's per-epoch average, and the weights a run is scored at.

Two options keep an average of the weights beside the trajectory: ``optimizer="asgd"``
(the equal average of the iterates after ASGD's ``t0``) and ``swa_start`` (stochastic
weight averaging: the equal average of the weights at the end of every epoch after
``swa_start``). Both averages live in the optimizer state, so checkpoints hold them and
a resumed run continues them exactly. Once averaging has begun a run is scored at the
average, with the BatchNorm statistics recomputed for it over the training images
(:func:`sgdjax.training.recompute_batch_stats`, torch's ``update_bn``): the running
statistics belong to the trajectory's weights, not to their average.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgdjax
from sgdjax import _base
from sgdjax.parallel import gather_to_host
from sgdjax.training._state import TrainState
from sgdjax.training._step import default_preprocess
from sgdjax.training._swa_bn import recompute_batch_stats


class SwaEpochState(NamedTuple):
    """State of :func:`swa_every_epoch`: ``count`` int32 updates taken, the ``swa`` average."""

    count: jax.Array
    swa: sgdjax.SwaState


def swa_every_epoch(
    steps_per_epoch: int, start_step: int, total_steps: int
) -> optax.GradientTransformationExtraArgs:
    """Keeps SWA's equal average of the params at every epoch end after ``start_step``.

    Rule, with ``c`` the number of updates taken including this one and ``theta_c`` the
    params this update gives (``params + updates``)::

        a <- swa_update(a, theta_c)   if c > start_step and
                                         ((c - start_step) % steps_per_epoch == 0
                                          or c == total_steps)

    so ``a`` is the mean of the weights at the ends of the epochs after ``start_step``
    (a partial last epoch included). The updates pass through unchanged. Read the
    average with ``sgdjax.swa_value(state.swa)``; until the first epoch end after
    ``start_step`` its ``count`` is 0.

    Args:
      steps_per_epoch: updates per epoch, ``>= 1``.
      start_step: the updates before averaging starts, ``>= 0``.
      total_steps: the run's updates (its last one is averaged too).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SwaEpochState`;
      its ``update`` needs the params.

    References:
      Izmailov et al. (UAI 2018); torch's recipe with ``AveragedModel.update_parameters``
      once per epoch from ``swa_start``.
    """
    limits = (("steps_per_epoch", steps_per_epoch, 1), ("start_step", start_step, 0),
              ("total_steps", total_steps, 1))  # fmt: skip
    for name, value, low in limits:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def init_fn(params):
        return SwaEpochState(_base.zero_count(), sgdjax.swa_init(params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("swa_every_epoch needs params: call update(updates, state, params)")
        count = state.count + 1
        after = count - start_step
        due = (after > 0) & ((after % steps_per_epoch == 0) | (count == total_steps))
        updated = sgdjax.swa_update(state.swa, optax.apply_updates(params, updates))
        swa = jax.tree.map(lambda new, old: jnp.where(due, new, old), updated, state.swa)
        return updates, SwaEpochState(_base.safe_increment(state.count), swa)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def averaged_params(opt_state: Any, asgd_t0: int | None = None) -> Any | None:
    """The averaged weights to score in place of the params, or ``None`` before averaging.

    SWA's average once it holds an epoch's weights; ASGD's (pass its ``asgd_t0``) once
    more than ``t0`` updates were taken (before, it is a copy of the params).
    """
    swa = _base.find_state(opt_state, SwaEpochState)
    if swa is not None:
        return sgdjax.swa_value(swa.swa) if int(gather_to_host(swa.swa.count)) > 0 else None
    if asgd_t0 is not None:
        asgd = _base.find_state(opt_state, sgdjax.AsgdState)
        if int(gather_to_host(asgd.count)) > asgd_t0:
            return asgd.averaged_params
    return None


def with_averaged_weights(
    model: Any, state: TrainState, params: Any, images: np.ndarray, batch_size: int
) -> TrainState:
    """``state`` with ``params`` and BatchNorm statistics recomputed for them.

    The statistics are the equal average over the batches ``images[0:batch_size]``,
    ``images[batch_size:2 batch_size]``, ... (whole batches, in order, not augmented)
    of the statistics ``model`` computes in training mode (torch's ``update_bn`` over
    the training loader). ``model`` must be built without a BatchNorm ``axis_name``.
    The result is one copy on the default device, whatever placement ``state`` had.
    """
    params, model_state = gather_to_host((params, state.model_state))
    if "batch_stats" in model_state:
        ends = range(batch_size, len(images) + 1, batch_size)
        batches = (images[end - batch_size : end] for end in ends)
        stats = recompute_batch_stats(model, {"params": params, **model_state}, batches,
                                      preprocess=default_preprocess)  # fmt: skip
        model_state = {**model_state, "batch_stats": stats}
    return state.replace(params=params, model_state=model_state)
