"""Lookahead: slow weights that follow the fast optimizer every few steps."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from sgdjax import _base


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`: the fast optimizer's state, the slow weights, a count."""

    fast_state: Any
    slow_params: Any
    count: jax.Array  # int32


def lookahead(
    fast: optax.GradientTransformation,
    *,
    sync_period: int = 5,
    slow_step_size: ArrayLike = 0.5,
) -> optax.GradientTransformation:
    """Lookahead: every ``k`` fast steps, the slow weights move part way to the fast ones.

    Update rule, with fast weights ``theta`` (the params) and slow weights ``phi``::

        theta_t = theta_{t-1} + fast_update_t
        at every k-th step:  phi <- phi + alpha * (theta_t - phi);   theta_t <- phi

    The params always hold the fast weights; right after a synchronisation they equal
    the slow weights, which are the ones to evaluate at the end of a run. The slow
    weights start equal to the params given to ``init``.

    Args:
      fast: the inner ("fast") optimizer, e.g. ``sgdjax.sgd(0.1, momentum=0.9)``.
      sync_period: ``k``, a positive integer.
      slow_step_size: ``alpha`` in ``(0, 1]``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import sgdjax
      >>> tx = sgdjax.lookahead(sgdjax.sgd(0.1, momentum=0.9), sync_period=5)

    References:
      Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back" (2019).
      ``optax.lookahead`` keeps both weight sets in the params instead.
    """
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period <= 0:
        raise ValueError(f"sync_period must be a positive integer, got {sync_period!r}")
    _base.check_in_range("slow_step_size", slow_step_size, low=0.0, high=1.0, low_inclusive=False)

    fast = optax.with_extra_args_support(fast)

    def init_fn(params):
        slow = jax.tree.map(lambda p: jnp.asarray(p).copy(), params)
        return LookaheadState(fast.init(params), slow, _base.zero_count())

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("lookahead needs params: call update(updates, state, params)")
        fast_updates, fast_state = fast.update(updates, state.fast_state, params, **extra_args)
        count = _base.safe_increment(state.count)
        sync = count % sync_period == 0

        def leaf(u, p, slow):
            new_fast = p + u
            new_slow = slow + slow_step_size * (new_fast - slow)
            update = jnp.where(sync, new_slow - p, u).astype(u.dtype)
            return update, jnp.where(sync, new_slow, slow).astype(slow.dtype)

        new_updates, new_slow = _base.tree_map_split(
            leaf, 2, fast_updates, params, state.slow_params
        )
        return new_updates, LookaheadState(fast_state, new_slow, count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
