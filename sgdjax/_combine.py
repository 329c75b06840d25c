"""Combinators: chains, masks, parameter groups, run-time hyperparameters, applying updates.

These are thin, documented layers over optax's combinators, so sgdjax and optax
transforms mix freely inside them in either direction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sgdjax import _base, _flatten

# Arguments of sgdjax factories that are never numeric hyperparameters.
_ALWAYS_STATIC = frozenset({"mask", "accumulator_dtype", "norm_type"})


def _check_transforms(name: str, transforms: Iterable[Any]) -> None:
    for index, transform in enumerate(transforms):
        if not (hasattr(transform, "init") and hasattr(transform, "update")):
            raise ValueError(
                f"{name}[{index}] must be an optax.GradientTransformation, got {transform!r}"
            )


def chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformation:
    """Applies transforms one after another, feeding each one's output to the next.

    Update rule::

        u = f_n(... f_2(f_1(g)))

    Args:
      *transforms: sgdjax or optax ``GradientTransformation`` values.

    Returns:
      An ``optax.GradientTransformation`` whose state is the tuple of inner states.

    Example:
      >>> import optax, sgdjax
      >>> tx = sgdjax.chain(sgdjax.clip_by_global_norm(1.0), optax.scale(-0.1))

    Layout: when every transform is element-wise (sgdjax's scaling, decay, momentum
    and learning-rate pieces, ``clip`` and ``clip_by_global_norm``, and chains of
    them), ``init`` picks the layout from the params: one flat buffer per dtype for
    many small leaves, one buffer per leaf otherwise
    (``sgdjax._flatten.prefers_flat_layout``). The numbers are bitwise the same either
    way (a global norm adds the same per-leaf partial sums in the same order); only
    the state's leaves differ. Inside ``jit``, the temporaries the
    step shares with the new state are recomputed rather than stored
    (``sgdjax._flatten.recompute_temporaries``), with bitwise the same results.

    References:
      ``optax.chain``, with argument checks and the layout above.
    """
    _check_transforms("transforms", transforms)
    elementwise = all(_flatten.is_elementwise(t) for t in transforms)
    return _flatten.automatic_layout(optax.chain(*transforms), elementwise=elementwise)


def named_chain(*pairs: tuple[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """Like :func:`chain`, with each inner state reachable by name.

    Args:
      *pairs: ``(name, transform)`` tuples with distinct names.

    Returns:
      An ``optax.GradientTransformation`` whose state is a dict ``name -> state``.

    Example:
      >>> import sgdjax
      >>> tx = sgdjax.named_chain(("momentum", sgdjax.momentum(0.9)),
      ...                         ("lr", sgdjax.scale_by_learning_rate(0.1)))

    References:
      ``optax.named_chain``.
    """
    names = [pair[0] for pair in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"pairs must have distinct names, got {names}")
    _check_transforms("pairs", (pair[1] for pair in pairs))
    return optax.named_chain(*pairs)


def masked(inner: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """Applies ``inner`` only to the leaves where ``mask`` is True; others pass through.

    Args:
      inner: the transform to apply to the selected leaves.
      mask: a pytree of bools shaped like the params, or a callable ``params -> mask``.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import sgdjax
      >>> no_bias_decay = sgdjax.masked(sgdjax.add_decayed_weights(5e-4),
      ...                               lambda p: {k: k != "bias" for k in p})

    References:
      ``optax.masked``.
    """
    _check_transforms("inner", [inner])
    return optax.masked(inner, mask)


def multi_transform(
    transforms: Mapping[Hashable, optax.GradientTransformation],
    param_labels: Any,
) -> optax.GradientTransformation:
    """Parameter groups: applies a different transform to each labelled set of leaves.

    Args:
      transforms: a mapping ``label -> transform``.
      param_labels: a pytree of labels shaped like the params, or a callable
        ``params -> labels``. Every label must be a key of ``transforms``.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import sgdjax
      >>> tx = sgdjax.multi_transform(
      ...     {"decay": sgdjax.sgd(0.1, momentum=0.9, weight_decay=5e-4),
      ...      "no_decay": sgdjax.sgd(0.1, momentum=0.9)},
      ...     lambda p: {k: "no_decay" if k == "bias" else "decay" for k in p})

    References:
      ``optax.multi_transform``; torch's parameter groups.
    """
    if not transforms:
        raise ValueError("transforms must name at least one transform, got {}")
    _check_transforms("transforms", transforms.values())

    def checked_labels(params):
        labels = param_labels(params) if callable(param_labels) else param_labels
        unknown = sorted(
            {str(label) for label in jax.tree.leaves(labels)} - set(map(str, transforms))
        )
        if unknown:
            raise ValueError(
                f"param_labels uses labels {unknown} that are not keys of transforms "
                f"{sorted(map(str, transforms))}"
            )
        return labels

    return optax.multi_transform(dict(transforms), checked_labels)


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    *,
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: Any = jnp.float32,
) -> Callable[..., optax.GradientTransformation]:
    """Makes a factory's numeric hyperparameters part of the state, changeable at run time.

    ``inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9)`` behaves like
    ``sgdjax.sgd(0.1, momentum=0.9)``, and its state holds
    ``state.hyperparams["learning_rate"]``, which can be read for logging or replaced
    between steps. A schedule given for a hyperparameter is evaluated at each step
    and its current value stored there.

    Args:
      factory: a function returning a ``GradientTransformation``.
      static_args: a name, or names, of arguments that are not hyperparameters
        (``mask``, ``accumulator_dtype`` and ``norm_type`` are always static;
        booleans are static anyway).
      hyperparam_dtype: the dtype hyperparameters are stored in; float32 by default
        so that a bfloat16 model does not round its learning rate to bfloat16.

    Returns:
      A factory with the same signature.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9)
      >>> state = tx.init(jnp.zeros(3))
      >>> round(float(state.hyperparams["learning_rate"]), 6)
      0.1

    References:
      ``optax.inject_hyperparams``, which stores hyperparameters in the params' dtype.
    """
    parameters = inspect.signature(factory).parameters
    if isinstance(static_args, str):
        static_args = (static_args,)
    static = set(static_args) | (_ALWAYS_STATIC & set(parameters))
    unknown = sorted(set(static_args) - set(parameters))
    if unknown:
        raise ValueError(f"static_args names {unknown}, which are not arguments of {factory}")
    return optax.inject_hyperparams(
        factory, static_args=tuple(sorted(static)), hyperparam_dtype=hyperparam_dtype
    )


def apply_updates(params: Any, updates: Any) -> Any:
    """Adds updates to params, keeping each parameter's dtype.

    Update rule::

        theta_t = theta_{t-1} + u_t

    The sum is computed in the wider of the two dtypes and cast back to the
    parameter's, so a float32 update to a bfloat16 parameter rounds once.

    Args:
      params: a pytree of arrays.
      updates: a pytree of the same structure (``None`` leaves leave params as they are).

    Returns:
      The new params.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> sgdjax.apply_updates({"w": jnp.ones(2)}, {"w": -jnp.ones(2)})["w"].tolist()
      [0.0, 0.0]

    References:
      ``optax.apply_updates``.
    """
    is_none = lambda x: x is None  # noqa: E731
    if not any(u is None for u in jax.tree.leaves(updates, is_leaf=is_none)):
        _base.check_trees_match(params, updates, expected_name="params", got_name="updates")

    def leaf(p, u):
        if u is None:
            return p
        p = jnp.asarray(p)
        return (p + u).astype(p.dtype)

    return jax.tree.map(leaf, params, updates, is_leaf=lambda x: x is None)
