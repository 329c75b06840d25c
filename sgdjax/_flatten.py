"""Layouts of an update: one flat buffer per dtype or per leaf, and recomputed temporaries.

Two arrangements that change how XLA runs an update, never its numbers:

* **Layout.** On a tree of many small leaves, one flat buffer per dtype turns
  hundreds of tiny kernels into a few large ones; on a few large leaves the
  packing copies cost more than they save. :func:`flatten` asks for flat buffers
  explicitly; :func:`chain` picks the layout at ``init`` from the tree
  (:func:`prefers_flat_layout`) when every transform in it is element-wise.
* **Recomputation.** With Nesterov momentum, ``g' = c g + lambda theta`` feeds both
  the new buffer and the step, and XLA writes it to a temporary as large as the
  parameters. :func:`recompute_temporaries` evaluates the update twice from the same
  inputs (the second time behind an ``optimization_barrier``, so XLA cannot merge the
  two), keeps the new state from the first and the step from the second, and lets
  the step reuse every value that is part of the new state or not element-wise. XLA
  then fuses each into one loop and drops the temporary; every value is computed by
  the same operations on the same operands, so the results are bitwise the same.
"""

from __future__ import annotations

import contextvars
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

# ---------------------------------------------------------------- flat buffers


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
        return _flat_update(inner, updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _flat_update(inner, updates, state, params, **extra_args):
    groups = _groups(updates)
    flat_params = None if params is None else _pack(params, groups)
    # A flat update of buffers that are already flat (``flatten`` around a ``chain`` that
    # picked flat buffers) keeps the segments of the original leaves.
    outer = _matching_segments(updates)
    token = _FLAT_SEGMENTS.set(outer if outer is not None else _segments(updates, groups))
    try:
        flat_updates, state = inner.update(_pack(updates, groups), state, flat_params, **extra_args)
    finally:
        _FLAT_SEGMENTS.reset(token)
    return _unpack(flat_updates, updates, groups), state


# Inside a flat update: where each leaf of the params lies in the flat buffers, so that
# reductions over all values (a global norm) add per-leaf partial sums in leaf order,
# as they do per leaf, and give bitwise the same numbers.
_FLAT_SEGMENTS = contextvars.ContextVar("sgdjax_flat_segments", default=None)


def _segments(tree: Any, groups: dict[str, list[int]]) -> tuple:
    """``((name, start, stop), ...)`` of each leaf of ``tree`` in leaf order, and totals."""
    leaves = jax.tree.leaves(tree)
    found: list[Any] = [None] * len(leaves)
    totals = {}
    for name, indices in groups.items():
        start = 0
        for i in indices:
            stop = start + math.prod(np.shape(leaves[i]))
            found[i] = (name, start, stop)
            start = stop
        totals[name] = start
    return tuple(found), totals


def leaf_views(tree: Any) -> list[jax.Array]:
    """The leaves of ``tree`` as 1-D arrays, in the params' leaf order in either layout.

    Per leaf, each leaf reshaped to 1-D. Inside a flat update, when ``tree`` is the flat
    buffers themselves, the slice of each original leaf, in the original leaf order. A
    reduction that sums per-leaf partial sums of these views in order (as
    :func:`sgdjax.global_norm` does) gives bitwise the same value in both layouts.
    """
    layout = _matching_segments(tree)
    if layout is not None:
        return [tree[name][start:stop] for name, start, stop in layout[0]]
    return [jnp.reshape(leaf, (-1,)) for leaf in jax.tree.leaves(tree)]


def _matching_segments(tree: Any):
    """The current flat update's segments if ``tree`` is its flat buffers, else None."""
    layout = _FLAT_SEGMENTS.get()
    if layout is None:
        return None
    totals = layout[1]
    if (
        isinstance(tree, dict)
        and set(tree) == set(totals)
        and all(np.shape(tree[name]) == (total,) for name, total in totals.items())
    ):
        return layout
    return None


# ---------------------------------------------------------------- the automatic layout

# Measured crossover (benchmarks/layout_crossover.py, docs/benchmarks.md): flat buffers
# win on trees of at least this many leaves whose mean size is at most this many values
# (faster at a mean of 1,024 values, even at 2,048, slower at 4,096 and above).
FLAT_MIN_LEAVES = 16
FLAT_MAX_MEAN_SIZE = 2048

# Update functions of transforms that act on each value alone, or through reductions
# over all values (a global norm): applied to flat buffers they keep their meaning.
_ELEMENTWISE_UPDATES: weakref.WeakSet = weakref.WeakSet()


def mark_elementwise(transform: optax.GradientTransformation) -> optax.GradientTransformation:
    """Records that ``transform`` may run on flat buffers, and returns it."""
    _ELEMENTWISE_UPDATES.add(transform.update)
    return transform


def is_elementwise(transform: optax.GradientTransformation) -> bool:
    """Whether ``transform`` was marked by :func:`mark_elementwise`."""
    return transform.update in _ELEMENTWISE_UPDATES


def _sharding(leaf: Any):
    if isinstance(leaf, jax.core.Tracer):
        return None
    return getattr(leaf, "sharding", None)


def prefers_flat_layout(params: Any) -> bool:
    """The layout rule: flat buffers for many small leaves, one buffer per leaf otherwise.

    Flat when the tree has at least ``FLAT_MIN_LEAVES`` leaves of mean size at most
    ``FLAT_MAX_MEAN_SIZE`` values, and all leaves with a known sharding share one that
    is fully addressable and replicated (or on one device): concatenating leaves
    sharded differently would move data between devices.
    """
    leaves = jax.tree.leaves(params)
    if len(leaves) < FLAT_MIN_LEAVES:
        return False
    size = sum(math.prod(np.shape(leaf)) for leaf in leaves)
    if size > FLAT_MAX_MEAN_SIZE * len(leaves):
        return False
    shardings = {_sharding(leaf) for leaf in leaves} - {None}
    if len(shardings) > 1:
        return False
    for sharding in shardings:
        if not sharding.is_fully_addressable:
            return False
        if len(sharding.device_set) > 1 and not sharding.is_fully_replicated:
            return False
    return True


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _same_layout(state: Any, expected: Any) -> bool:
    if jax.tree.structure(state) != jax.tree.structure(expected):
        return False
    return all(
        np.shape(a) == np.shape(b)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected))
    )


