"""The batch pipeline inside the compiled program: keys, order, augmentation, lookahead.

Every random choice is a function of the run's key (``TrainState.rng``, from the
seed), the epoch and the step, so a whole epoch in one program, one step per program
and a run resumed mid-way draw exactly the same numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgdjax.data import random_crop
from sgdjax.training._state import TrainState


class RunKeys(NamedTuple):
    """The independent key streams of a run, split from ``TrainState.rng``."""

    steps: jax.Array  # step t's augmentation: fold_in(steps, t)
    order: jax.Array  # epoch e's example order: fold_in(order, e)
    flips: jax.Array  # alternating flips: example i's first-epoch flip from fold_in(flips, i)


def run_keys(rng: jax.Array) -> RunKeys:
    """The run's key streams."""
    return RunKeys(*jax.random.split(rng, 3))


def epoch_order(rng: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """The example order of ``epoch``: a permutation drawn from ``(rng, epoch)`` alone."""
    return jax.random.permutation(jax.random.fold_in(run_keys(rng).order, epoch), num_examples)


def translate(key: jax.Array, image: jax.Array, pixels: int) -> jax.Array:
    """Shifts one ``(H, W, C)`` image by up to ``pixels`` each way (reflection padding)."""
    height, width, channels = image.shape
    padded = jnp.pad(image, ((pixels, pixels), (pixels, pixels), (0, 0)), mode="reflect")
    offset = jax.random.randint(key, (2,), 0, 2 * pixels + 1)
    return jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (height, width, channels))


def augment_batch(
    config: Any,
    keys: jax.Array,
    images: jax.Array,
    indices: jax.Array,
    epoch: jax.Array,
    flip_key: jax.Array,
) -> jax.Array:
    """Flips, then random crops, then translation of a uint8 batch, one key per example.

    Flips (``config.flip``): ``random`` mirrors each image with probability 1/2;
    ``alternating`` mirrors example ``i`` in odd epochs when its coin
    ``bernoulli(fold_in(flip_key, i))`` says so and in even epochs when it does not,
    so every image is seen both ways every two epochs (airbench94).
    """
    per_example = jax.vmap(lambda key: jax.random.split(key, 3))(keys)
    flip_keys, crop_keys, shift_keys = per_example[:, 0], per_example[:, 1], per_example[:, 2]
    if config.flip == "random":
        flips = jax.vmap(lambda key: jax.random.bernoulli(key, 0.5))(flip_keys)
    elif config.flip == "alternating":
        coins = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(flip_key, i), 0.5))
        flips = jnp.logical_xor(coins(indices), epoch % 2 == 0)
    else:
        flips = None
    if flips is not None:
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
    if config.crop_padding:
        crop = lambda key, image: random_crop(key, image[None], padding=config.crop_padding)[0]
        images = jax.vmap(crop)(crop_keys, images)
    if config.translate:
        images = jax.vmap(lambda key, image: translate(key, image, config.translate))(
            shift_keys, images
        )
    return images


def lookahead_decay(count: jax.Array, total_steps: int, decay: float, power: float) -> jax.Array:
    """The fraction the slow weights keep at step ``count``: ``decay (count / T)^power``."""
    return decay * (jnp.asarray(count, jnp.float32) / total_steps) ** power


def lookahead_sync(
    state: TrainState, total_steps: int, *, period: int, decay: float, power: float
) -> TrainState:
    """Lookahead on weights and model state, after the step that made ``state``.

    Rule, with ``d = decay (t / T)^power`` (``d = 1`` at the last step ``t = T``, which
    leaves the slow weights as the final model) and ``x = {params, model_state}``::

        if t % period == 0 or t == T:
            slow <- slow + (1 - d) (x - slow);   x <- slow
    """
    count = state.step
    sync = jnp.logical_or(count % period == 0, count == total_steps)
    kept = jnp.where(count == total_steps, 1.0, lookahead_decay(count, total_steps, decay, power))

    def pull(slow, fast):
        return jnp.where(sync, (slow + (1.0 - kept) * (fast - slow)).astype(slow.dtype), slow)

    fast = {"params": state.params, **state.model_state}
    slow = jax.tree.map(pull, state.slow, fast)
    fast = jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast)
    model_state = {name: value for name, value in fast.items() if name != "params"}
    return state.replace(params=fast["params"], model_state=model_state, slow=slow)
