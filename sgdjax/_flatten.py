"""Run a transform on one flat buffer per dtype instead of on every leaf."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _groups(tree: Any) -> dict[str, list[int]]:
    """Leaf indices of ``tree`` grouped by dtype name, in leaf order."""
    groups: dict[str, list[int]] = {}
    for index, leaf in enumerate(jax.tree.leaves(tree)):
        groups.setdefault(jnp.dtype(leaf.dtype).name, []).append(index)
    return groups


def _pack(tree: Any, groups: dict[str, list[int]]) -> dict[str, jax.Array]:
    """Concatenates the leaves of each dtype group into one vector."""
    leaves = jax.tree.leaves(tree)
    return {
        name: jnp.concatenate([jnp.reshape(leaves[i], (-1,)) for i in indices])
        for name, indices in groups.items()
    }


def _unpack(flat: dict[str, jax.Array], like: Any, groups: dict[str, list[int]]) -> Any:
    """Splits packed vectors back into a tree shaped like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    out: list[Any] = [None] * len(leaves)
    for name, indices in groups.items():
        sizes = [int(np.prod(leaves[i].shape)) for i in indices]
        pieces = jnp.split(flat[name], np.cumsum(sizes)[:-1])
        for i, piece in zip(indices, pieces):
            out[i] = jnp.reshape(piece, leaves[i].shape)
    return jax.tree.unflatten(treedef, out)


def flatten(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Applies ``inner`` to one flat vector per dtype instead of to each leaf.

    Update rule::

        u = unpack(inner(pack(g)))

    where ``pack`` concatenates all leaves of the same dtype into one vector (float32
    leaves into one, bfloat16 leaves into another, so no dtype is promoted) and
    ``unpack`` splits the result back. The inner state is flat too. On a tree of
    many small leaves this replaces hundreds of tiny operations by a few large ones;
    on a few large leaves the copies cost more than they save: measure
    (``benchmarks/update_overhead.py``).

    Only element-wise transforms and global reductions keep their meaning when
    flattened (``sgd``, ``sgdw``, ``momentum``, ``clip``, ``clip_by_global_norm``,
    weight decay without a mask); ``clip_by_norm``, ``adaptive_grad_clip`` and
    masks need the leaves' shapes and must stay outside.

    Args:
      inner: the transform to run on the flat buffers.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.flatten(sgdjax.sgd(0.1, momentum=0.9))
      >>> params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> updates["b"].shape
      (2, 2)

    References:
      ``optax.flatten`` (which concatenates all leaves into one vector of a single
      promoted dtype).
    """

    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(_pack(params, _groups(params)))

    def update_fn(updates, state, params=None, **extra_args):
        groups = _groups(updates)
        flat_params = None if params is None else _pack(params, groups)
        flat_updates, state = inner.update(_pack(updates, groups), state, flat_params, **extra_args)
        return _unpack(flat_updates, updates, groups), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
