"""The pure training and evaluation steps: ``(state, batch) -> (state, metrics)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgdjax._averaging import ema_update
from sgdjax._base import check_in_range, find_state
from sgdjax._clipping import global_norm
from sgdjax._combine import apply_updates
from sgdjax.data import normalize
from sgdjax.training._state import TrainState

Batch = dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross-entropy with integer labels and optional label smoothing.

    Rule, with ``K`` classes and smoothing ``s``::

        q = (1 - s) * onehot(y) + s / K
        loss = mean_i( -sum_k q_ik * log_softmax(z_i)_k )

    The same numbers as ``torch.nn.functional.cross_entropy(..., label_smoothing=s)``.
    """
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def default_preprocess(images: jax.Array) -> jax.Array:
    """uint8 pixels -> CIFAR-normalized float32; float inputs pass through unchanged."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return normalize(images)
    return images


def _augment_per_example(augment_fn: AugmentFn, keys: jax.Array, images: jax.Array) -> jax.Array:
    """Applies ``augment_fn`` to each example with its own key (split-invariant randomness)."""
    return jax.vmap(lambda key, image: augment_fn(key, image[None])[0])(keys, images)


def example_keys(step_key: jax.Array, local: int, axis_name: str | None = None) -> jax.Array:
    """One key per example of this device's ``local`` examples.

    The keys are ``split(step_key, global_batch)`` sliced at this device's offset
    along ``axis_name``, so an example's key does not depend on how the batch is
    split over devices.
    """
    if axis_name is None:
        return jax.random.split(step_key, local)
    total = jax.lax.psum(local, axis_name)
    keys = jax.random.split(step_key, total)
    return jax.lax.dynamic_slice_in_dim(keys, jax.lax.axis_index(axis_name) * local, local)


def step_key(state: TrainState) -> jax.Array:
    """The key of the step ``state`` is about to take: ``fold_in(state.rng, state.step)``."""
    return jax.random.fold_in(state.rng, state.step)


def find_learning_rate(opt_state: Any) -> jax.Array | None:
    """The ``learning_rate`` hyperparameter stored by ``inject_hyperparams``, if any."""
    injected = find_state(
        opt_state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    )
    if injected is None or "learning_rate" not in injected.hyperparams:
        return None
    return jnp.asarray(injected.hyperparams["learning_rate"], jnp.float32)


def make_train_step(
    *,
    augment_fn: AugmentFn | None = None,
    preprocess_fn: Callable[[jax.Array], jax.Array] = default_preprocess,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    label_smoothing: float = 0.0,
    axis_name: str | None = None,
    accumulate: int = 1,
    sam_rho: float | None = None,
    ema_decay: float | None = None,
    donate: bool = True,
    jit: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure training step ``(state, batch) -> (state, metrics)``.

    One step: derive the step's key ``fold_in(state.rng, state.step)``; augment each
    example with its own key (so the randomness does not depend on how the batch is
    split over devices, see :func:`example_keys`); normalize;
    forward and backward with the model state (BatchNorm statistics) mutable; average
    gradients over ``axis_name`` when mapped; ``state.tx.update``; apply the updates.

    Args:
      augment_fn: ``(key, images) -> images`` on uint8 batches, e.g.
        ``sgdjax.data.augment``; ``None`` for no augmentation.
      preprocess_fn: images -> model inputs (default: CIFAR normalization of uint8).
      learning_rate_fn: step -> learning rate, for the ``learning_rate`` metric;
        without it the rate is read from an ``inject_hyperparams`` state if there is
        one, else reported as NaN.
      label_smoothing: label smoothing of the cross-entropy loss.
      axis_name: the mapped axis (``jax.pmap`` / ``shard_map``) to average gradients,
        model state and metrics over; ``None`` when not mapped.
      accumulate: split the batch into this many micro-batches and average their
        gradients before one update (for models without BatchNorm this equals one
        step on the whole batch; BatchNorm sees micro-batch statistics).
      sam_rho: sharpness-aware minimization (Foret et al. 2021) with radius ``rho``:
        the update uses the gradient at ``theta + rho * g / ||g||``, where ``g`` is
        the (device-averaged) gradient at ``theta``; BatchNorm statistics come from
        the first pass. ``None`` for plain steps.
      ema_decay: also update ``state.ema`` (create the state with ``ema=True``), the
        exponential moving average of the new parameters and model state:
        ``a_t = ema_decay * a_{t-1} + (1 - ema_decay) * x_t``. Score the average
        with ``state.averaged(ema_decay)``.
      donate: donate the input state's buffers to the output (jit only).
      jit: return the step jitted.

    Returns:
      ``train_step(state, batch)`` with ``batch = {"image": ..., "label": ...}``,
      returning the new state and the metrics ``loss``, ``accuracy``, ``grad_norm``
      and ``learning_rate``.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate!r}")
    if sam_rho is not None and not sam_rho > 0:
        raise ValueError(f"sam_rho must be positive, got {sam_rho!r}")
    if sam_rho is not None and accumulate > 1:
        raise ValueError("sam_rho and accumulate > 1 cannot be combined")
    if ema_decay is not None:
        check_in_range("ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False)

    def loss_and_grads(state, params, model_state, images, labels):
        def loss_fn(params):
            logits, new_model_state = state.apply_fn(
                {"params": params, **model_state},
                images,
                train=True,
                mutable=list(model_state),
            )
            loss = cross_entropy(logits, labels, label_smoothing=label_smoothing)
            return loss, (logits, new_model_state)

        (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        correct = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, correct, grads, new_model_state

    def train_step(state: TrainState, batch: Batch):
        images, labels = batch["image"], batch["label"]
        if augment_fn is not None:
            keys = example_keys(step_key(state), images.shape[0], axis_name)
            images = _augment_per_example(augment_fn, keys, images)
        images = preprocess_fn(images)

        if accumulate == 1:
            loss, accuracy, grads, model_state = loss_and_grads(
                state, state.params, state.model_state, images, labels
            )
        else:
            if images.shape[0] % accumulate:
                raise ValueError(
                    f"batch of {images.shape[0]} does not split into accumulate={accumulate} "
                    "micro-batches"
                )
            micro_images = images.reshape(accumulate, -1, *images.shape[1:])
            micro_labels = labels.reshape(accumulate, -1)

            def micro_step(carry, micro):
                grads_sum, model_state = carry
                loss, accuracy, grads, model_state = loss_and_grads(
                    state, state.params, model_state, *micro
                )
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                return (grads_sum, model_state), (loss, accuracy)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads_sum, model_state), (losses, accuracies) = jax.lax.scan(
                micro_step, (zeros, state.model_state), (micro_images, micro_labels)
            )
            grads = jax.tree.map(lambda g: g / accumulate, grads_sum)
            loss, accuracy = jnp.mean(losses), jnp.mean(accuracies)

        if axis_name is not None:
            grads, model_state, loss, accuracy = jax.lax.pmean(
                (grads, model_state, loss, accuracy), axis_name
            )
        if sam_rho is not None:
            scale = sam_rho / (global_norm(grads) + 1e-12)
            perturbed = jax.tree.map(lambda p, g: p + scale * g, state.params, grads)
            _, _, grads, _ = loss_and_grads(state, perturbed, state.model_state, images, labels)
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = apply_updates(state.params, updates)
        if learning_rate_fn is not None:
            learning_rate = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        else:
            learning_rate = find_learning_rate(state.opt_state)
            if learning_rate is None:
                learning_rate = jnp.float32(jnp.nan)
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": global_norm(grads),
            "learning_rate": learning_rate,
        }
        ema = state.ema
        if ema_decay is not None:
            if ema is None:
                raise ValueError("ema_decay needs a state created with ema=True")
            ema = ema_update(ema, {"params": params, **model_state}, ema_decay)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            ema=ema,
        )
        return new_state, metrics

    if jit:
        return jax.jit(train_step, donate_argnums=(0,) if donate else ())
    return train_step


def make_multi_step(
    steps_per_call: int, *, donate: bool = True, unroll: int | bool = 1, **step_options: Any
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``k`` training steps per dispatch: one jitted ``lax.scan`` over stacked batches.

    The batch holds ``k`` batches stacked on a new leading axis
    (``{"image": (k, B, ...), "label": (k, B)}``); the result equals ``k`` calls of
    the single step, with one host round trip instead of ``k``. With the whole data
    set on the device, one call can run a whole epoch.

    Args:
      steps_per_call: ``k >= 1``.
      donate: donate the input state.
      unroll: passed to ``lax.scan``. On XLA's CPU backend, convolutions inside a loop
        run many times slower than outside one (measured for the ConvNet: 4 steps take
        0.30 s one call at a time and 6.6 s in one scan), so on CPUs pass
        ``unroll=True`` (compile time then grows with ``k``) or use single steps; on
        GPUs and TPUs the rolled loop is the fast path.
      **step_options: as for :func:`make_train_step`.

    Returns:
      ``multi_step(state, batches) -> (state, metrics)`` with metrics stacked over
      the ``k`` steps.
    """
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call!r}")
    step = make_train_step(jit=False, **step_options)

    def multi_step(state, batches):
        leading = {int(jnp.shape(leaf)[0]) for leaf in jax.tree.leaves(batches)}
        if leading != {steps_per_call}:
            raise ValueError(
                f"batches must stack {steps_per_call} batches on axis 0, got {sorted(leading)}"
            )
        return jax.lax.scan(step, state, batches, unroll=unroll)

    return jax.jit(multi_step, donate_argnums=(0,) if donate else ())


