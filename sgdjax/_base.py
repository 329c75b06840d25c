"""Shared types, argument validation and tree checks for sgdjax transforms."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Schedule = Callable[[ArrayLike], jax.Array]
ScalarOrSchedule = float | jax.Array | Schedule
MaskOrFn = Any | Callable[[Any], Any] | None

_INT32_MAX = np.iinfo(np.int32).max


def is_traced(value: Any) -> bool:
    """Whether ``value`` is an abstract value seen while tracing (no number to check)."""
    return isinstance(value, jax.core.Tracer)


def check_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Returns concrete ``value`` as a float, or raises a ``ValueError`` naming ``name``.

    The value must be a finite real scalar in the range from ``low`` to ``high``
    (each end included unless its flag says otherwise).
    """
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - any conversion failure is a bad argument
        raise ValueError(f"{name} must be a real number, got {value!r}") from error
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be a real scalar, got {value!r}")
    number = float(array)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    above = number >= low if low_inclusive else number > low
    below = number <= high if high_inclusive else number < high
    if not (above and below):
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value!r}")
    return number


def check_in_range(name: str, value: Any, **bounds: Any) -> None:
    """Raises a ``ValueError`` naming ``name`` unless ``value`` is a finite number in range.

    ``bounds`` are :func:`check_real`'s (``low``, ``high``, ``low_inclusive``,
    ``high_inclusive``). Traced values (hyperparameters injected at run time) are not
    checked: there is no number to check while tracing, and Python control flow on them
    would fail.
    """
    if not is_traced(value):
        check_real(name, value, **bounds)


def check_scalar_or_schedule(name: str, value: Any) -> None:
    """Checks a learning-rate-like argument: a finite number >= 0, or a callable schedule."""
    if callable(value):
        return
    check_in_range(name, value, low=0.0)


def is_static_zero(value: Any) -> bool:
    """True only for a concrete (Python or NumPy) zero; arrays and tracers count as non-zero.

    Aliases use it to leave out a transform whose hyperparameter is zero, while a
    hyperparameter injected as an array keeps the transform in place.
    """
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return float(value) == 0.0
    if isinstance(value, np.ndarray) and value.shape == ():
        return float(value) == 0.0
    return False


def evaluate(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """Evaluates a constant or a schedule at ``count``."""
    return value(count) if callable(value) else jnp.asarray(value)


def safe_increment(count: jax.Array) -> jax.Array:
    """Adds one to an int32 step counter without wrapping past the int32 maximum."""
    return jnp.where(count < _INT32_MAX, count + 1, count).astype(jnp.int32)


def zero_count() -> jax.Array:
    """A new int32 step counter."""
    return jnp.zeros([], jnp.int32)


def _describe_leaf(leaf: Any) -> str:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None:
        return type(leaf).__name__
    return f"{jnp.dtype(dtype).name}{list(shape)}"


def check_trees_match(
    expected: Any, got: Any, *, expected_name: str, got_name: str, shapes: bool = True
) -> None:
    """Raises a ``ValueError`` explaining how two trees differ in structure or leaf shapes.

    Runs at trace time only (structures and shapes are static), so it costs nothing
    inside a jitted step.
    """
    expected_leaves = dict(jax.tree_util.tree_leaves_with_path(expected))
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
    expected_paths = {jax.tree_util.keystr(path): leaf for path, leaf in expected_leaves.items()}
    got_paths = {jax.tree_util.keystr(path): leaf for path, leaf in got_leaves.items()}
    missing = sorted(set(expected_paths) - set(got_paths))
    extra = sorted(set(got_paths) - set(expected_paths))
    problems = []
    if missing:
        problems.append(f"missing from {got_name}: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"not in {expected_name}: {', '.join(extra[:5])}")
    if not problems and shapes:
        for path, leaf in expected_paths.items():
            other = got_paths[path]
            if getattr(leaf, "shape", None) != getattr(other, "shape", None):
                problems.append(
                    f"leaf {path or '<root>'} has shape {_describe_leaf(other)} in {got_name} "
                    f"but {_describe_leaf(leaf)} in {expected_name}"
                )
                break
    if not problems and jax.tree.structure(expected) != jax.tree.structure(got):
        problems.append(
            f"tree structure {jax.tree.structure(got)} differs from {jax.tree.structure(expected)}"
        )
    if problems:
        raise ValueError(
            f"{got_name} does not match {expected_name} ({len(got_paths)} vs "
            f"{len(expected_paths)} leaves): " + "; ".join(problems)
        )


def resolve_mask(mask: MaskOrFn, params: Any) -> Any:
    """Returns a tree of Python bools shaped like ``params`` (all True when ``mask`` is None).

    ``mask`` is a tree of bools with the structure of ``params`` or a prefix of it, or a
    callable returning one.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    tree = mask(params) if callable(mask) else mask
    try:
        # A mask may be a prefix of the params: one bool then covers a whole subtree.
        return jax.tree.map(
            lambda flag, subtree: jax.tree.map(lambda _: flag, subtree), tree, params
        )
    except ValueError:
        check_trees_match(params, tree, expected_name="params", got_name="mask", shapes=False)
        raise


def tree_map_split(fn: Callable[..., tuple], num_outputs: int, tree: Any, *rest: Any) -> tuple:
    """Maps ``fn`` returning ``num_outputs`` values over leaves; returns one tree per output.

    Unlike splitting a tree of tuples afterwards, this is safe when the tree's own
    containers are tuples.
    """
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(other) for other in rest]
    results = [fn(*args) for args in zip(leaves, *rest_leaves)]
    if not results:
        return tuple(treedef.unflatten([]) for _ in range(num_outputs))
    return tuple(treedef.unflatten(list(column)) for column in zip(*results))


def find_state(tree: Any, state_type: type | tuple[type, ...]) -> Any | None:
    """The first node of type ``state_type`` inside ``tree`` (e.g. an optimizer state)."""
    found: list[Any] = []

    def visit(node):
        if isinstance(node, state_type):
            found.append(node)
            return True
        return False

    jax.tree.map(lambda _: None, tree, is_leaf=visit)
    return found[0] if found else None
