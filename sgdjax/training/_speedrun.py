"""The CIFAR-10 speed run: the data set on the device, one jitted scan per epoch.

Design (our JAX version of the ideas in the fastest published single-GPU recipes,
airbench94 by K. Jordan, which reports 94% in 3.29 s on an A100):

* :class:`SpeedNet`: a frozen 2x2 whitening convolution computed from training
  patches, three conv blocks, GELU, BatchNorm with frozen scale, identity init.
* Nesterov SGD (momentum 0.85, torch's rule through :func:`sgdjax.sgd`) on the
  mean loss; BatchNorm biases get 64x the learning rate (and 1/64 the weight
  decay); the whitening bias trains for the first epochs only; a triangular
  learning-rate schedule; label smoothing 0.2.
* Lookahead on weights and BatchNorm statistics every 5 steps with a decay that
  grows as ``0.95^5 (t / T)^3``; the slow weights are the final model.
* Alternating flips (each image is mirrored in every other epoch, from a random
  start) and random translation by up to 2 pixels with reflection padding, drawn
  on the device inside the scanned epoch.
* Test-time augmentation: the image, its mirror image and one-pixel shifts.

All of it is pure: ``state -> state`` functions of explicit PRNG keys, compiled
ahead of time so compile time is reported apart from training time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgdjax._alias import sgd
from sgdjax._combine import apply_updates, multi_transform
from sgdjax.data import normalize
from sgdjax.training._speednet import SpeedNet, kernel_from_covariance, patch_covariance
from sgdjax.training._step import cross_entropy


@dataclasses.dataclass(frozen=True)
class SpeedrunConfig:
    """Hyperparameters of the speed run (defaults: the 94% recipe).

    ``learning_rate`` and ``weight_decay`` are in airbench94's units, which keep the
    dynamics fixed when the batch size or momentum changes: the rate per 1024
    examples with momentum's gain ``1 / (1 - m)`` divided out. For our mean loss and
    torch's coupled decay (``g + wd * p`` before momentum) they become, with
    ``k = 1 + 1 / (1 - m)``::

        lr_mean = learning_rate * (B / 1024) / k        (1.5 for the defaults)
        wd_mean = weight_decay / (1024 * k)

    (see :meth:`sgd_hyperparameters`).
    """

    epochs: float = 9.9
    batch_size: int = 1024
    learning_rate: float = 11.5
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    translate: int = 2
    widths: tuple[int, int, int] = (64, 256, 256)
    lookahead_period: int = 5
    tta: bool = True
    bf16: bool = False
    seed: int = 0
    max_steps: int | None = None
    eval_batch_size: int = 2000

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))  # lists from a CLI or JSON
        checks = {
            "epochs": self.epochs > 0,
            "batch_size": self.batch_size > 0,
            "learning_rate": self.learning_rate > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "bias_scaler": self.bias_scaler > 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "whiten_bias_epochs": self.whiten_bias_epochs >= 0,
            "translate": self.translate >= 0,
            "widths": len(self.widths) == 3 and all(int(w) == w > 0 for w in self.widths),
            "lookahead_period": self.lookahead_period > 0,
            "seed": self.seed >= 0,
            "max_steps": self.max_steps is None or self.max_steps > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} out of range: {getattr(self, name)!r}")

    def sgd_hyperparameters(self) -> tuple[float, float]:
        """``(learning rate, coupled weight decay)`` for the mean loss (see above)."""
        gain = 1.0 + 1.0 / (1.0 - self.momentum)
        return (
            self.learning_rate * self.batch_size / 1024 / gain,
            self.weight_decay / (1024 * gain),
        )


def label_params(params: Any) -> Any:
    """Parameter groups: ``frozen`` (whitening kernel), ``whiten_bias``, ``norm_bias``
    (BatchNorm biases) and ``other``."""

    def label(path, _):
        names = [getattr(entry, "key", str(entry)) for entry in path]
        if names[0] == "whiten":
            return "frozen" if names[-1] == "kernel" else "whiten_bias"
        if names[-2].startswith("norm") and names[-1] == "bias":
            return "norm_bias"
        return "other"

    return jax.tree_util.tree_map_with_path(label, params)


def triangle(total_steps: int, *, start: float = 0.2, peak: float = 0.23, end: float = 0.07):
    """Learning-rate factor: linear from ``start`` to 1 at ``peak * T``, then to ``end``."""
    knots = jnp.asarray([0.0, float(int(peak * total_steps)), float(total_steps)], jnp.float32)
    values = jnp.asarray([start, 1.0, end], jnp.float32)
    return lambda count: jnp.interp(jnp.asarray(count, jnp.float32), knots, values)


def make_optimizer(
    config: SpeedrunConfig, total_steps: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Nesterov SGD per parameter group, with the triangular schedule."""
    factor = triangle(total_steps)
    lr, weight_decay = config.sgd_hyperparameters()
    whiten_steps = config.whiten_bias_epochs * steps_per_epoch

    def group(scale, decay, until=None):
        def schedule(count):
            value = lr * scale * factor(count)
            return value if until is None else jnp.where(count < until, value, 0.0)

        return sgd(schedule, momentum=config.momentum, nesterov=True, weight_decay=decay)

    return multi_transform(
        {
            "other": group(1.0, weight_decay),
            "norm_bias": group(config.bias_scaler, weight_decay / config.bias_scaler),
            "whiten_bias": group(1.0, weight_decay, until=whiten_steps),
            "frozen": optax.set_to_zero(),
        },
        label_params,
    )


