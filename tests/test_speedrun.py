"""The speed-run recipe: whitening, init, parameter groups, augmentation, lookahead, TTA."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgdjax.data import normalize
from sgdjax.training import (
    SpeedNet,
    SpeedrunConfig,
    _speednet,
    _speedrun,
    speedrun,
    whitening_kernel,
)

SMALL = dict(widths=(8, 16, 16))


def _images(n=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_whitening_kernel_decorrelates_patches():
    rng = np.random.default_rng(0)
    # Correlated channels and neighbouring pixels: smooth the noise, mix the channels.
    noise = rng.normal(size=(200, 33, 33, 3))
    smooth = noise[:, 1:, 1:] + 0.8 * noise[:, :-1, 1:] + 0.5 * noise[:, 1:, :-1]
    images = smooth @ np.array([[1.0, 0.7, 0.2], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    kernel = whitening_kernel(images, eps=1e-9)
    assert kernel.shape == (2, 2, 3, 24) and kernel.dtype == np.float32
    out = jax.lax.conv_general_dilated(
        jnp.asarray(images, jnp.float32), jnp.asarray(kernel), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest",
    )  # fmt: skip
    out = np.asarray(out, np.float64).reshape(-1, 24)
    covariance = out[:, :12].T @ out[:, :12] / len(out)
    np.testing.assert_allclose(covariance, np.eye(12), atol=2e-3)
    np.testing.assert_allclose(out[:, 12:], -out[:, :12], rtol=1e-6, atol=1e-5)


def test_device_patch_covariance_equals_numpy():
    images = normalize(jnp.asarray(_images(16)))
    expected = whitening_kernel(np.asarray(images))
    got = _speednet.kernel_from_covariance(np.asarray(_speednet.patch_covariance(images)))
    np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-3, atol=1e-3)


def test_dirac_init_passes_the_input_channels_through():
    kernel = _speednet.dirac_init()(jax.random.key(0), (3, 3, 4, 6))
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )  # fmt: skip
    np.testing.assert_allclose(y[..., :4], x, rtol=1e-6, atol=1e-6)
    assert float(jnp.std(kernel[..., 4:])) > 0  # the other filters keep the random init


def test_network_shapes_groups_and_pooling():
    model = SpeedNet(**SMALL)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits = model.apply(variables, jnp.ones((3, 32, 32, 3)))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    labels = _speedrun.label_params(variables["params"])
    flat = {
        "/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(labels)
    }
    assert flat["whiten/kernel"] == "frozen" and flat["whiten/bias"] == "whiten_bias"
    assert flat["block1/norm1/bias"] == "norm_bias" and flat["block3/conv2/kernel"] == "other"
    assert "block1/norm1/scale" not in flat  # BatchNorm scale frozen at 1
    assert sorted(set(flat.values())) == ["frozen", "norm_bias", "other", "whiten_bias"]
    x = jax.random.normal(jax.random.key(2), (2, 7, 9, 3))
    np.testing.assert_array_equal(
        _speednet._pool(x, 2), np.asarray(x)[:, :6, :8].reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4))
    )


def test_parameter_groups_follow_the_recipe_against_numpy():
    config = SpeedrunConfig(**SMALL)
    total, per_epoch = 100, 10
    tx = _speedrun.make_optimizer(config, total, per_epoch)
    params = {
        "whiten": {"kernel": jnp.full((2,), 0.5), "bias": jnp.full((2,), 0.5)},
        "block1": {
            "norm1": {"bias": jnp.full((2,), 0.5)},
            "conv1": {"kernel": jnp.full((2,), 0.5)},
        },
    }
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    factor = _speedrun.triangle(total)
    m = config.momentum
    lr, wd = config.sgd_hyperparameters()
    assert lr == pytest.approx(1.5, rel=1e-3) and wd == pytest.approx(0.0153 / 7850.67, rel=1e-4)
    for step in range(3 * per_epoch + 2):
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        assert float(jnp.max(jnp.abs(updates["whiten"]["kernel"]))) == 0.0
        if step >= 3 * per_epoch:  # the whitening bias stops after whiten_bias_epochs
            assert float(jnp.max(jnp.abs(updates["whiten"]["bias"]))) == 0.0
        if step == 0:  # Nesterov's first step: (1 + m) (g + wd p), scaled by the group's rate
            rate = float(factor(0)) * lr
            np.testing.assert_allclose(
                updates["block1"]["conv1"]["kernel"], -rate * (1 + m) * (1 + wd * 0.5), rtol=1e-6
            )
            np.testing.assert_allclose(
                updates["block1"]["norm1"]["bias"],
                -rate * config.bias_scaler * (1 + m) * (1 + wd / config.bias_scaler * 0.5),
                rtol=1e-6,
            )
    assert float(factor(0)) == pytest.approx(0.2)
    assert float(factor(int(0.23 * total))) == pytest.approx(1.0)
    assert float(factor(total)) == pytest.approx(0.07)


def test_alternating_flips_and_translation():
    base = jax.random.bernoulli(jax.random.key(0), 0.5, (1000,))
    even, odd = _speedrun.alternating_flips(base, 0), _speedrun.alternating_flips(base, 1)
    assert bool(jnp.all(even != odd))  # every image is mirrored in exactly one of two epochs
    assert 0.4 < float(jnp.mean(even)) < 0.6
    np.testing.assert_array_equal(_speedrun.alternating_flips(base, 2), even)

    images = jnp.asarray(_images(50))
    shifted = _speedrun.translate(jax.random.key(3), images, 2)
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    offsets = set()
    for i in range(50):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[i, dy : dy + 32, dx : dx + 32], shifted[i])]  # fmt: skip
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 5
    np.testing.assert_array_equal(_speedrun.translate(jax.random.key(3), images, 0), images)


def test_tta_averages_the_six_views():
    model = SpeedNet(**SMALL)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views = [(np.asarray(x), 0.25), (padded[:, :-2, :-2], 0.125), (padded[:, 2:, 2:], 0.125)]
    expected = sum(
        w * (model.apply(variables, v) + model.apply(variables, v[:, :, ::-1])) for v, w in views
    )
    got = _speedrun.tta_logits(model, variables, x, tta=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        _speedrun.tta_logits(model, variables, x, tta=False), model.apply(variables, x)
    )


def _run_epoch(config, total_steps, steps, seed=0, chunk=None):
    model = SpeedNet(**SMALL)
    tx = _speedrun.make_optimizer(config, total_steps, steps)
    images = jnp.asarray(_images(steps * config.batch_size))
    labels = jnp.asarray(np.arange(len(images)) % 10, jnp.int32)
    whiten = whitening_kernel(np.asarray(normalize(images[:8])))
    state = _speedrun.init_state(config, model, tx, whiten, jax.random.key(seed))
    epoch = jax.jit(_speedrun.make_train_epoch(config, model, tx, total_steps), static_argnums=7)
    base = jax.random.bernoulli(jax.random.key(5), 0.5, (len(images),))
    chunk = chunk or steps
    start, losses = state, []
    for first in range(0, steps, chunk):
        state, metrics = epoch(state, images, labels, base, 1, jax.random.key(1), first,
                               min(chunk, steps - first))  # fmt: skip
        losses.append(metrics["loss"])
    return start, (state, {"loss": jnp.concatenate(losses)})


def test_one_step_per_call_equals_the_whole_epoch_in_one_scan():
    config = SpeedrunConfig(batch_size=8, lookahead_period=2, **SMALL)
    _, (whole, whole_metrics) = _run_epoch(config, total_steps=20, steps=5)
    _, (split, split_metrics) = _run_epoch(config, total_steps=20, steps=5, chunk=2)
    np.testing.assert_allclose(whole_metrics["loss"], split_metrics["loss"], rtol=1e-5)
    chex.assert_trees_all_close(whole, split, rtol=1e-4, atol=1e-6)


def test_lookahead_every_period_and_slow_weights_at_the_end():
    config = SpeedrunConfig(batch_size=8, lookahead_period=5, **SMALL)
    # 7 steps of a 100-step run: synchronised at step 5, not at 7.
    start, (state, metrics) = _run_epoch(config, total_steps=100, steps=7)
    assert int(state["step"]) == 7 and metrics["loss"].shape == (7,)
    assert np.all(np.isfinite(metrics["loss"]))
    chex.assert_trees_all_equal(
        state["params"]["whiten"]["kernel"], start["params"]["whiten"]["kernel"]
    )
    differs = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), state["params"], state["slow"]["params"]
    )
    assert any(jax.tree.leaves(differs))
    # A 5-step run ends on a synchronisation with decay 1: fast = slow = the slow weights.
    _, (state, _) = _run_epoch(config, total_steps=5, steps=5)
    chex.assert_trees_all_equal(state["params"], state["slow"]["params"])
    chex.assert_trees_all_equal(state["batch_stats"], state["slow"]["batch_stats"])


@pytest.mark.parametrize("count, synced", [(5, True), (7, False), (20, True), (30, True)])
def test_lookahead_sync_against_numpy(count, synced):
    rng = np.random.default_rng(count)
    slow = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=5).astype(np.float32),
    }
    fast = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), slow)
    total = 30
    new_slow, new_fast = _speedrun.lookahead_sync(slow, fast, jnp.int32(count), total, 5)
    decay = 1.0 if count == total else 0.95**5 * (count / total) ** 3
    for name in slow:
        s, f = slow[name].astype(np.float64), fast[name].astype(np.float64)
        want_slow = s + (1 - decay) * (f - s) if synced else s
        np.testing.assert_allclose(new_slow[name], want_slow, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_fast[name], want_slow if synced else f, rtol=1e-5, atol=1e-6)


def test_speedrun_learns_separable_data_and_reports_times():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (10, 3))

    def make(n):
        labels = np.arange(n) % 10
        noise = rng.integers(-20, 21, (n, 32, 32, 3))
        return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8), labels

    train_x, train_y = make(640)
    test_x, test_y = make(130)  # not a multiple of the evaluation batch: padded and masked
    config = SpeedrunConfig(batch_size=64, epochs=4, whiten_bias_epochs=1, eval_batch_size=64,
                            **SMALL)  # fmt: skip
    lines = []
    result = speedrun(config, train_x, train_y, test_x, test_y, runs=2, log=lines.append)
    # One program per epoch gives the same numbers as one per step (the CPU default).
    whole = speedrun(config, train_x, train_y, test_x, test_y, steps_per_call=100,
                     log=lambda line: None)  # fmt: skip
    assert whole["runs"][0]["accuracy"] == pytest.approx(result["runs"][0]["accuracy"], abs=0.02)
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    assert result["steps_per_run"] == 40 and all(run["steps"] == 40 for run in result["runs"])
    assert result["accuracy_mean"] > 0.75, result["runs"]  # chance: 0.1
    assert result["compile_seconds"] > 0 and result["seconds_mean"] > 0
    assert math.isfinite(result["accuracy_std"]) and math.isfinite(result["seconds_std"])
    assert len(lines) == 3 and "compiled" in lines[0]


def test_widths_from_a_list_become_a_tuple():
    assert SpeedrunConfig(widths=[8, 16, 16]).widths == (8, 16, 16)


def test_speedrun_rejects_bad_settings():
    with pytest.raises(ValueError, match="momentum"):
        SpeedrunConfig(momentum=1.0)
    with pytest.raises(ValueError, match="epochs"):
        SpeedrunConfig(epochs=0)
    with pytest.raises(ValueError, match="larger than the 8 training"):
        speedrun(dataclasses.replace(SpeedrunConfig(**SMALL), batch_size=16),
                 _images(8), np.zeros(8, int), _images(4), np.zeros(4, int))  # fmt: skip
