"""Exponential moving averages of any pytree (parameters and BatchNorm statistics alike)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from sgdjax import _base


class EmaState(NamedTuple):
    """A running average: ``count`` int32 updates so far and the ``average`` tree."""

    count: jax.Array
    average: Any


def ema_init(tree: Any) -> EmaState:
    """Starts an average of ``tree``'s shape at zero (see :func:`ema_update`)."""
    return EmaState(_base.zero_count(), jax.tree.map(jnp.zeros_like, tree))


def ema_update(state: EmaState, tree: Any, decay: ArrayLike) -> EmaState:
    """One step of the exponential moving average.

    Update rule::

        a_t = decay * a_{t-1} + (1 - decay) * x_t,     a_0 = 0

    Pass ``{"params": ..., "batch_stats": ...}`` to average the BatchNorm statistics
    with the weights, so the averaged model is consistent.

    Args:
      state: the running average.
      tree: the new values, same structure as the average.
      decay: in ``[0, 1)``.

    Returns:
      The new :class:`EmaState`.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> state = sgdjax.ema_update(sgdjax.ema_init(jnp.zeros(())), jnp.ones(()), 0.9)
      >>> round(float(sgdjax.ema_value(state, 0.9, debias=True)), 6)
      1.0

    References:
      Polyak & Juditsky (1992); ``optax.ema`` (the same rule for gradients).
    """
    _base.check_in_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    _base.check_trees_match(state.average, tree, expected_name="average", got_name="tree")
    average = jax.tree.map(
        lambda a, x: (decay * a + (1.0 - decay) * x).astype(a.dtype), state.average, tree
    )
    return EmaState(_base.safe_increment(state.count), average)


def ema_value(state: EmaState, decay: ArrayLike, *, debias: bool = True) -> Any:
    """The average, divided by ``1 - decay^t`` when ``debias`` (removes the pull to 0)."""
    if not debias:
        return state.average
    correction = 1.0 - jnp.power(jnp.asarray(decay, jnp.float32), state.count)
    return jax.tree.map(
        lambda a: jnp.where(state.count > 0, a / correction, a).astype(a.dtype), state.average
    )
