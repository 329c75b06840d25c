"""On-device augmentation and normalization: pure jax functions of explicit PRNG keys."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def random_crop(key: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """Random crops of the zero-padded images, one offset per image.

    Rule: pad each ``H x W`` image by ``padding`` pixels of zeros on every side, then
    take the ``H x W`` window at offsets ``(dy, dx)`` drawn uniformly from
    ``{0, ..., 2 * padding}``, independently per image.

    Args:
      key: a PRNG key.
      images: a ``(N, H, W, C)`` batch (any dtype; kept).
      padding: pixels of padding, ``>= 0``.

    Returns:
      The cropped batch, same shape and dtype.

    References:
      ``torchvision.transforms.RandomCrop(32, padding=4)``.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    if padding == 0:
        return images
    n, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flips each image left-right with probability 1/2.

    Args:
      key: a PRNG key.
      images: a ``(N, H, W, C)`` batch.

    Returns:
      The batch with some images mirrored, same shape and dtype.

    References:
      ``torchvision.transforms.RandomHorizontalFlip()``.
    """
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(key: jax.Array, images: jax.Array, *, padding: int = 4, flip: bool = True) -> jax.Array:
    """Random crop with padding, then random horizontal flip (the standard CIFAR recipe)."""
    crop_key, flip_key = jax.random.split(key)
    images = random_crop(crop_key, images, padding=padding)
    return random_flip(flip_key, images) if flip else images


def normalize(
    images: jax.Array,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    dtype=jnp.float32,
) -> jax.Array:
    """Scales uint8 pixels to ``[0, 1]`` and standardizes each channel.

    Rule::

        x = (pixels / 255 - mean_c) / std_c

    Float inputs are taken to be in ``[0, 1]`` already.

    Args:
      images: a ``(..., C)`` batch, uint8 or float.
      mean: per-channel means in ``[0, 1]`` units.
      std: per-channel standard deviations.
      dtype: the output dtype.

    Returns:
      The normalized batch in ``dtype``.
    """
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
    shape = (1,) * (images.ndim - 1) + (len(mean),)
    mean_array = jnp.reshape(jnp.asarray(mean, jnp.float32), shape)
    std_array = jnp.reshape(jnp.asarray(std, jnp.float32), shape)
    return ((x - mean_array) / std_array).astype(dtype)