def lookahead_decay(step: jax.Array, total_steps: int) -> jax.Array:
    """The slow weights' decay at ``step``: ``0.95^5 (step / T)^3``."""
    return 0.95**5 * (jnp.asarray(step, jnp.float32) / total_steps) ** 3


def lookahead_sync(slow: Any, fast: Any, count: jax.Array, total_steps: int, period: int):
    """The lookahead after step ``count``: returns the new ``(slow, fast)`` trees.

    Rule, with ``d = 0.95^5 (count / T)^3`` (and ``d = 1`` at ``count = T``)::

        if count % period == 0 or count == T:
            slow <- slow + (1 - d) (fast - slow);   fast <- slow
    """
    sync = jnp.logical_or(count % period == 0, count == total_steps)
    decay = jnp.where(count == total_steps, 1.0, lookahead_decay(count, total_steps))

    def pull(s, f):
        return jnp.where(sync, (s + (1.0 - decay) * (f - s)).astype(s.dtype), s)

    slow = jax.tree.map(pull, slow, fast)
    return slow, jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast)


def alternating_flips(base: jax.Array, epoch: jax.Array) -> jax.Array:
    """Which images to mirror in ``epoch``: ``base`` in even epochs, its negation in odd."""
    return jnp.logical_xor(base, epoch % 2 == 1)


def translate(key: jax.Array, images: jax.Array, pixels: int) -> jax.Array:
    """Shifts each image by up to ``pixels`` in each direction (reflection padding)."""
    if pixels == 0:
        return images
    n, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)), mode="reflect")
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pixels + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def init_state(config: SpeedrunConfig, model: SpeedNet, tx, whiten: np.ndarray, key) -> dict:
    """Parameters (whitening kernel set), BatchNorm statistics, optimizer and slow weights."""
    variables = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
    params = jax.tree.map(lambda x: x, variables["params"])
    params["whiten"]["kernel"] = jnp.asarray(whiten)
    batch_stats = variables["batch_stats"]
    return {
        "step": jnp.zeros([], jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "slow": {"params": params, "batch_stats": batch_stats},
    }


def make_train_epoch(
    config: SpeedrunConfig, model: SpeedNet, tx, total_steps: int
) -> Callable[..., tuple[dict, dict]]:
    """``train_epoch(state, images, labels, base_flips, epoch, key, start, num_steps)``.

    Runs steps ``start, ..., start + num_steps - 1`` (``num_steps`` static) of one epoch
    as a ``lax.scan`` over batches drawn from the device-resident uint8 ``images``: the
    epoch's permutation (from ``key``), alternating flips, translation (a key per step,
    folded from the step's index), normalization, forward/backward, the update, and the
    lookahead every ``lookahead_period`` steps (and at the run's last step, which
    leaves the slow weights in place). A whole epoch in one call and one call per step
    give the same result. Returns the state and per-step ``loss`` and ``accuracy``.
    """
    period = config.lookahead_period

    def loss_fn(params, batch_stats, images, labels):
        logits, updated = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            mutable=["batch_stats"],
        )  # fmt: skip
        loss = cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        return loss, (logits, updated["batch_stats"])

    def step(state, batch):
        images, labels = batch
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], images, labels
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = apply_updates(state["params"], updates)
        count = state["step"] + 1
        fast = {"params": params, "batch_stats": batch_stats}
        slow, fast = lookahead_sync(state["slow"], fast, count, total_steps, period)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        new_state = {"step": count, "params": fast["params"], "batch_stats": fast["batch_stats"],
                     "opt_state": opt_state, "slow": slow}  # fmt: skip
        return new_state, {"loss": loss, "accuracy": accuracy}

    def train_epoch(state, images, labels, base_flips, epoch, key, start, num_steps):
        order_key, shift_key = jax.random.split(key)
        order = jax.random.permutation(order_key, images.shape[0])
        size = config.batch_size
        order = jax.lax.dynamic_slice_in_dim(order, start * size, num_steps * size)
        order = order.reshape(num_steps, size)
        flips = alternating_flips(base_flips, epoch)
        shift_keys = jax.vmap(lambda i: jax.random.fold_in(shift_key, i))(
            start + jnp.arange(num_steps)
        )

        def scanned(state, inputs):
            index, shift = inputs
            batch = images[index]
            batch = jnp.where(flips[index][:, None, None, None], batch[:, :, ::-1, :], batch)
            batch = normalize(translate(shift, batch, config.translate))
            return step(state, (batch, labels[index]))

        if num_steps == 1:  # no loop at all: XLA's CPU backend runs convolutions inside
            # a loop many times slower than the same convolutions outside one
            state, metrics = scanned(state, (order[0], shift_keys[0]))
            return state, jax.tree.map(lambda x: x[None], metrics)
        return jax.lax.scan(scanned, state, (order, shift_keys))

    return train_epoch


