"""A wrapper that skips steps whose gradients or updates contain NaN or infinity."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgdjax import _base


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_non_finite`.

    Attributes:
      inner_state: the wrapped transform's state, unchanged by skipped steps.
      skipped_steps: int32 total number of skipped steps.
      consecutive_skipped: int32 number of skipped steps since the last finite one.
      last_finite: bool, whether the most recent step was applied (its gradient and
        update both finite).
    """

    inner_state: Any
    skipped_steps: jax.Array
    consecutive_skipped: jax.Array
    last_finite: jax.Array


def all_finite(tree) -> jax.Array:
    """A boolean scalar: True when no leaf of ``tree`` holds a NaN or an infinity."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Skips a step whose gradient or update is NaN or infinite: zero update, state kept.

    Update rule::

        u_t', s_t' = inner.update(g_t, s_{t-1})
        finite = all(isfinite(g_t)) and all(isfinite(u_t'))
        u_t, s_t = u_t', s_t'                      if finite
        u_t, s_t = 0, s_{t-1}                      otherwise

    The update is checked as well as the gradient: finite gradients can still give a
    non-finite update (a learning rate that overflows float32, a momentum buffer that
    has grown too large), and such an update is never applied. The inner state
    (momentum buffers, step counts, schedules) is left exactly as it was, so a skipped
    step leaves no trace in the trajectory. The state counts skipped steps in total
    and in a row, for logging and for stopping a diverged run.

    Args:
      inner: the transform to protect, e.g. ``sgdjax.sgd(...)``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SkipNonFiniteState`.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.skip_non_finite(sgdjax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([1.0, jnp.nan]), state)
      >>> u.tolist(), int(state.skipped_steps)
      ([0.0, 0.0], 1)

    References:
      ``optax.apply_if_finite`` is similar but passes updates through after too many
      consecutive failures; this wrapper never applies a non-finite update.
    """

    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonFiniteState(
            inner_state=inner.init(params),
            skipped_steps=_base.zero_count(),
            consecutive_skipped=_base.zero_count(),
            last_finite=jnp.asarray(True),
        )

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        finite = jnp.logical_and(all_finite(updates), all_finite(new_updates))
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
        )
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        return new_updates, SkipNonFiniteState(
            inner_state=new_inner,
            skipped_steps=state.skipped_steps + skipped,
            consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1).astype(
                jnp.int32
            ),
            last_finite=finite,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
