"""Optimizer diagnostics as a pure transform: norms, ratios and clipping, in the state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from sgdjax import _base
from sgdjax._clipping import euclidean_norm, global_norm


class DiagnosticsState(NamedTuple):
    """State of :func:`diagnostics`.

    Attributes:
      inner_state: the wrapped transform's state.
      count: int32 updates taken.
      clipped_steps: int32 updates whose gradient norm exceeded the clip threshold.
      layers: per-leaf float32 values of the latest update, keyed by the leaf's path:
        ``{"grad_norm": {...}, "update_norm": {...}, "update_ratio": {...}}``.
      totals: global float32 values of the latest update: ``grad_norm``,
        ``update_norm``, ``param_norm``, ``update_ratio``, ``effective_learning_rate``.
    """

    inner_state: Any
    count: jax.Array
    clipped_steps: jax.Array
    layers: dict[str, dict[str, jax.Array]]
    totals: dict[str, jax.Array]


def _norm(x):
    return euclidean_norm(x).astype(jnp.float32)


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _values(params, grads, updates):
    paths = _paths(params)
    g = [_norm(x) for x in jax.tree.leaves(grads)]
    u = [_norm(x) for x in jax.tree.leaves(updates)]
    p = [_norm(x) for x in jax.tree.leaves(params)]
    layers = {
        "grad_norm": dict(zip(paths, g)),
        "update_norm": dict(zip(paths, u)),
        "update_ratio": {k: un / jnp.maximum(pn, 1e-12) for k, un, pn in zip(paths, u, p)},
    }
    grad_total, update_total, param_total = (
        global_norm(grads),
        global_norm(updates),
        global_norm(params),
    )
    totals = {
        "grad_norm": grad_total,
        "update_norm": update_total,
        "param_norm": param_total,
        "update_ratio": update_total / jnp.maximum(param_total, 1e-12),
        "effective_learning_rate": update_total / jnp.maximum(grad_total, 1e-12),
    }
    return layers, totals


def diagnostics(
    inner: optax.GradientTransformation, *, clip_threshold: ArrayLike | None = None
) -> optax.GradientTransformation:
    """Wraps ``inner`` and records per-layer and global diagnostics in the state.

    Recorded for every update (no host callbacks, so it works under ``jit``,
    ``pmap`` and ``scan``)::

        grad_norm_l = ||g_l||          update_norm_l = ||u_l||
        update_ratio_l = ||u_l|| / ||theta_l||
        effective_learning_rate = ||u|| / ||g||
        clipped_fraction = #{t : ||g_t|| > clip_threshold} / t

    The updates themselves are ``inner``'s, unchanged. Read the values with
    :func:`diagnostics_metrics`.

    Args:
      inner: the transform to observe.
      clip_threshold: the global-norm threshold of the clipping inside ``inner``
        (e.g. ``clip_by_global_norm``'s ``max_norm``) to count clipped steps; ``None``
        counts none.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DiagnosticsState`;
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.diagnostics(sgdjax.sgd(0.1))
      >>> p = {"w": jnp.ones(4)}
      >>> _, state = tx.update({"w": jnp.ones(4)}, tx.init(p), p)
      >>> round(float(sgdjax.diagnostics_metrics(state)["effective_learning_rate"]), 6)
      0.1
    """
    if clip_threshold is not None:
        _base.check_in_range("clip_threshold", clip_threshold, low=0.0, low_inclusive=False)

    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        layers, totals = _values(params, params, params)
        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), tree)  # noqa: E731
        return DiagnosticsState(
            inner.init(params), _base.zero_count(), _base.zero_count(), zeros(layers), zeros(totals)
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("diagnostics needs params: call update(updates, state, params)")
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        layers, totals = _values(params, updates, new_updates)
        clipped = state.clipped_steps
        if clip_threshold is not None:
            clipped = clipped + (totals["grad_norm"] > clip_threshold).astype(jnp.int32)
        return new_updates, DiagnosticsState(
            inner_state, _base.safe_increment(state.count), clipped, layers, totals
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diagnostics_metrics(state: DiagnosticsState) -> dict[str, jax.Array]:
    """Flat metrics from a :class:`DiagnosticsState` (found anywhere inside ``state``).

    Names: the global ``grad_norm``, ``update_norm``, ``param_norm``, ``update_ratio``,
    ``effective_learning_rate``, ``clipped_fraction``, and per layer
    ``grad_norm/<path>``, ``update_norm/<path>``, ``update_ratio/<path>``.
    """
    diag = _base.find_state(state, DiagnosticsState)
    if diag is None:
        raise ValueError("no DiagnosticsState found: wrap the optimizer in sgdjax.diagnostics")
    metrics = dict(diag.totals)
    metrics["clipped_fraction"] = diag.clipped_steps / jnp.maximum(diag.count, 1)
    for name, values in diag.layers.items():
        for path, value in values.items():
            metrics[f"{name}/{path.strip('[]').replace(chr(39), '').replace('][', '/')}"] = value
    return metrics
