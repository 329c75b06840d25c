"""Schedule-free SGD: interpolation and averaging in place of momentum and a schedule."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from sgdjax import _base


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free_sgd`.

    Attributes:
      count: int32 updates taken.
      weight_sum: float32 sum of the averaging weights so far.
      max_learning_rate: float32 largest learning rate seen (for the weights).
      z: the base SGD sequence.
      x: the averaged sequence, the parameters to evaluate.
    """

    count: jax.Array
    weight_sum: jax.Array
    max_learning_rate: jax.Array
    z: Any
    x: Any


def schedule_free_sgd(
    learning_rate: _base.ScalarOrSchedule,
    *,
    b1: ArrayLike = 0.9,
    weight_lr_power: ArrayLike = 2.0,
    weight_decay: ArrayLike = 0.0,
) -> optax.GradientTransformation:
    """Schedule-free SGD: gradients at an interpolation of a SGD sequence and its average.

    Update rule, with the params holding ``y`` (where gradients are taken)::

        g_t = grad f(y_t) + lambda * y_t
        z_{t+1} = z_t - eta_t * g_t
        c_{t+1} = w_t / sum_{i <= t} w_i,      w_t = (max_{i <= t} eta_i) ** p
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}
        y_{t+1} = b1 * x_{t+1} + (1 - b1) * z_{t+1}

    starting from ``x_1 = z_1 = y_1 = theta_0``. Evaluate the model at ``x``
    (:func:`schedule_free_eval_params`); BatchNorm statistics gathered at ``y``
    should be recomputed at ``x`` for the best test accuracy. Unlike
    ``optax.contrib.schedule_free``, ``x`` is kept in the state rather than recovered
    as ``(y - (1 - b1) z) / b1``, which costs one buffer and loses no precision.

    Args:
      learning_rate: ``eta``: a constant or a schedule (warm-up only; no decay needed).
      b1: interpolation ``b1`` in ``(0, 1)``.
      weight_lr_power: ``p >= 0``.
      weight_decay: ``lambda >= 0``, applied at ``y``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.schedule_free_sgd(0.1)
      >>> y = jnp.ones(2)
      >>> _, state = tx.update(jnp.ones(2), tx.init(y), y)
      >>> [round(v, 6) for v in sgdjax.schedule_free_eval_params(state).tolist()]
      [0.9, 0.9]

    References:
      Defazio et al., "The Road Less Scheduled" (2024);
      ``optax.contrib.schedule_free_sgd`` (same numbers for a constant rate).
    """
    _base.check_scalar_or_schedule("learning_rate", learning_rate)
    _base.check_in_range("b1", b1, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    _base.check_in_range("weight_lr_power", weight_lr_power, low=0.0)
    _base.check_in_range("weight_decay", weight_decay, low=0.0)

    def init_fn(params):
        copy = lambda tree: jax.tree.map(lambda p: jnp.asarray(p).copy(), tree)  # noqa: E731
        return ScheduleFreeState(
            _base.zero_count(),
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),  # a buffer of its own: states may be donated
            copy(params),
            copy(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("schedule_free_sgd needs params: call update(updates, state, params)")
        _base.check_trees_match(params, updates, expected_name="params", got_name="updates")
        eta = jnp.asarray(_base.evaluate(learning_rate, state.count), jnp.float32)
        max_eta = jnp.maximum(state.max_learning_rate, eta)
        weight = max_eta**weight_lr_power
        weight_sum = state.weight_sum + weight
        c = jnp.where(weight_sum > 0, weight / weight_sum, 1.0)

        def leaf(g, y, z, x):
            g = g + weight_decay * y if not _base.is_static_zero(weight_decay) else g
            new_z = z - eta * g
            new_x = (1.0 - c) * x + c * new_z
            new_y = b1 * new_x + (1.0 - b1) * new_z
            return (new_y - y).astype(y.dtype), new_z.astype(z.dtype), new_x.astype(x.dtype)

        new_updates, z, x = _base.tree_map_split(leaf, 3, updates, params, state.z, state.x)
        return new_updates, ScheduleFreeState(
            _base.safe_increment(state.count), weight_sum, max_eta, z, x
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def schedule_free_eval_params(state: Any) -> Any:
    """The averaged parameters ``x`` of the :class:`ScheduleFreeState` inside ``state``."""
    found = _base.find_state(state, ScheduleFreeState)
    if found is None:
        raise ValueError("no ScheduleFreeState found: the optimizer is not schedule_free_sgd")
    return found.x
