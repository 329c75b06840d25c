"""Stochastic weight averaging: the equal average of ``torch.optim.swa_utils.AveragedModel``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgdjax import _base


class SwaState(NamedTuple):
    """A running equal average: ``count`` int32 trees averaged so far and the ``average``."""

    count: jax.Array
    average: Any


def swa_init(tree: Any) -> SwaState:
    """Starts an equal average; until the first :func:`swa_update` it holds ``tree``.

    Args:
      tree: the params (or ``{"params": ..., "batch_stats": ...}``) to average.

    Returns:
      A :class:`SwaState` with ``count = 0`` and a copy of ``tree``, as
      ``AveragedModel(model)`` holds a copy of the model before any update.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> state = sgdjax.swa_init(jnp.zeros(2))
      >>> int(state.count)
      0
    """
    return SwaState(_base.zero_count(), jax.tree.map(jnp.array, tree))


def swa_update(state: SwaState, tree: Any) -> SwaState:
    """Adds ``tree`` to the equal average.

    Update rule, with ``n`` the number of trees averaged so far::

        a = x                                 (n = 0: a copy, as torch)
        a = a + (x - a) / (n + 1)             (n > 0)

    so after ``n`` updates ``a`` is the mean of the ``n`` trees passed. Call it every
    few steps (torch's recipe: once per epoch from the epoch ``swa_start``), usually
    with :func:`sgdjax.schedules.swa_lr` driving the learning rate meanwhile. Average
    ``{"params": ..., "batch_stats": ...}`` for torch's ``use_buffers=True``; with the
    params alone, recompute the BatchNorm statistics for the averaged weights with
    :func:`sgdjax.training.recompute_batch_stats` (torch's ``update_bn``).

    Args:
      state: the running average.
      tree: the new values, same structure and shapes as the average.

    Returns:
      The new :class:`SwaState`.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> state = sgdjax.swa_init(jnp.zeros(()))
      >>> for x in (1.0, 2.0, 6.0):
      ...     state = sgdjax.swa_update(state, jnp.asarray(x))
      >>> float(sgdjax.swa_value(state))
      3.0

    References:
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
      Generalization" (UAI 2018); ``torch.optim.swa_utils.AveragedModel`` with its
      default (equal) average, ``update_parameters``.
    """
    _base.check_trees_match(state.average, tree, expected_name="average", got_name="tree")

    def leaf(a, x):
        x = jnp.asarray(x, a.dtype)
        moved = a + (x - a) / (state.count + 1).astype(a.dtype)
        return jnp.where(state.count == 0, x, moved).astype(a.dtype)

    average = jax.tree.map(leaf, state.average, tree)
    return SwaState(_base.safe_increment(state.count), average)


def swa_value(state: SwaState) -> Any:
    """The averaged tree (torch's ``AveragedModel.module`` parameters).

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> state = sgdjax.swa_update(sgdjax.swa_init(jnp.zeros(1)), jnp.ones(1))
      >>> sgdjax.swa_value(state).tolist()
      [1.0]
    """
    return state.average