TTA_MODES = ("none", "flip", "flip_shift")


def tta_logits(apply_fn: Callable, variables: Any, images: jax.Array, tta: str) -> jax.Array:
    """Logits of ``images``, averaged over test-time views.

    ``"none"``: the image. ``"flip"``: the mean of the image's and its mirror image's
    logits. ``"flip_shift"`` (airbench94's): ``flip`` of the image (weight 1/2) and of
    its one-pixel shifts up-left and down-right with reflection padding (1/4 each).

    The views go through the network one after another (``lax.map``), with the same
    logits bitwise as separate calls in one program, which XLA's CPU backend ran more
    slowly (``benchmarks/tta_views.py``; figures in docs/training.md).
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    if tta == "none":
        return apply_fn(variables, images, train=False)
    if tta == "flip":
        bases = [images]
    else:
        padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        bases = [images, padded[:, :-2, :-2, :], padded[:, 2:, 2:, :]]
    views = jnp.stack([view for base in bases for view in (base, base[:, :, ::-1, :])])
    logits = jax.lax.map(lambda view: apply_fn(variables, view, train=False), views)
    both = [0.5 * (logits[2 * i] + logits[2 * i + 1]) for i in range(len(bases))]
    if tta == "flip":
        return both[0]
    return 0.5 * both[0] + 0.25 * both[1] + 0.25 * both[2]


def make_eval_step(
    *,
    preprocess_fn: Callable[[jax.Array], jax.Array] = default_preprocess,
    tta: str = "none",
    jit: bool = True,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Builds ``eval_step(state, batch) -> sums`` with running BatchNorm statistics.

    The batch may carry a ``"mask"`` (1 for real examples, 0 for padding). The
    returned ``loss_sum``, ``correct`` and ``count`` add up over batches. ``tta``
    picks the test-time views (see :func:`tta_logits`).
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")

    def eval_step(state: TrainState, batch: Batch):
        images = preprocess_fn(batch["image"])
        variables = {"params": state.params, **state.model_state}
        logits = tta_logits(state.apply_fn, variables, images, tta)
        labels = batch["label"]
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        losses = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(losses * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    return jax.jit(eval_step) if jit else eval_step


def evaluate(
    eval_step: Callable[[TrainState, Batch], dict[str, jax.Array]],
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
) -> dict[str, float]:
    """Loss and accuracy over a whole data set; the last batch is padded and masked.

    Every batch has the same shape, so the step compiles once.
    """
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(images), batch_size):
        chunk_images = images[start : start + batch_size]
        chunk_labels = labels[start : start + batch_size]
        real = len(chunk_images)
        pad = batch_size - real
        if pad:
            chunk_images = np.concatenate(
                [chunk_images, np.zeros((pad, *chunk_images.shape[1:]), chunk_images.dtype)]
            )
            chunk_labels = np.concatenate([chunk_labels, np.zeros((pad,), chunk_labels.dtype)])
        mask = np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])
        sums = eval_step(state, {"image": chunk_images, "label": chunk_labels, "mask": mask})
        for key in totals:
            totals[key] += float(sums[key])
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}
