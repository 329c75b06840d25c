"""Averaged SGD (``torch.optim.ASGD``): a decaying step size and a running average."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from sgdjax import _base
from sgdjax._combine import chain
from sgdjax._decay import add_decayed_weights
from sgdjax._scale import scale, scale_by_learning_rate


class AsgdState(NamedTuple):
    """State of the averaging step of :func:`asgd`.

    Attributes:
      count: int32 number of updates taken.
      averaged_params: the average ``a`` of the iterates, shaped like the params
        (torch's ``ax``; zeros before the first update).
    """

    count: jax.Array
    averaged_params: Any


def _asgd_step_size(
    learning_rate: _base.ScalarOrSchedule, lambd: float, alpha: float
) -> _base.Schedule:
    """``c -> eta_c``: ``eta_0 = lr(0)``, ``eta_c = lr(c-1) / (1 + lambd lr(c-1) c) ** alpha``."""

    def step_size(count):
        previous = _base.evaluate(learning_rate, jnp.maximum(count - 1, 0))
        previous = jnp.asarray(previous, jnp.float32)
        decayed = previous / (1.0 + lambd * previous * count.astype(jnp.float32)) ** alpha
        return jnp.where(count == 0, previous, decayed)

    return step_size


def _average_iterates(t0: float) -> optax.GradientTransformation:
    """Keeps the running average ``a`` of the params after each update (see :func:`asgd`)."""

    def init_fn(params):
        averaged = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
        return AsgdState(count=_base.zero_count(), averaged_params=averaged)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("asgd needs params: call update(updates, state, params)")
        _base.check_trees_match(params, updates, expected_name="params", got_name="updates")
        count = state.count.astype(jnp.float32)
        weight = jnp.where(state.count == 0, 1.0, 1.0 / jnp.maximum(1.0, count - np.float32(t0)))

        def leaf(p, u, a):
            new_p = (p + u).astype(p.dtype)  # the params apply_updates will give
            moved = (a + weight.astype(a.dtype) * (new_p - a)).astype(a.dtype)
            return jnp.where(weight == 1.0, new_p, moved)

        averaged = jax.tree.map(leaf, params, updates, state.averaged_params)
        return updates, AsgdState(_base.safe_increment(state.count), averaged)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def asgd(
    learning_rate: _base.ScalarOrSchedule = 0.01,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: ArrayLike = 0.0,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """Averaged stochastic gradient descent, exactly as ``torch.optim.ASGD``.

    Update rule at step ``t = 1, 2, ...`` (``eta`` the step size, ``mu`` the averaging
    weight, both set from the *previous* step's count, as torch does)::

        g_t = (-grad_t if maximize else grad_t) + weight_decay * theta_{t-1}
        theta_t = theta_{t-1} * (1 - lambd * eta_{t-1}) - eta_{t-1} * g_t
        a_t = theta_t                            if mu_{t-1} = 1
        a_t = a_{t-1} + mu_{t-1} (theta_t - a_{t-1})   otherwise
        eta_0 = lr,  eta_t = lr / (1 + lambd * lr * t) ** alpha
        mu_0 = 1,    mu_t = 1 / max(1, t - t0)

    so ``a`` is the plain copy of ``theta`` until step ``t0 + 1`` and from then on the
    equal average of the iterates since ``t0``. The first two lines are
    ``theta_{t-1} - eta_{t-1} (grad_t + (weight_decay + lambd) theta_{t-1})``:
    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay + lambd),
    scale_by_learning_rate(eta), <average>)``. Read the average with
    :func:`asgd_averaged_params`; evaluate with it as torch users do with ``ax``.

    With a schedule ``lr(c)`` (torch's scheduler changing ``group["lr"]``), torch
    computes ``eta_t`` after step ``t`` from the rate of that step:
    ``eta_t = lr(t - 1) / (1 + lambd * lr(t - 1) * t) ** alpha`` and ``eta_0 = lr(0)``.

    Args:
      learning_rate: ``lr``, a number ``>= 0`` or a schedule.
      lambd: the decay term, a finite number ``>= 0``.
      alpha: the power of the step-size decay, a finite number ``>= 0``.
      t0: the step after which averaging starts, a finite number ``>= 0``.
      weight_decay: the coupled L2 coefficient, ``>= 0``.
      maximize: ascend the objective instead of descending it.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` needs the params.

    Example:
      >>> import jax, jax.numpy as jnp, sgdjax
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = sgdjax.asgd(0.1, t0=10)
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...     grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
      ...     updates, state = tx.update(grads, state, params)
      ...     params = sgdjax.apply_updates(params, updates)
      >>> bool(jnp.all(jnp.abs(sgdjax.asgd_averaged_params(state)) < 0.1))
      True

    References:
      Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging"
      (1992); ``torch.optim.ASGD`` (same arguments and defaults).
    """
    _base.check_scalar_or_schedule("learning_rate", learning_rate)
    lambd = _base.check_real("lambd", lambd, low=0.0)
    alpha = _base.check_real("alpha", alpha, low=0.0)
    t0 = _base.check_real("t0", t0, low=0.0)
    _base.check_in_range("weight_decay", weight_decay, low=0.0)
    transforms = [scale(-1.0)] if maximize else []
    decay = weight_decay + lambd
    if not _base.is_static_zero(decay):
        transforms.append(add_decayed_weights(decay))
    transforms.append(scale_by_learning_rate(_asgd_step_size(learning_rate, lambd, alpha)))
    transforms.append(_average_iterates(t0))
    return chain(*transforms)


def asgd_averaged_params(state: Any) -> Any:
    """The averaged params ``a`` of an :func:`asgd` state (or of any state holding one).

    Args:
      state: the optimizer state of :func:`asgd`, alone or inside another state.

    Returns:
      A tree shaped like the params: torch's ``optimizer.state[p]["ax"]``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.asgd(0.1)
      >>> state = tx.init(jnp.ones(2))
      >>> _, state = tx.update(jnp.ones(2), state, jnp.ones(2))
      >>> sgdjax.asgd_averaged_params(state).tolist()  # 1 - 0.1 * (1 + 1e-4)
      [0.89999..., 0.89999...]
    """
    found = _base.find_state(state, AsgdState)
    if found is None:
        raise ValueError(f"state holds no AsgdState (is it an asgd state?), got {type(state)}")
    return found.averaged_params