def tta_logits(model: SpeedNet, variables: dict, images: jax.Array, tta: bool) -> jax.Array:
    """Logits, averaged over test-time views when ``tta``.

    Views: the image and its mirror (weight 1/2 together), and one-pixel shifts up-left
    and down-right (reflection padding) with their mirrors (1/4 each).
    """

    def both(x):
        return 0.5 * (model.apply(variables, x) + model.apply(variables, x[:, :, ::-1, :]))

    if not tta:
        return model.apply(variables, images)
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :-2, :-2, :], padded[:, 2:, 2:, :]
    return 0.5 * both(images) + 0.25 * both(up_left) + 0.25 * both(down_right)


def make_evaluate(config: SpeedrunConfig, model: SpeedNet) -> Callable[..., jax.Array]:
    """``correct(state, images, labels, start, num_batches)``: number right in batches
    ``start, ..., start + num_batches - 1`` (of ``eval_batch_size``) of a uint8 test set."""

    def correct(state, images, labels, start, num_batches):
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        size = config.eval_batch_size
        images = jax.lax.dynamic_slice_in_dim(images, start * size, num_batches * size)
        labels = jax.lax.dynamic_slice_in_dim(labels, start * size, num_batches * size)
        batches = images.reshape(num_batches, size, *images.shape[1:])
        label_batches = labels.reshape(num_batches, size)

        def body(total, batch):
            x, y = batch
            logits = tta_logits(model, variables, normalize(x), config.tta)
            return total + jnp.sum(jnp.argmax(logits, -1) == y), None

        if num_batches == 1:  # no loop (see make_train_epoch)
            return body(jnp.zeros([], jnp.int32), (batches[0], label_batches[0]))[0]
        total, _ = jax.lax.scan(body, jnp.zeros([], jnp.int32), (batches, label_batches))
        return total

    return correct


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``(start, length)`` pieces of at most ``size`` covering ``range(total)``."""
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def _schedule(config: SpeedrunConfig, num_train: int) -> tuple[int, list[int]]:
    """Steps per full epoch and the steps of each epoch (the last may be partial)."""
    per_epoch = num_train // config.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {num_train} training images"
        )
    total = math.ceil(config.epochs * per_epoch)
    epochs = [per_epoch] * (total // per_epoch) + ([total % per_epoch] if total % per_epoch else [])
    if config.max_steps is not None:
        epochs = [min(steps, config.max_steps) for steps in epochs]
    return per_epoch, epochs


def speedrun(
    config: SpeedrunConfig,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    runs: int = 1,
    steps_per_call: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains ``runs`` times (seeds ``config.seed``, ``+1``, ...) and times each run.

    ``steps_per_call``: training steps (and evaluation batches) per dispatched program.
    ``None`` means a whole epoch (the whole test set) per call on accelerators and one
    step per call on CPUs, where XLA runs convolutions inside a loop many times slower
    (measured: 25x for this network). The numbers do not depend on it.

    Compilation happens once, ahead of time, and is reported apart. Each run's time
    covers everything after compilation that a speed run has to do: computing the
    whitening kernel, initialisation, every epoch and the final evaluation (the data
    set is already on the device).

    Returns:
      ``{"runs": [{"seed", "accuracy", "seconds", "steps"}, ...], "compile_seconds",
      "accuracy_mean", "accuracy_std", "seconds_mean", "seconds_std", ...}``.
    """
    if runs <= 0:
        raise ValueError(f"runs must be positive, got {runs!r}")
    if steps_per_call is not None and steps_per_call <= 0:
        raise ValueError(f"steps_per_call must be positive, got {steps_per_call!r}")
    if steps_per_call is None:
        steps_per_call = 1 if jax.default_backend() == "cpu" else 1 << 30
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    model = SpeedNet(widths=config.widths, num_classes=int(train_labels.max()) + 1, dtype=dtype)
    per_epoch, epoch_steps = _schedule(config, len(train_images))
    total_steps = math.ceil(config.epochs * per_epoch)
    tx = make_optimizer(config, total_steps, per_epoch)
    eval_size = min(config.eval_batch_size, len(test_images))
    config = dataclasses.replace(config, eval_batch_size=eval_size)
    pad = -len(test_images) % eval_size  # padded examples get label -1: never counted
    test_images = np.concatenate([test_images, np.zeros((pad, *test_images.shape[1:]), np.uint8)])
    test_labels = np.concatenate([np.asarray(test_labels, np.int32), -np.ones(pad, np.int32)])

    images = jax.device_put(jnp.asarray(train_images))
    labels = jax.device_put(jnp.asarray(train_labels, jnp.int32))
    test_x = jax.device_put(jnp.asarray(test_images))
    test_y = jax.device_put(jnp.asarray(test_labels))
    num_test = len(test_labels) - pad

    whiten_fn = jax.jit(lambda x: patch_covariance(normalize(x[:5000])))
    init_fn = jax.jit(lambda whiten, key: init_state(config, model, tx, whiten, key))
    epoch_fn = jax.jit(make_train_epoch(config, model, tx, total_steps),
                       static_argnums=7, donate_argnums=0)  # fmt: skip
    evaluate_fn = jax.jit(make_evaluate(config, model), static_argnums=4)
    train_chunks = {steps: _chunks(steps, steps_per_call) for steps in set(epoch_steps)}
    eval_chunks = _chunks(len(test_labels) // eval_size, steps_per_call)

    compile_start = time.perf_counter()
    key = jax.random.key(0)
    whiten = kernel_from_covariance(np.asarray(whiten_fn(images)))
    init_compiled = init_fn.lower(whiten, key).compile()
    state_shape = jax.eval_shape(init_fn, whiten, key)
    base = jnp.zeros(len(train_images), bool)
    sizes = sorted({size for chunks in train_chunks.values() for _, size in chunks})
    compiled_steps = {
        size: epoch_fn.lower(state_shape, images, labels, base, 0, key, 0, size).compile()
        for size in sizes
    }
    compiled_eval = {
        size: evaluate_fn.lower(state_shape, test_x, test_y, 0, size).compile()
        for size in sorted({size for _, size in eval_chunks})
    }
    compile_seconds = time.perf_counter() - compile_start
    log(f"compiled in {compile_seconds:.1f} s (training programs of {sizes} steps)")

    results = []
    for run in range(runs):
        seed = config.seed + run
        start = time.perf_counter()
        run_key = jax.random.key(seed)
        init_key, flip_key, data_key = jax.random.split(run_key, 3)
        whiten = kernel_from_covariance(np.asarray(whiten_fn(images)))
        state = init_compiled(whiten, init_key)
        base = jax.random.bernoulli(flip_key, 0.5, (len(train_images),))
        losses = []
        for epoch, steps in enumerate(epoch_steps):
            epoch_key = jax.random.fold_in(data_key, epoch)
            losses = []
            for first, size in train_chunks[steps]:
                state, metrics = compiled_steps[size](
                    state, images, labels, base, epoch, epoch_key, first
                )
                losses.append(metrics["loss"])
        correct = sum(
            int(compiled_eval[size](state, test_x, test_y, first)) for first, size in eval_chunks
        )
        seconds = time.perf_counter() - start
        accuracy = correct / num_test
        train_loss = float(jnp.mean(jnp.concatenate(losses)))
        steps = int(state["step"])
        results.append(
            {"seed": seed, "accuracy": accuracy, "seconds": seconds, "steps": steps,
             "final_train_loss": train_loss}
        )  # fmt: skip
        log(
            f"run {run + 1}/{runs}  seed {seed}  accuracy {accuracy:.4f}  {seconds:.2f} s  "
            f"({steps} steps, last train loss {train_loss:.3f})"
        )

    accuracies = [r["accuracy"] for r in results]
    seconds = [r["seconds"] for r in results]
    return {
        "runs": results,
        "compile_seconds": compile_seconds,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies, ddof=1)) if runs > 1 else math.nan,
        "seconds_mean": float(np.mean(seconds)),
        "seconds_std": float(np.std(seconds, ddof=1)) if runs > 1 else math.nan,
        "seconds_with_compile_mean": float(np.mean(seconds)) + compile_seconds,
        "steps_per_run": sum(epoch_steps),
        "config": dataclasses.asdict(config),
        "device": str(jax.devices()[0]),
    }