def automatic_layout(
    inner: optax.GradientTransformation, *, elementwise: bool
) -> optax.GradientTransformation:
    """``inner`` with its layout chosen at ``init`` and its temporaries recomputed.

    If ``elementwise`` and :func:`prefers_flat_layout` holds for the params given to
    ``init``, the state is ``inner``'s state on flat buffers (as :func:`flatten`), else
    ``inner``'s own. ``update`` reads the layout from the state's structure, so the
    state stays a tree of arrays (stable under ``lax.cond``, restorable from a
    checkpoint) and ``init`` works on ``jax.ShapeDtypeStruct``. Inside a trace,
    ``update`` runs through :func:`recompute_temporaries`.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        if elementwise and prefers_flat_layout(params):
            return inner.init(_pack(params, _groups(params)))
        return inner.init(params)

    def flat_init(params):
        return inner.init(_pack(params, _groups(params)))

    def layout_update(updates, state, params=None, **extra_args):
        if elementwise and _same_layout(state, jax.eval_shape(flat_init, _abstract(updates))):
            return _flat_update(recompute_temporaries(inner), updates, state, params, **extra_args)
        return recompute_temporaries(inner).update(updates, state, params, **extra_args)

    transform = optax.GradientTransformationExtraArgs(init_fn, layout_update)
    return mark_elementwise(transform) if elementwise else transform


# ---------------------------------------------------------------- recomputed temporaries

# Primitives whose outputs are cheaper to recompute inside the step's loop than to
# write to memory and read back (each output value depends on the same position of
# its operands, or on scalars).
_RECOMPUTABLE = frozenset(
    """abs add and ceil clamp convert_element_type copy copy_p div eq exp expm1 floor ge gt
    integer_pow is_finite le log log1p logistic lt max min mul ne neg nextafter not or pow
    real imag conj complex rem round rsqrt select_n sign sqrt square sub tanh xor
    broadcast_in_dim reshape squeeze expand_dims""".split()
)
_INLINED_CALLS = frozenset({"jit", "pjit"})
_RECOMPUTING = contextvars.ContextVar("sgdjax_recomputing", default=False)


def _walk(jaxpr, consts, args, visit):
    """Evaluates ``jaxpr``, inlining nested jit calls; ``visit(eqn, invals)`` runs the rest."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(atom):
        return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    for eqn in jaxpr.eqns:
        invals = [read(atom) for atom in eqn.invars]
        if eqn.primitive.name in _INLINED_CALLS:
            closed = eqn.params["jaxpr"]
            outvals = _walk(closed.jaxpr, closed.consts, invals, visit)
        else:
            outvals = visit(eqn, invals)
        env.update(zip(eqn.outvars, outvals))
    return [read(atom) for atom in jaxpr.outvars]


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    outvals = eqn.primitive.bind(*invals, **params)
    return outvals if eqn.primitive.multiple_results else [outvals]


