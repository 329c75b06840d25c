"""Muon (``torch.optim.Muon``): momentum orthogonalized by a Newton-Schulz iteration."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from sgdjax import _base
from sgdjax._combine import chain
from sgdjax._decay import decoupled_weight_decay
from sgdjax._scale import scale_by_learning_rate

_LAYOUTS = ("out_in", "in_out")
_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon`.

    Attributes:
      count: int32 number of updates taken.
      momentum_buffer: the average ``B`` of the gradients, shaped like the params.
    """

    count: jax.Array
    momentum_buffer: Any


def _lerp(start: jax.Array, end: jax.Array, weight: ArrayLike) -> jax.Array:
    """``start + weight (end - start)``, in the two forms torch's ``lerp`` uses."""
    low = start + weight * (end - start)
    high = end - (end - start) * (1.0 - weight)
    return jnp.where(jnp.asarray(weight) < 0.5, low, high)


def _newton_schulz(
    matrix: jax.Array,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: Any,
) -> jax.Array:
    """torch's ``_zeropower_via_newtonschulz`` in ``dtype``: ``X <- a X + (b A + c A^2) X``.

    As torch's ``addmm``, each of the three products and its sum is formed in float32
    and rounded to ``dtype`` once; the norm is taken in float32 too. The roundings are
    ``lax.reduce_precision``, which XLA keeps inside ``jit`` (a float32 -> bfloat16 ->
    float32 round trip it may drop, under its default ``xla_allow_excess_precision``).
    """
    a, b, c = coefficients
    wide = jnp.float32
    info = jnp.finfo(dtype)

    def rounded(value):
        value = jax.lax.reduce_precision(value, info.nexp, info.nmant)
        return value.astype(dtype)

    def product(left, right):
        return jnp.matmul(
            left, right, precision=jax.lax.Precision.HIGHEST, preferred_element_type=wide
        )

    x = rounded(matrix.astype(wide))
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        x = x.T
    norm = rounded(jnp.linalg.norm(x.astype(wide)))
    x = rounded(x.astype(wide) / jnp.maximum(norm.astype(wide), rounded(jnp.asarray(eps, wide))))
    for _ in range(steps):
        gram = rounded(product(x, x.T))
        polynomial = rounded(b * gram.astype(wide) + c * product(gram, gram))
        x = rounded(a * x.astype(wide) + product(polynomial, x))
    return x.T if tall else x


def _matrix_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """The ``(rows, columns)`` a leaf is viewed as; rows are torch's output features."""
    if layout == "out_in":
        return shape[0], math.prod(shape[1:])
    return math.prod(shape[:-1]), shape[-1]


