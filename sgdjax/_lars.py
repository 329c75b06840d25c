"""Layer-wise adaptive rate scaling (LARS): the trust ratio and the ``lars`` alias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from sgdjax import _base
from sgdjax._clipping import euclidean_norm
from sgdjax._combine import chain
from sgdjax._decay import add_decayed_weights
from sgdjax._momentum import momentum as momentum_transform
from sgdjax._scale import scale_by_learning_rate


def exclude_bias_and_norm(params):
    """A mask that is False for leaves with at most one dimension (biases, norm scales)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def scale_by_trust_ratio(
    trust_coefficient: ArrayLike = 0.001,
    eps: ArrayLike = 0.0,
    *,
    mask: _base.MaskOrFn = None,
) -> optax.GradientTransformation:
    """Scales each leaf's update by its trust ratio ``eta * ||theta|| / (||u|| + eps)``.

    Update rule, per leaf (layer) with parameters ``theta`` and incoming update ``u``
    (``||x|| = sqrt(sum |x_j|^2)``, real for complex leaves too)::

        r = eta * ||theta|| / (||u|| + eps)     (r = 1 if ||theta|| = 0 or ||u|| = 0)
        u' = r * u

    Leaves where ``mask`` is False pass through unscaled.

    Args:
      trust_coefficient: ``eta > 0``.
      eps: ``eps >= 0`` added to the update norm.
      mask: which leaves to scale (pytree of bools, a prefix of one, or a callable).

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> tx = sgdjax.scale_by_trust_ratio(0.5)
      >>> w = jnp.array([3.0, 4.0])                     # ||w|| = 5, ||u|| = 1
      >>> tx.update(jnp.array([0.0, 1.0]), tx.init(w), w)[0].tolist()
      [0.0, 2.5]

    References:
      You et al., "Large Batch Training of Convolutional Networks" (2017);
      ``optax.scale_by_trust_ratio`` (same numbers).
    """
    _base.check_in_range("trust_coefficient", trust_coefficient, low=0.0, low_inclusive=False)
    _base.check_in_range("eps", eps, low=0.0)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "scale_by_trust_ratio needs params: call update(updates, state, params)"
            )
        _base.check_trees_match(params, updates, expected_name="params", got_name="updates")
        mask_tree = _base.resolve_mask(mask, params)

        def leaf(u, p, keep):
            if not keep:
                return u
            param_norm, update_norm = euclidean_norm(p), euclidean_norm(u)
            ratio = trust_coefficient * param_norm / (update_norm + eps)
            ratio = jnp.where((param_norm == 0) | (update_norm == 0), 1.0, ratio)
            return (u * ratio).astype(u.dtype)

        return jax.tree.map(leaf, updates, params, mask_tree), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lars(
    learning_rate: _base.ScalarOrSchedule,
    momentum: ArrayLike = 0.9,
    weight_decay: ArrayLike = 0.0,
    trust_coefficient: ArrayLike = 0.001,
    eps: ArrayLike = 0.0,
    nesterov: bool = False,
    *,
    weight_decay_mask: _base.MaskOrFn = None,
    trust_ratio_mask: _base.MaskOrFn = None,
) -> optax.GradientTransformation:
    """LARS: SGD with momentum whose step is scaled per layer by the trust ratio.

    Update rule, per layer ``l``::

        g_l = grad_l + lambda * theta_l
        d_l = -eta(t) * eta_tc * ||theta_l|| / (||g_l|| + eps) * g_l
        b_t = mu * b_{t-1} + d_l   (b_1 = d_1);   u = b_t, or d_l + mu * b_t (Nesterov)

    It is ``chain(add_decayed_weights(lambda, weight_decay_mask),
    scale_by_trust_ratio(eta_tc, eps, mask=trust_ratio_mask),
    scale_by_learning_rate(eta), momentum(mu, nesterov=...))``: the learning rate sits
    inside the momentum, as in the paper. Use ``exclude_bias_and_norm`` as both masks
    to leave biases and BatchNorm parameters out, as is usual.

    Args:
      learning_rate: ``eta``: a number ``>= 0`` or a schedule.
      momentum: ``mu`` in ``[0, 1)``.
      weight_decay: ``lambda >= 0``.
      trust_coefficient: ``eta_tc > 0``.
      eps: ``eps >= 0``.
      nesterov: Nesterov momentum.
      weight_decay_mask: leaves to decay (``None``: all).
      trust_ratio_mask: leaves to scale by their trust ratio (``None``: all).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import sgdjax
      >>> tx = sgdjax.lars(1.0, weight_decay=1e-4,
      ...                  weight_decay_mask=sgdjax.exclude_bias_and_norm,
      ...                  trust_ratio_mask=sgdjax.exclude_bias_and_norm)

    References:
      You et al. (2017); ``optax.lars`` (same numbers with the same masks).
    """
    transforms = []
    if not _base.is_static_zero(weight_decay):
        transforms.append(add_decayed_weights(weight_decay, mask=weight_decay_mask))
    transforms.append(scale_by_trust_ratio(trust_coefficient, eps, mask=trust_ratio_mask))
    transforms.append(scale_by_learning_rate(learning_rate))
    if not _base.is_static_zero(momentum) or nesterov:
        transforms.append(momentum_transform(momentum, nesterov=nesterov))
    return chain(*transforms)