def _evaluate_twice(function, num_updates, args):
    """``function(*args)``'s flat outputs: the first ``num_updates`` recomputed, the rest not."""
    closed = jax.make_jaxpr(function)(*args)
    flat_args = jax.tree.leaves(args)
    first_outputs = []

    def first(eqn, invals):
        first_outputs.append(_bind(eqn, invals))
        return first_outputs[-1]

    outputs = _walk(closed.jaxpr, closed.consts, flat_args, first)
    kept = {id(value) for value in outputs[num_updates:]}
    recorded = iter(first_outputs)

    def second(eqn, invals):
        previous = next(recorded)
        if eqn.primitive.name in _RECOMPUTABLE and not any(id(v) in kept for v in previous):
            return _bind(eqn, invals)
        return previous

    behind_barrier = jax.lax.optimization_barrier(flat_args)
    recomputed = _walk(closed.jaxpr, closed.consts, behind_barrier, second)
    return recomputed[:num_updates] + outputs[num_updates:]


def recompute_temporaries(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` with the temporaries its step and its new state share recomputed.

    Update rule: that of ``inner``, bitwise. Inside a trace (``jit``, ``vmap``,
    ``pmap``), the update is evaluated once for the new state and once, from the
    inputs behind an ``optimization_barrier``, for the step; the step reuses the new
    state and every value that is not element-wise (norms, counts) and recomputes the
    element-wise rest. Outside a trace, and inside another recomputing update, it is
    ``inner`` unchanged.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        leaves = jax.tree.leaves((updates, state, params, extra_args))
        if _RECOMPUTING.get() or not any(isinstance(x, jax.core.Tracer) for x in leaves):
            return inner.update(updates, state, params, **extra_args)
        structure = {}

        def flat_update(updates, state, params, extra_args):
            result = inner.update(updates, state, params, **extra_args)
            outputs, structure["tree"] = jax.tree.flatten(result)
            structure["updates"] = len(jax.tree.leaves(result[0]))
            return outputs

        token = _RECOMPUTING.set(True)
        try:
            jax.eval_shape(flat_update, updates, state, params, extra_args)
            outputs = _evaluate_twice(
                flat_update, structure["updates"], (updates, state, params, extra_args)
            )
        finally:
            _RECOMPUTING.reset(token)
        return jax.tree.unflatten(structure["tree"], outputs)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
