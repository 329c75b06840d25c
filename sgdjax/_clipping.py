"""Gradient clipping: by value, by each leaf's norm, by the global norm, and unit-wise (AGC)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from sgdjax import _base, _flatten


def _stateless(update_leaves) -> optax.GradientTransformationExtraArgs:
    """A stateless transform from ``update_leaves(updates, params) -> updates``."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return update_leaves(updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _wide(x: jax.Array) -> jax.Array:
    """``x`` in float32 (or wider, or complex): norms are accumulated in that precision."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def sum_of_squares(x: jax.Array, **kwargs) -> jax.Array:
    """Sum of ``|x|^2`` accumulated in float32 (or wider); real for complex ``x`` too."""
    wide = _wide(x)
    if jnp.issubdtype(wide.dtype, jnp.complexfloating):
        return jnp.sum(jnp.real(wide) ** 2 + jnp.imag(wide) ** 2, **kwargs)
    return jnp.sum(jnp.square(wide), **kwargs)


def euclidean_norm(x: jax.Array, **kwargs) -> jax.Array:
    """Euclidean norm ``sqrt(sum |x|^2)`` accumulated in float32 (or wider), real-valued."""
    return jnp.sqrt(sum_of_squares(x, **kwargs))


def global_norm(tree) -> jax.Array:
    """The Euclidean norm of all leaves of ``tree`` taken together, as float32 or wider.

    Update rule::

        ||g|| = sqrt(sum_i sum_j |g_ij|^2)

    Args:
      tree: a pytree of arrays.

    Returns:
      A real scalar array (also for complex leaves).

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> float(sgdjax.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
      5.0

    References:
      ``optax.global_norm`` (same value).
    """
    leaves = _flatten.leaf_views(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    return jnp.sqrt(sum(sum_of_squares(leaf) for leaf in leaves))


def _global_p_norm(leaves: list[jax.Array], norm_type: float) -> jax.Array:
    """``(sum |g|^p)^(1/p)`` over all leaves (``max |g|`` for p = inf), float32 or wider.

    For p other than 1 and 2 the values are divided by their largest magnitude first,
    so ``|g|^p`` neither overflows nor underflows float32.
    """
    magnitudes = [jnp.abs(_wide(leaf)) for leaf in leaves]
    largest = jnp.max(jnp.stack([jnp.max(m, initial=0.0) for m in magnitudes]))
    if norm_type == math.inf:
        return largest
    if norm_type == 1.0:
        return sum(jnp.sum(m) for m in magnitudes)
    divisor = jnp.where(largest > 0, largest, 1.0)
    total = sum(jnp.sum((m / divisor) ** norm_type) for m in magnitudes)
    return largest * total ** (1.0 / norm_type)


def _check_norm_type(norm_type: Any) -> float:
    """``norm_type`` as a float p > 0 (or inf), or a ``ValueError`` naming it."""
    if _base.is_traced(norm_type):
        raise ValueError(
            f"norm_type must be a concrete number (it chooses the computation), got {norm_type!r}"
        )
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise ValueError(f"norm_type must be a number p > 0 or inf, got {norm_type!r}")
    if norm_type == math.inf:
        return math.inf
    return _base.check_real("norm_type", norm_type, low=0.0, low_inclusive=False)


def _rescale(g: jax.Array, norm: jax.Array, max_norm: ArrayLike) -> jax.Array:
    """``g`` if ``norm < max_norm`` else ``g * max_norm / norm``, in ``g``'s dtype.

    The division happens in the norm's (float32 or wider) dtype: a float16 norm above
    65504 would be infinite and zero the update.
    """
    wide = jnp.promote_types(g.dtype, norm.dtype)
    clipped = (g.astype(wide) / norm.astype(wide) * max_norm).astype(g.dtype)
    return jnp.where(norm < max_norm, g, clipped).astype(g.dtype)


def clip(max_delta: ArrayLike) -> optax.GradientTransformation:
    """Clips every update coordinate to ``[-max_delta, max_delta]``.

    Update rule::

        u = min(max(g, -c), c)

    Complex numbers have no order: complex updates raise a ``ValueError`` (clip them
    by norm instead).

    Args:
      max_delta: ``c > 0``.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.clip(1.0)
      >>> tx.update(jnp.array([-3.0, 0.5]), tx.init(None))[0].tolist()
      [-1.0, 0.5]

    References:
      ``optax.clip``; ``torch.nn.utils.clip_grad_value_``.
    """
    _base.check_in_range("max_delta", max_delta, low=0.0, low_inclusive=False)

    def clip_leaf(g):
        if jnp.issubdtype(g.dtype, jnp.complexfloating):
            raise ValueError(
                f"clip needs real updates, got a {jnp.dtype(g.dtype).name} leaf (complex "
                "numbers have no order): use clip_by_norm or clip_by_global_norm"
            )
        return jnp.clip(g, -max_delta, max_delta).astype(g.dtype)

    return _flatten.mark_elementwise(
        _stateless(lambda updates, params: jax.tree.map(clip_leaf, updates))
    )


def clip_by_norm(max_norm: ArrayLike) -> optax.GradientTransformation:
    """Rescales each leaf separately so that its Euclidean norm is at most ``max_norm``.

    Update rule, for each leaf ``g``::

        u = g                       if ||g|| < c
        u = g * c / ||g||           otherwise,   ||g|| = sqrt(sum_j |g_j|^2)

    Args:
      max_norm: ``c > 0``.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.clip_by_norm(1.0)
      >>> tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))[0]["w"].tolist()
      [0.6000000238418579, 0.800000011920929]

    References:
      ``optax.clip_by_block_rms`` is the RMS analogue; torch's
      ``clip_grad_norm_`` applied to each parameter on its own.
    """
    _base.check_in_range("max_norm", max_norm, low=0.0, low_inclusive=False)
    return _stateless(
        lambda updates, params: jax.tree.map(
            lambda g: _rescale(g, euclidean_norm(g), max_norm), updates
        )
    )


def clip_by_global_norm(
    max_norm: ArrayLike, norm_type: float = 2.0
) -> optax.GradientTransformation:
    """Rescales all updates together so that their global norm is at most ``max_norm``.

    Update rule, with the p-norm over all leaves ``i`` and entries ``j``::

        u = g                       if ||g||_p < c
        u = g * c / ||g||_p         otherwise,
        ||g||_p = (sum_i sum_j |g_ij|^p)^(1/p),     ||g||_inf = max_ij |g_ij|

    With ``p = 2`` (the default), ``||g||_2 = global_norm(g)``.

    Args:
      max_norm: ``c > 0``.
      norm_type: ``p``: a number ``> 0`` or ``float("inf")``; torch's ``norm_type``.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.clip_by_global_norm(1.0)
      >>> u, _ = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(None))
      >>> [round(float(u["a"][0]), 6), round(float(u["b"][0]), 6)]
      [0.6, 0.8]

    References:
      Pascanu et al. (2013). The same numbers as ``optax.clip_by_global_norm`` (which
      has only ``p = 2``). ``torch.nn.utils.clip_grad_norm_(params, c, norm_type=p)``
      takes the same norm but multiplies by ``min(1, c / (||g||_p + 1e-6))``: it
      shrinks by a relative ``1e-6 / ||g||_p`` more, and already slightly below ``c``.
    """
    _base.check_in_range("max_norm", max_norm, low=0.0, low_inclusive=False)
    norm_type = _check_norm_type(norm_type)

    def update_leaves(updates, params):
        del params
        leaves = _flatten.leaf_views(updates)
        if not leaves:
            return updates
        if norm_type == 2.0:
            norm = global_norm(updates)
        else:
            norm = _global_p_norm(leaves, norm_type)
        return jax.tree.map(lambda g: _rescale(g, norm, max_norm), updates)

    # On flat buffers the norm adds the same per-leaf partial sums in the same order
    # (``_flatten.leaf_views``), so both layouts give bitwise the same update.
    return _flatten.mark_elementwise(_stateless(update_leaves))


def unitwise_norm(x: jax.Array) -> jax.Array:
    """Norm of each output unit of ``x``, broadcast to ``x``'s shape.

    Scalars and vectors form one unit. Otherwise the last axis indexes the output
    units (flax's ``(in, out)`` dense and ``(h, w, in, out)`` conv kernels) and the
    norm runs over all other axes.
    """
    if x.ndim <= 1:
        norm = euclidean_norm(x)
        return jnp.broadcast_to(norm, x.shape)
    norm = euclidean_norm(x, axis=tuple(range(x.ndim - 1)), keepdims=True)
    return jnp.broadcast_to(norm, x.shape)


def adaptive_grad_clip(clipping: ArrayLike, eps: ArrayLike = 1e-3) -> optax.GradientTransformation:
    """Adaptive gradient clipping: clips each unit's gradient relative to its weight norm.

    Update rule, for each output unit ``i`` with weights ``W_i`` and gradient ``G_i``::

        m_i = lambda * max(||W_i||, eps)
        u_i = G_i                         if ||G_i|| < m_i
        u_i = G_i * m_i / ||G_i||         otherwise

    Args:
      clipping: ``lambda > 0``, the largest allowed ratio of gradient to weight norm.
      eps: ``eps > 0``, the floor on the weight norm (so zero-initialised weights can move).

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.adaptive_grad_clip(0.1)
      >>> w = jnp.array([3.0, 4.0])                    # ||W|| = 5, so m = 0.5
      >>> tx.update(jnp.array([0.0, 1.0]), tx.init(w), w)[0].tolist()
      [0.0, 0.5]

    References:
      Brock et al., "High-Performance Large-Scale Image Recognition Without
      Normalization" (2021). Units are the last axis (output features in Flax's
      layouts): the norm runs over all other axes. ``optax.adaptive_grad_clip`` gives
      the same numbers for vectors, 2-D dense kernels with more than one input and
      4-D conv kernels; it differs on ``(1, N)`` kernels (which it treats as vectors)
      and on 3-D leaves (where it reduces over the first axis only).
    """
    _base.check_in_range("clipping", clipping, low=0.0, low_inclusive=False)
    _base.check_in_range("eps", eps, low=0.0, low_inclusive=False)

    def update_leaves(updates, params):
        if params is None:
            raise ValueError("adaptive_grad_clip needs params: call update(updates, state, params)")
        _base.check_trees_match(params, updates, expected_name="params", got_name="updates")

        def clip_leaf(g, p):
            max_norm = clipping * jnp.maximum(unitwise_norm(p), eps)
            g_norm = unitwise_norm(g)
            ratio = max_norm / jnp.maximum(g_norm, 1e-6)  # float32 or wider
            clipped = (g.astype(jnp.promote_types(g.dtype, ratio.dtype)) * ratio).astype(g.dtype)
            return jnp.where(g_norm < max_norm, g, clipped).astype(g.dtype)

        return jax.tree.map(clip_leaf, updates, params)

    return _stateless(update_leaves)
