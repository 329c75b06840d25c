"""Weight decay: coupled L2 (added to the gradient) and decoupled (SGDW)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from sgdjax import _base


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: the number of updates taken so far."""

    count: jax.Array  # int32 scalar


def _decay_leaves(updates, params, mask, factor):
    """``u + factor * theta`` on the leaves where ``mask`` is True, ``u`` elsewhere."""
    if params is None:
        raise ValueError("weight decay needs params: call update(updates, state, params)")
    _base.check_trees_match(params, updates, expected_name="params", got_name="updates")
    mask_tree = _base.resolve_mask(mask, params)

    def leaf(u, p, keep):
        if not keep:
            return u
        return (u + factor * p).astype(u.dtype)

    return jax.tree.map(leaf, updates, params, mask_tree)


def add_decayed_weights(
    weight_decay: ArrayLike, mask: _base.MaskOrFn = None
) -> optax.GradientTransformation:
    """Coupled L2 weight decay: adds ``lambda * theta`` to the gradient.

    Update rule::

        u_t = g_t + lambda * theta_{t-1}

    Placed before momentum, this is ``torch.optim.SGD``'s ``weight_decay``: the decay
    term then flows through the momentum buffer and is scaled by the learning rate.

    Args:
      weight_decay: ``lambda >= 0``.
      mask: which leaves to decay: a pytree of Python bools shaped like the params,
        or a callable ``params -> that tree``; ``None`` decays every leaf.

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.add_decayed_weights(0.1)
      >>> p = {"w": jnp.array([2.0])}
      >>> round(float(tx.update({"w": jnp.array([1.0])}, tx.init(p), p)[0]["w"][0]), 6)
      1.2

    References:
      ``optax.add_decayed_weights`` (same rule); ``torch.optim.SGD(weight_decay=...)``.
    """
    _base.check_in_range("weight_decay", weight_decay, low=0.0)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return _decay_leaves(updates, params, mask, weight_decay), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def decoupled_weight_decay(
    weight_decay: ArrayLike,
    learning_rate: _base.ScalarOrSchedule,
    mask: _base.MaskOrFn = None,
) -> optax.GradientTransformation:
    """Decoupled weight decay: shrinks the parameters apart from the gradient path.

    Update rule, placed after :func:`scale_by_learning_rate` in a chain::

        u_t = u_t' - eta(t) * lambda * theta_{t-1}

    so that ``theta_t = theta_{t-1} + u_t' - eta(t) * lambda * theta_{t-1}``, where
    ``u_t'`` is the (already sign-flipped) update from the rest of the chain. The decay
    never enters a momentum buffer, and scales with the same schedule ``eta`` as the
    step, as in SGDW and ``torch.optim.AdamW``.

    Args:
      weight_decay: ``lambda >= 0``.
      learning_rate: ``eta``: a number ``>= 0`` or a schedule ``count -> value``.
      mask: which leaves to decay, as in :func:`add_decayed_weights`.

    Returns:
      An ``optax.GradientTransformation`` that counts updates; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.decoupled_weight_decay(0.1, learning_rate=0.5)
      >>> p = {"w": jnp.array([2.0])}                  # -0.5 * 0.1 * 2 = -0.1
      >>> round(float(tx.update({"w": jnp.array([0.0])}, tx.init(p), p)[0]["w"][0]), 6)
      -0.1

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019), SGDW.
    """
    _base.check_in_range("weight_decay", weight_decay, low=0.0)
    _base.check_scalar_or_schedule("learning_rate", learning_rate)

    def init_fn(params):
        del params
        return DecoupledWeightDecayState(count=_base.zero_count())

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        eta = _base.evaluate(learning_rate, state.count)
        factor = -(jnp.asarray(eta, jnp.float32) * weight_decay)
        updates = _decay_leaves(updates, params, mask, factor)
        return updates, DecoupledWeightDecayState(count=_base.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
