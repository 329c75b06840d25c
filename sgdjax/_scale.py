"""Scaling transforms: a constant factor and the (sign-flipping) learning rate."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax
from jax.typing import ArrayLike

from sgdjax import _base


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`: the number of updates taken so far.

    This is where to read an optimizer's step. The state of an alias such as
    ``sgd(lr, momentum=0.9)`` holds one ``count`` per piece that needs one (momentum,
    learning rate, decoupled decay), all equal, so
    ``optax.tree_utils.tree_get(state, "count")`` finds several and raises; read
    ``optax.tree_utils.tree_get(state, "ScaleByLearningRateState").count`` instead
    (``sgd``, ``sgdw`` and ``lars`` have exactly one learning-rate piece).
    """

    count: jax.Array  # int32 scalar


def _scale_tree(tree, factor):
    """Multiplies every leaf by ``factor``, keeping each leaf's dtype."""
    return jax.tree.map(lambda leaf: (leaf * factor).astype(leaf.dtype), tree)


def scale(step_size: ArrayLike) -> optax.GradientTransformation:
    """Multiplies the updates by a constant.

    Update rule::

        u_t = s * g_t

    Args:
      step_size: the factor ``s``; any finite number (negative flips the direction).

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.scale(2.0)
      >>> tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))[0]["w"].tolist()
      [2.0, 2.0]

    References:
      ``optax.scale`` (same rule).
    """
    _base.check_in_range("step_size", step_size)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return _scale_tree(updates, step_size), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_learning_rate(learning_rate: _base.ScalarOrSchedule) -> optax.GradientTransformation:
    """Scales the updates by minus the learning rate: the step that flips the sign.

    Update rule, at step ``t = 0, 1, 2, ...``::

        u_t = -eta(t) * g_t

    where ``eta`` is a constant or a schedule evaluated at the number of updates taken
    before this one (``eta(0)`` for the first update), the convention of
    ``torch.optim.lr_scheduler`` stepped once per optimizer step.

    Args:
      learning_rate: a finite number ``>= 0`` or a schedule ``count -> value``.

    Returns:
      An ``optax.GradientTransformation`` whose state counts updates.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.scale_by_learning_rate(0.1)
      >>> u, _ = tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.ones(1)}))
      >>> round(float(u["w"][0]), 6)
      -0.1

    References:
      ``optax.scale_by_learning_rate`` (same rule).
    """
    _base.check_scalar_or_schedule("learning_rate", learning_rate)

    def init_fn(params):
        del params
        return ScaleByLearningRateState(count=_base.zero_count())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        step_size = -_base.evaluate(learning_rate, state.count)
        updates = _scale_tree(updates, step_size)
        return updates, ScaleByLearningRateState(count=_base.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
