"""BatchNorm statistics recomputed for averaged weights (``torch.optim.swa_utils.update_bn``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _batch_input(batch: Any) -> Any:
    """The model input of a batch: the array itself, ``batch["image"]`` or ``batch[0]``."""
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _batch_norm_momenta(model: nn.Module, variables: Any, inputs: Any, apply_kwargs) -> dict:
    """``{module path: momentum}`` of every ``nn.BatchNorm`` the model calls."""
    momenta = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            momenta[tuple(context.module.path)] = float(context.module.momentum)
        return next_fun(*args, **kwargs)

    def trace(variables, inputs):
        with nn.intercept_methods(record):
            return model.apply(variables, inputs, mutable=["batch_stats"], **apply_kwargs)

    jax.eval_shape(trace, variables, inputs)
    return momenta


def recompute_batch_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    preprocess: Callable[[Any], Any] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """BatchNorm statistics of ``variables``' weights: the equal average over ``batches``.

    Rule, for every ``nn.BatchNorm`` of the model, with ``mean_k`` and ``var_k`` the
    statistics it computes (in training mode) on batch ``k`` of ``K``::

        mean = (1 / K) sum_k mean_k,     var = (1 / K) sum_k var_k

    This is what ``torch.optim.swa_utils.update_bn`` does (it resets the running
    statistics and sets ``momentum=None``, a cumulative average) and what averaged
    weights (:func:`sgdjax.swa_value`, :func:`sgdjax.asgd_averaged_params`) need
    before evaluation: statistics gathered along the trajectory belong to other
    weights. As in Flax, ``var_k`` is the biased batch variance; torch stores the
    unbiased one (``n / (n - 1)`` times larger for batches of ``n`` values).

    Each batch is run once through ``model.apply(..., mutable=["batch_stats"])`` from
    zero statistics; Flax then stores ``(1 - momentum) * mean_k``, from which the
    average is formed with each module's own ``momentum``. Build the model without a
    BatchNorm ``axis_name`` (the average over all batches needs no device reduction).

    Args:
      model: the Flax module (its BatchNorm layers must be ``flax.linen.BatchNorm``).
      variables: ``{"params": averaged params, "batch_stats": any statistics of the
        right structure}`` (their values are ignored, as torch resets them).
      batches: an iterable of model inputs, of ``(inputs, ...)`` tuples, or of dicts
        with an ``"image"`` entry (as :func:`sgdjax.data.batches` yields).
      preprocess: applied to each input first (e.g. the train step's
        ``default_preprocess``); ``None`` feeds inputs as they are.
      apply_kwargs: keyword arguments of ``model.apply``; default ``{"train": True}``.

    Returns:
      The new ``batch_stats`` tree, with the structure and dtypes of the old one.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from sgdjax.training import recompute_batch_stats
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, *, train):
      ...         return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      >>> net = Net()
      >>> variables = net.init(jax.random.key(0), jnp.zeros((1, 2)), train=False)
      >>> stats = recompute_batch_stats(net, variables, [jnp.ones((4, 2)), 3 * jnp.ones((4, 2))])
      >>> stats["BatchNorm_0"]["mean"].tolist()
      [2.0, 2.0]

    References:
      Izmailov et al. (UAI 2018); ``torch.optim.swa_utils.update_bn``.
    """
    apply_kwargs = {"train": True} if apply_kwargs is None else dict(apply_kwargs)
    if "batch_stats" not in variables:
        raise ValueError(f"variables has no 'batch_stats' collection: {list(variables)}")
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    variables = {**variables, "batch_stats": zeros}

    def batch_statistics(variables, inputs):
        if preprocess is not None:
            inputs = preprocess(inputs)
        _, mutated = model.apply(variables, inputs, mutable=["batch_stats"], **apply_kwargs)
        return mutated["batch_stats"]

    @jax.jit
    def step(total, variables, inputs):
        return jax.tree.map(jnp.add, total, batch_statistics(variables, inputs))

    total, count, momenta = zeros, 0, None
    for batch in batches:
        inputs = jnp.asarray(_batch_input(batch))
        if momenta is None:
            shown = preprocess(inputs) if preprocess is not None else inputs
            momenta = _batch_norm_momenta(model, variables, shown, apply_kwargs)
        total = step(total, variables, inputs)
        count += 1
    if count == 0:
        raise ValueError("batches is empty: at least one batch is needed")

    def average(path, leaf):
        names = tuple(getattr(key, "key", str(key)) for key in path[:-1])
        if names not in momenta:
            raise ValueError(
                f"batch_stats entry {jax.tree_util.keystr(path)} belongs to no "
                f"flax.linen.BatchNorm the model calls (found {sorted(momenta)})"
            )
        # Flax stores (1 - momentum) * statistic, with 1 - momentum rounded to float32.
        scale = np.float32(1 - momenta[names]) * np.float32(count)
        return (leaf / scale).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(average, total)