def _lr_ratio(shape: tuple[int, int], layout: str, adjust_lr_fn: str | None) -> float:
    """torch's ``_adjust_lr`` factor for a matrix of torch shape ``(A, B)``."""
    fan_out, fan_in = shape if layout == "out_in" else shape[::-1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    return math.sqrt(max(1.0, fan_out / fan_in))


def scale_by_muon(
    momentum: ArrayLike = 0.95,
    *,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    ns_dtype: Any = jnp.float32,
    matrix_layout: str = "out_in",
) -> optax.GradientTransformation:
    """Muon's direction: the orthogonalized momentum, scaled for the matrix's shape.

    Update rule, per matrix (``mu`` the momentum, ``NS`` the Newton-Schulz iteration)::

        B_t = B_{t-1} + (1 - mu) (g_t - B_{t-1}),      B_0 = 0
        M_t = g_t + mu (B_t - g_t)   if nesterov  else  B_t
        X = M_t (transposed if it has more rows than columns),  X <- X / max(||X||_F, eps)
        repeat ns_steps times:  A = X X^T,  X <- a X + (b A + c A A) X
        u_t = r * X   (transposed back)

    with ``r = sqrt(max(1, A / B))`` (``adjust_lr_fn`` None or ``"original"``) or
    ``r = 0.2 sqrt(max(A, B))`` (``"match_rms_adamw"``), ``A`` the output features and
    ``B`` the input features. ``B`` is an average without the first-step copy of torch's
    ``SGD`` momentum. Every leaf must have at least two axes: with ``matrix_layout=
    "out_in"`` (torch's ``Linear.weight`` and ``Conv2d.weight``) a leaf is the matrix
    ``(shape[0], prod(shape[1:]))``; with ``"in_out"`` (Flax's ``Dense`` and ``Conv``
    kernels) it is ``(prod(shape[:-1]), shape[-1])``, the transpose of torch's layout.

    Args:
      momentum: ``mu`` in ``[0, 1)``.
      nesterov: use ``g + mu (B - g)`` rather than ``B``.
      ns_coefficients: ``(a, b, c)``, finite numbers.
      eps: the floor of the norm, ``> 0``.
      ns_steps: the number of iterations, an integer in ``[0, 100)``.
      adjust_lr_fn: ``None``, ``"original"`` or ``"match_rms_adamw"``.
      ns_dtype: the dtype of the iteration: ``jnp.float32`` (default) or
        ``jnp.bfloat16`` (torch's choice, faster on accelerators, about 3 significant
        digits).
      matrix_layout: ``"out_in"`` or ``"in_out"`` (see above); it decides ``A``/``B``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`MuonState`.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.scale_by_muon()
      >>> g = jnp.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5]])
      >>> u, _ = tx.update(g, tx.init(g))
      >>> singular_values = jnp.linalg.svd(u, compute_uv=False)  # all near 1
      >>> bool(jnp.all((singular_values > 0.5) & (singular_values < 1.5)))
      True

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024);
      Liu et al., "Muon is Scalable for LLM Training" (2025);
      ``torch.optim.Muon``, which runs the iteration in bfloat16.
    """
    _base.check_in_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    try:
        coefficients = tuple(ns_coefficients)
    except TypeError as error:
        raise ValueError(f"ns_coefficients must be 3 numbers, got {ns_coefficients!r}") from error
    if len(coefficients) != 3:
        raise ValueError(f"ns_coefficients must be 3 numbers, got {ns_coefficients!r}")
    coefficients = tuple(_base.check_real("ns_coefficients", v) for v in coefficients)
    eps = _base.check_real("eps", eps, low=0.0, low_inclusive=False)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, (int, np.integer)):
        raise ValueError(f"ns_steps must be an integer in [0, 100), got {ns_steps!r}")
    if not 0 <= ns_steps < 100:
        raise ValueError(f"ns_steps must be an integer in [0, 100), got {ns_steps!r}")
    if adjust_lr_fn not in _ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {_ADJUST_LR_FNS}, got {adjust_lr_fn!r}")
    ns_dtype = jnp.dtype(ns_dtype)
    if not jnp.issubdtype(ns_dtype, jnp.floating):
        raise ValueError(f"ns_dtype must be a floating dtype, got {ns_dtype!r}")
    if matrix_layout not in _LAYOUTS:
        raise ValueError(f"matrix_layout must be one of {_LAYOUTS}, got {matrix_layout!r}")

    def check_matrices(tree):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
                raise ValueError(
                    f"muon needs real leaves (as torch), got {jnp.dtype(leaf.dtype).name} at "
                    f"{jax.tree_util.keystr(path) or '<root>'}"
                )
            if len(leaf.shape) < 2:
                raise ValueError(
                    f"muon needs leaves with at least 2 axes, got shape {tuple(leaf.shape)} at "
                    f"{jax.tree_util.keystr(path) or '<root>'} (give such leaves another "
                    "optimizer through multi_transform)"
                )

    def init_fn(params):
        check_matrices(params)
        buffers = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
        return MuonState(count=_base.zero_count(), momentum_buffer=buffers)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _base.check_trees_match(
            state.momentum_buffer, updates, expected_name="muon state", got_name="updates"
        )
        check_matrices(updates)

        def leaf_update(g, b):
            new_b = _lerp(b, g.astype(b.dtype), 1.0 - momentum)
            direction = _lerp(g.astype(b.dtype), new_b, momentum) if nesterov else new_b
            shape = _matrix_shape(g.shape, matrix_layout)
            orthogonal = _newton_schulz(
                direction.reshape(shape), coefficients, ns_steps, eps, ns_dtype
            )
            ratio = _lr_ratio(shape, matrix_layout, adjust_lr_fn)
            out = (orthogonal.astype(jnp.float32) * ratio).reshape(g.shape)
            return out.astype(g.dtype), new_b

        new_updates, new_buffers = _base.tree_map_split(
            leaf_update, 2, updates, state.momentum_buffer
        )
        return new_updates, MuonState(_base.safe_increment(state.count), new_buffers)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def muon(
    learning_rate: _base.ScalarOrSchedule = 1e-3,
    weight_decay: ArrayLike = 0.1,
    momentum: ArrayLike = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    *,
    ns_dtype: Any = jnp.float32,
    matrix_layout: str = "out_in",
) -> optax.GradientTransformation:
    """Muon, exactly as ``torch.optim.Muon``: for the matrix parameters of a network.

    Update rule, with ``u_t`` the direction of :func:`scale_by_muon` (which already
    carries the shape factor ``r``) and ``eta`` the learning rate::

        theta_t = theta_{t-1} - eta * weight_decay * theta_{t-1} - eta * u_t

    It is ``chain(scale_by_muon(...), scale_by_learning_rate(eta),
    decoupled_weight_decay(weight_decay, eta))``. Biases, norms and other leaves with
    fewer than two axes need another optimizer: split the tree with
    :func:`sgdjax.multi_transform` (see ``docs/torch.md``).

    Differences from ``optax.contrib.muon``: optax bias-corrects the momentum
    (``B_t / (1 - mu^t)``, with a Nesterov form built from bias-corrected terms), divides
    by ``||X||_F + eps`` with ``eps = 1e-8`` instead of ``max(||X||_F, eps)``, reads the
    first axis as the input features (Flax's layout: ``matrix_layout="in_out"`` here),
    adds the weight decay before the learning rate as torch does, and sends non-matrix
    leaves to AdamW itself; its ``consistent_rms=0.2`` is ``"match_rms_adamw"``.

    Args:
      learning_rate: ``eta``, a number ``>= 0`` or a schedule.
      weight_decay: the decoupled decay ``>= 0``, multiplied by ``eta`` (torch's).
      momentum: as :func:`scale_by_muon`.
      nesterov: as :func:`scale_by_muon`.
      ns_coefficients: as :func:`scale_by_muon`.
      eps: as :func:`scale_by_muon`.
      ns_steps: as :func:`scale_by_muon`.
      adjust_lr_fn: as :func:`scale_by_muon`.
      ns_dtype: as :func:`scale_by_muon` (torch uses bfloat16; the default here is
        float32).
      matrix_layout: as :func:`scale_by_muon`.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` needs the params.

    Example:
      >>> import jax, jax.numpy as jnp, sgdjax
      >>> params = {"w": jnp.ones((4, 3))}
      >>> tx = sgdjax.muon(0.02, matrix_layout="in_out")
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.arange(12.0).reshape(4, 3)}, state, params)
      >>> updates["w"].shape
      (4, 3)

    References:
      ``torch.optim.Muon`` (same arguments and defaults; torch accepts 2-D parameters
      only); ``optax.contrib.muon``.
    """
    _base.check_scalar_or_schedule("learning_rate", learning_rate)
    _base.check_in_range("weight_decay", weight_decay, low=0.0)
    transforms = [
        scale_by_muon(
            momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            matrix_layout=matrix_layout,
        ),
        scale_by_learning_rate(learning_rate),
    ]
    if not _base.is_static_zero(weight_decay):
        transforms.append(decoupled_weight_decay(weight_decay, learning_rate))
    return chain(*transforms)
