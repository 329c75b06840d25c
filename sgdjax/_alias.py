"""Ready-made optimizers: ``sgd`` (``torch.optim.SGD``) and ``sgdw`` (decoupled decay)."""

from __future__ import annotations

from typing import Any

import optax
from jax.typing import ArrayLike

from sgdjax import _base
from sgdjax._combine import chain
from sgdjax._decay import add_decayed_weights, decoupled_weight_decay
from sgdjax._flatten import mark_elementwise
from sgdjax._momentum import momentum as momentum_transform
from sgdjax._scale import scale, scale_by_learning_rate


def _gradient_path(
    *,
    momentum: ArrayLike,
    dampening: ArrayLike,
    nesterov: bool,
    maximize: bool,
    accumulator_dtype: Any,
    coupled_weight_decay: ArrayLike,
) -> list[optax.GradientTransformation]:
    """The transforms shared by ``sgd`` and ``sgdw`` before the learning rate."""
    transforms = []
    if maximize:
        transforms.append(mark_elementwise(scale(-1.0)))
    if not _base.is_static_zero(coupled_weight_decay):
        transforms.append(mark_elementwise(add_decayed_weights(coupled_weight_decay)))
    if not _base.is_static_zero(momentum) or nesterov:
        transforms.append(
            momentum_transform(
                momentum,
                dampening=dampening,
                nesterov=nesterov,
                accumulator_dtype=accumulator_dtype,
            )
        )
    else:
        _base.check_in_range("dampening", dampening, low=0.0, high=1.0)
    return transforms


def sgd(
    learning_rate: _base.ScalarOrSchedule,
    momentum: ArrayLike = 0.0,
    dampening: ArrayLike = 0.0,
    nesterov: bool = False,
    weight_decay: ArrayLike = 0.0,
    maximize: bool = False,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    """Stochastic gradient descent with the exact rules of ``torch.optim.SGD``.

    Update rule (``lambda`` weight decay, ``mu`` momentum, ``tau`` dampening)::

        g_t = -grad_t if maximize else grad_t
        g_t = g_t + lambda * theta_{t-1}
        b_1 = g_1;  b_t = mu * b_{t-1} + (1 - tau) * g_t
        d_t = g_t + mu * b_t if nesterov else b_t        (d_t = g_t when mu = 0)
        theta_t = theta_{t-1} - eta(t) * d_t

    It is ``chain(scale(-1) if maximize, add_decayed_weights(lambda),
    momentum(mu, dampening=tau, nesterov=...), scale_by_learning_rate(eta))``,
    leaving out the pieces whose hyperparameter is zero. The same arguments give
    the same trajectory as torch, to float32 precision. The step count is
    ``optax.tree_utils.tree_get(state, "ScaleByLearningRateState").count``
    (momentum keeps an equal count of its own, so ``tree_get(state, "count")``
    is ambiguous).

    Args:
      learning_rate: ``eta``: a number ``>= 0`` or a schedule ``count -> value``
        (see :mod:`sgdjax.schedules` for torch's schedulers).
      momentum: ``mu`` in ``[0, 1)``, or a schedule of it (see :func:`sgdjax.momentum`).
      dampening: ``tau`` in ``[0, 1]``.
      nesterov: Nesterov momentum (needs ``mu > 0`` and ``tau = 0``).
      weight_decay: coupled L2 coefficient ``lambda >= 0``.
      maximize: ascend the objective instead of descending it.
      accumulator_dtype: dtype of the momentum buffer (``None``: the params').

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax, jax.numpy as jnp, sgdjax
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = sgdjax.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
      ...     updates, state = tx.update(grads, state, params)
      ...     params = sgdjax.apply_updates(params, updates)
      >>> bool(jnp.all(jnp.abs(params) < 1e-3))
      True

    References:
      ``torch.optim.SGD`` (every argument has the same meaning and default).
      ``optax.sgd`` gives the same numbers when ``dampening=0`` and
      ``weight_decay=0``; it has neither option, nor ``maximize``.
    """
    _base.check_scalar_or_schedule("learning_rate", learning_rate)
    _base.check_in_range("weight_decay", weight_decay, low=0.0)
    transforms = _gradient_path(
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        accumulator_dtype=accumulator_dtype,
        coupled_weight_decay=weight_decay,
    )
    transforms.append(mark_elementwise(scale_by_learning_rate(learning_rate)))
    return chain(*transforms)


def sgdw(
    learning_rate: _base.ScalarOrSchedule,
    momentum: ArrayLike = 0.0,
    dampening: ArrayLike = 0.0,
    nesterov: bool = False,
    weight_decay: ArrayLike = 0.0,
    maximize: bool = False,
    *,
    accumulator_dtype: Any = None,
    mask: _base.MaskOrFn = None,
) -> optax.GradientTransformation:
    """SGD with decoupled weight decay (SGDW): the decay bypasses the momentum buffer.

    Update rule::

        g_t = -grad_t if maximize else grad_t
        b_1 = g_1;  b_t = mu * b_{t-1} + (1 - tau) * g_t
        d_t = g_t + mu * b_t if nesterov else b_t        (d_t = g_t when mu = 0)
        theta_t = theta_{t-1} - eta(t) * d_t - eta(t) * lambda * theta_{t-1}

    It is ``chain(scale(-1) if maximize, momentum(...), scale_by_learning_rate(eta),
    decoupled_weight_decay(lambda, eta, mask))``.

    Args:
      learning_rate: ``eta``: a number ``>= 0`` or a schedule.
      momentum: ``mu`` in ``[0, 1)``, or a schedule of it (see :func:`sgdjax.momentum`).
      dampening: ``tau`` in ``[0, 1]``.
      nesterov: Nesterov momentum (needs ``mu > 0`` and ``tau = 0``).
      weight_decay: decoupled coefficient ``lambda >= 0``; the shrink per step is
        ``eta(t) * lambda`` (torch's ``AdamW`` convention).
      maximize: ascend the objective instead of descending it.
      accumulator_dtype: dtype of the momentum buffer (``None``: the params').
      mask: which leaves to decay (pytree of bools or callable); ``None``: all.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import sgdjax
      >>> tx = sgdjax.sgdw(0.1, momentum=0.9, weight_decay=5e-4)

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
      With ``weight_decay=0`` it equals :func:`sgd`.
    """
    _base.check_scalar_or_schedule("learning_rate", learning_rate)
    _base.check_in_range("weight_decay", weight_decay, low=0.0)
    transforms = _gradient_path(
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        accumulator_dtype=accumulator_dtype,
        coupled_weight_decay=0.0,
    )
    transforms.append(mark_elementwise(scale_by_learning_rate(learning_rate)))
    if not _base.is_static_zero(weight_decay):
        decay = decoupled_weight_decay(weight_decay, learning_rate, mask=mask)
        transforms.append(decay if mask is not None else mark_elementwise(decay))
    return chain(*transforms)
