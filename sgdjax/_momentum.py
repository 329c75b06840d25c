"""Heavy-ball and Nesterov momentum with dampening, following ``torch.optim.SGD``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from sgdjax import _base, _flatten
from sgdjax.schedules import _value_range


class MomentumState(NamedTuple):
    """State of :func:`momentum`.

    Attributes:
      count: int32 number of updates taken; the first update starts the buffer.
      momentum_buffer: the buffer ``b``, shaped like the params.
    """

    count: jax.Array
    momentum_buffer: Any


def _check_momentum_schedule(schedule: _base.Schedule) -> None:
    """Checks the values of a momentum schedule built by ``sgdjax.schedules``."""
    bounds = _value_range(schedule)
    if bounds is not None and not (bounds[0] >= 0.0 and bounds[1] < 1.0):
        raise ValueError(
            f"momentum must take values in [0, 1), got a schedule with values in "
            f"[{bounds[0]}, {bounds[1]}]"
        )


def momentum(
    momentum: ArrayLike | _base.Schedule,
    *,
    dampening: ArrayLike = 0.0,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    """Heavy-ball or Nesterov momentum with dampening, exactly as ``torch.optim.SGD``.

    Update rule, with ``mu`` the momentum and ``tau`` the dampening::

        b_1 = g_1
        b_t = mu * b_{t-1} + (1 - tau) * g_t        (t > 1)
        u_t = b_t                                    (heavy ball)
        u_t = g_t + mu * b_t                         (Nesterov)

    The first step copies the gradient into the buffer without dampening, as torch
    does, so with dampening the rule is not the plain recursion from ``b_0 = 0``.
    Without dampening it gives the same numbers as ``optax.trace``. A scheduled
    momentum ``mu(t)`` replaces ``mu`` at update ``t = 1, 2, ...`` by ``mu(t - 1)``:
    the value torch's scheduler set before that step.

    Args:
      momentum: ``mu`` in ``[0, 1)``, or a schedule ``count -> mu`` (e.g.
        :func:`sgdjax.schedules.one_cycle_momentum`), evaluated at the number of
        updates taken before this one; a schedule from :mod:`sgdjax.schedules` has its
        range of values checked here.
      dampening: ``tau`` in ``[0, 1]``; torch's ``dampening``.
      nesterov: use the Nesterov form; needs ``mu > 0`` and ``tau = 0`` (as torch).
      accumulator_dtype: dtype to store ``b`` in (e.g. ``jnp.bfloat16`` to halve its
        memory); ``None`` keeps each parameter's dtype. The arithmetic runs in the
        wider of the gradient and buffer dtypes.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`MomentumState`.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.momentum(0.9)
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.ones(1), state)   # b_1 = g_1 = 1
      >>> u, state = tx.update(jnp.ones(1), state)   # b_2 = 0.9 * 1 + 1
      >>> round(float(u[0]), 6)
      1.9

    References:
      Polyak (1964); Sutskever et al. (2013) for the Nesterov form used by
      ``torch.optim.SGD`` (``momentum``, ``dampening``, ``nesterov``).
    """
    if callable(momentum):
        _check_momentum_schedule(momentum)
    else:
        _base.check_in_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    _base.check_in_range("dampening", dampening, low=0.0, high=1.0)
    if nesterov:
        if _base.is_static_zero(momentum):
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
        # check_real reads the number with NumPy: jnp would trace it inside jit.
        if not _base.is_traced(dampening) and _base.check_real("dampening", dampening) != 0.0:
            raise ValueError(f"nesterov=True needs dampening=0, got dampening={dampening!r}")
    if accumulator_dtype is not None:
        accumulator_dtype = jnp.dtype(accumulator_dtype)

    def buffer_dtype(leaf):
        if accumulator_dtype is None:
            return leaf.dtype
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating) and not jnp.issubdtype(
            accumulator_dtype, jnp.complexfloating
        ):
            raise ValueError(
                f"accumulator_dtype={accumulator_dtype.name} would drop the imaginary part "
                f"of a {jnp.dtype(leaf.dtype).name} parameter: use a complex dtype or None"
            )
        return accumulator_dtype

    def init_fn(params):
        buffers = jax.tree.map(lambda p: jnp.zeros(p.shape, buffer_dtype(p)), params)
        return MomentumState(count=_base.zero_count(), momentum_buffer=buffers)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _base.check_trees_match(
            state.momentum_buffer,
            updates,
            expected_name="momentum state",
            got_name="updates",
        )
        first = state.count == 0
        mu = _base.evaluate(momentum, state.count) if callable(momentum) else momentum
        # Without dampening, b_0 = 0 already gives b_1 = g_1: no select is needed, and
        # the per-leaf kernel stays a plain multiply-add.
        undamped = _base.is_static_zero(dampening)

        def leaf_update(g, b):
            dtype = jnp.promote_types(g.dtype, b.dtype)
            g_wide, b_wide = g.astype(dtype), b.astype(dtype)
            if undamped:
                new_b = mu * b_wide + g_wide
            else:
                new_b = jnp.where(first, g_wide, mu * b_wide + (1.0 - dampening) * g_wide)
            out = g_wide + mu * new_b if nesterov else new_b
            return out.astype(g.dtype), new_b.astype(b.dtype)

        new_updates, new_buffers = _base.tree_map_split(
            leaf_update, 2, updates, state.momentum_buffer
        )
        return new_updates, MomentumState(
            count=_base.safe_increment(state.count), momentum_buffer=new_buffers
        )

    return _flatten.mark_elementwise(optax.GradientTransformationExtraArgs(init_fn, update_fn))
