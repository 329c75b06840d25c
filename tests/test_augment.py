"""sgdjax/data/_augment.py: random crop and flip, determinism per key, normalize."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sgdjax import data

# ---------------------------------------------------------------- augmentation


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_random_crop_is_a_window_of_the_padded_image():
    images = _batch()
    key = jax.random.key(3)
    out = jax.jit(lambda k, x: data.random_crop(k, x, padding=4))(key, images)
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.uint8)
    offsets = np.asarray(jax.random.randint(key, (16, 2), 0, 9))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(out[i], padded[i, dy : dy + 32, dx : dx + 32])
    assert len({tuple(o) for o in offsets}) > 1


def test_random_flip_mirrors_some_images():
    images = _batch(64)
    out = np.asarray(data.random_flip(jax.random.key(0), images))
    flipped = [np.array_equal(o, np.asarray(x)[:, ::-1]) for o, x in zip(out, images)]
    kept = [np.array_equal(o, np.asarray(x)) for o, x in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_augment_is_deterministic_per_key_and_jit_invariant():
    images = _batch()
    a = data.augment(jax.random.key(1), images)
    b = jax.jit(data.augment)(jax.random.key(1), images)
    c = data.augment(jax.random.key(2), images)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a, c)


def test_normalize_matches_numpy():
    images = _batch(4)
    out = jax.jit(data.normalize)(images)
    expected = (np.asarray(images) / 255.0 - np.asarray(data.CIFAR10_MEAN)) / np.asarray(
        data.CIFAR10_STD
    )
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    chex.assert_type(data.normalize(images, dtype=jnp.bfloat16), jnp.bfloat16)
