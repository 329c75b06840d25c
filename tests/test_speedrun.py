"""The speed-run pieces as engine options: whitening, groups, flips, translation, lookahead, TTA."""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgdjax import data
from sgdjax.data import normalize
from sgdjax.training import (
    PRESETS,
    Checkpointer,
    ConfigError,
    Engine,
    SetupError,
    SpeedNet,
    TrainState,
    Whitened,
    _config,
    _pipeline,
    _speednet,
    train_seeds,
    tta_logits,
    whitening_kernel,
)

SMALL = dict(widths=(8, 16, 16), tensorboard=False)


def _images(n=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _separable(n_train=640, n_test=130, seed=0):
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (10, 3))

    def make(n):
        labels = np.arange(n) % 10
        noise = rng.integers(-20, 21, (n, 32, 32, 3))
        images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int32)

    return data.Dataset(*make(n_train), *make(n_test), tuple(str(i) for i in range(10)))


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
    model = Whitened(SpeedNet(widths=SMALL["widths"]))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits = model.apply(variables, jnp.ones((3, 32, 32, 3)))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    labels = _config.label_params(variables["params"])
    flat = {
        "/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(labels)
    }
    assert flat["whiten/kernel"] == "frozen" and flat["whiten/bias"] == "whiten_bias"
    assert flat["net/block1/norm1/bias"] == "norm_bias"
    assert flat["net/block3/conv2/kernel"] == "other"
    assert "net/block1/norm1/scale" not in flat  # BatchNorm scale frozen at 1
    assert sorted(set(flat.values())) == ["frozen", "norm_bias", "other", "whiten_bias"]
    x = jax.random.normal(jax.random.key(2), (2, 7, 9, 3))
    np.testing.assert_array_equal(
        _speednet._pool(x, 2), np.asarray(x)[:, :6, :8].reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4))
    )


def test_any_model_can_be_whitened():
    """The tutorial ConvNet behind the whitening layer (31 x 31 inputs to its pools)."""
    config = dataclasses.replace(PRESETS["tutorial"], whiten=True, widths=(4, 8), epochs=1,
                                 batch_size=16, tensorboard=False)  # fmt: skip
    dataset = _separable(64, 16)._replace(train_images=_images(64))
    engine = Engine(config, dataset, log=lambda line: None)
    state = engine._initial_state(0)
    expected = whitening_kernel(np.asarray(normalize(jnp.asarray(dataset.train_images))))
    np.testing.assert_allclose(
        np.abs(state.params["whiten"]["kernel"]), np.abs(expected), rtol=2e-3, atol=2e-3
    )
    metrics = list(engine.chunk_metrics(0))
    assert len(metrics) == 4 and all(np.isfinite(m["loss"]) for m in metrics)


def test_parameter_groups_follow_the_recipe_against_numpy():
    config = dataclasses.replace(PRESETS["speedrun"], **SMALL)
    total, per_epoch = 100, 10
    tx, schedule = _config.make_optimizer(config, per_epoch, total)
    params = {
        "whiten": {"kernel": jnp.full((2,), 0.5), "bias": jnp.full((2,), 0.5)},
        "net": {"block1": {"norm1": {"bias": jnp.full((2,), 0.5)},
                           "conv1": {"kernel": jnp.full((2,), 0.5)}}},
    }  # fmt: skip
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    m = config.momentum
    lr, wd = _config.sgd_hyperparameters(config)
    # airbench units: 11.5 * (1024 / 1024) / (1 + 1 / 0.15) = 1.5; 0.0153 / 11.5
    assert lr == pytest.approx(1.5, rel=1e-3) and wd == pytest.approx(0.0153 / 11.5, rel=1e-6)
    for step in range(3 * per_epoch + 2):
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        assert float(jnp.max(jnp.abs(updates["whiten"]["kernel"]))) == 0.0
        if step >= 3 * per_epoch:  # the whitening bias stops after whiten_bias_epochs
            assert float(jnp.max(jnp.abs(updates["whiten"]["bias"]))) == 0.0
        if step == 0:  # Nesterov's first step: (1 + m) (g + wd p), scaled by the group's rate
            rate = float(schedule(0))
            block = updates["net"]["block1"]
            np.testing.assert_allclose(
                block["conv1"]["kernel"], -rate * (1 + m) * (1 + wd * 0.5), rtol=1e-6
            )
            np.testing.assert_allclose(
                block["norm1"]["bias"],
                -rate * config.bias_scaler * (1 + m) * (1 + wd / config.bias_scaler * 0.5),
                rtol=1e-6,
            )
    # The triangle: 0.2 of the peak at 0, the peak at int(0.23 T), 0.07 of it at T.
    assert float(schedule(0)) == pytest.approx(0.2 * lr)
    assert float(schedule(int(0.23 * total))) == pytest.approx(lr)
    assert float(schedule(total)) == pytest.approx(0.07 * lr)


def _augment(config_values, images, indices, epoch, key=0):
    """The pipeline's augmentation with ``config_values`` on the tutorial preset, whose
    own translation is off unless they set it."""
    config = dataclasses.replace(PRESETS["tutorial"], **{"translate": 0, **config_values})
    keys = jax.random.split(jax.random.key(key), len(images))
    return _pipeline.augment_batch(config, keys, jnp.asarray(images), jnp.asarray(indices),
                                   jnp.int32(epoch), jax.random.key(7))  # fmt: skip


def test_alternating_flips_show_each_image_both_ways():
    images = _images(200)  # random pixels: no image equals its mirror image
    options = dict(flip="alternating", crop_padding=0)

    def mirrored(epoch):
        out = np.asarray(_augment(options, images, np.arange(200), epoch, key=epoch))
        assert all(np.array_equal(o, i) or np.array_equal(o, i[:, ::-1]) for o, i in
                   zip(out, images))  # fmt: skip
        return np.asarray([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])

    first, second, third = mirrored(1), mirrored(2), mirrored(3)
    assert bool(np.all(first != second))  # mirrored in exactly one of two epochs
    np.testing.assert_array_equal(first, third)  # whatever the step's key
    assert 0.35 < float(np.mean(first)) < 0.65
    random = _augment(dict(flip="random", crop_padding=0), images, np.arange(200), 1, key=1)
    assert 0.35 < np.mean([np.array_equal(o, i[:, ::-1]) for o, i in zip(random, images)]) < 0.65


def test_translation_shifts_with_reflection_padding():
    images = _images(50)
    shifted = np.asarray(_augment(dict(flip="none", crop_padding=0, translate=2), images,
                                  np.arange(50), 1, key=3))  # fmt: skip
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    offsets = set()
    for i in range(50):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[i, dy : dy + 32, dx : dx + 32], shifted[i])]  # fmt: skip
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 5
    plain = _augment(dict(flip="none", crop_padding=0), images, np.arange(50), 1)
    np.testing.assert_array_equal(plain, images)


def test_tta_averages_the_six_views():
    model = SpeedNet(widths=SMALL["widths"])
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views = [(np.asarray(x), 0.25), (padded[:, :-2, :-2], 0.125), (padded[:, 2:, 2:], 0.125)]
    expected = sum(
        w * (model.apply(variables, v) + model.apply(variables, v[:, :, ::-1])) for v, w in views
    )
    got = tta_logits(model.apply, variables, x, "flip_shift")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        tta_logits(model.apply, variables, x, "none"), model.apply(variables, x)
    )
    mirrored = 0.5 * (model.apply(variables, x) + model.apply(variables, x[:, :, ::-1]))
    np.testing.assert_allclose(
        tta_logits(model.apply, variables, x, "flip"), mirrored, rtol=1e-5, atol=1e-6
    )


def _state_for_lookahead(slow, fast, count):
    return TrainState(
        step=jnp.int32(count),
        params=fast["params"],
        model_state={"batch_stats": fast["batch_stats"]},
        opt_state=None,
        rng=jax.random.key(0),
        apply_fn=None,
        tx=None,
        slow={"params": slow["params"], "batch_stats": slow["batch_stats"]},
    )


@pytest.mark.parametrize("count, synced", [(5, True), (7, False), (20, True), (30, True)])
def test_lookahead_sync_against_numpy(count, synced):
    rng = np.random.default_rng(count)
    slow = {
        "params": rng.normal(size=(3, 4)).astype(np.float32),
        "batch_stats": rng.normal(size=5).astype(np.float32),
    }
    fast = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), slow)
    total = 30
    state = _pipeline.lookahead_sync(_state_for_lookahead(slow, fast, count), total, period=5,
                                     decay=0.95**5, power=3.0)  # fmt: skip
    decay = 1.0 if count == total else 0.95**5 * (count / total) ** 3
    got_fast = {"params": state.params, "batch_stats": state.model_state["batch_stats"]}
    for name in slow:
        s, f = slow[name].astype(np.float64), fast[name].astype(np.float64)
        want_slow = s + (1 - decay) * (f - s) if synced else s
        np.testing.assert_allclose(state.slow[name], want_slow, rtol=1e-5, atol=1e-6)
        want_fast = want_slow if synced else f
        np.testing.assert_allclose(got_fast[name], want_fast, rtol=1e-5, atol=1e-6)


def _speed_config(**overrides):
    values = dict(batch_size=64, epochs=4, whiten_bias_epochs=1, eval_batch_size=64,
                  whiten_images=64, **SMALL)  # fmt: skip
    values.update(overrides)
    return dataclasses.replace(PRESETS["speedrun"], **values)


def test_speedrun_learns_separable_data_and_reports_times(tmp_path):
    lines = []
    # (8, 16, 16) is too narrow to learn this in 40 steps from torch's init scale.
    result = train_seeds(_speed_config(widths=(16, 32, 32)), tmp_path, runs=2,
                         dataset=_separable(), progress=False, log=lines.append)  # fmt: skip
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    assert result["steps_per_run"] == 40 and all(run["steps"] == 40 for run in result["runs"])
    assert result["accuracy_mean"] > 0.75, result["runs"]  # chance: 0.1
    assert result["compile_seconds"] > 0 and result["seconds_mean"] > 0
    assert math.isfinite(result["accuracy_std"]) and math.isfinite(result["seconds_std"])
    assert result["data"] == {"train_examples": 640, "test_examples": 130}  # 130: padded, masked
    assert "compiled" in lines[0] and sum(line.startswith("run ") for line in lines) == 2
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["accuracy_mean"] == result["accuracy_mean"]


def test_a_whole_epoch_per_program_equals_one_step_per_program(tmp_path):
    """The chunking does not change the numbers; lookahead ends on the slow weights."""
    dataset = _separable(160, 40)
    rows, states = {}, {}
    for name, per_call in (("one", 1), ("epoch", None), ("three", 3)):
        config = _speed_config(batch_size=32, epochs=2, steps_per_call=per_call or 5,
                               checkpoint_every=1)  # fmt: skip
        engine = Engine(config, dataset, log=lambda line: None)
        engine.run(0, tmp_path / name, progress=False)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines]
        checkpoints = Checkpointer(tmp_path / name / "checkpoints")
        states[name] = checkpoints.restore_latest(engine._like)[0]
        checkpoints.close()
    for name in ("epoch", "three"):
        for a, b in zip(rows["one"], rows[name]):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert rows["one"][-1]["test_loss"] == pytest.approx(rows[name][-1]["test_loss"], rel=1e-4)
        # float32 noise only: a scanned program rounds a few sums differently; the
        # largest difference seen is 1.3e-4 on weights of scale 0.1.
        chex.assert_trees_all_close(states["one"].params, states[name].params, rtol=1e-3,
                                    atol=5e-4)  # fmt: skip
    final = states["one"]  # step 10 = T: synchronised with decay 1, fast = slow
    assert int(final.step) == 10
    chex.assert_trees_all_equal(final.params, final.slow["params"])
    chex.assert_trees_all_equal(final.model_state["batch_stats"], final.slow["batch_stats"])


def test_widths_from_a_list_become_a_tuple():
    assert dataclasses.replace(PRESETS["speedrun"], widths=[8, 16, 16]).widths == (8, 16, 16)


def test_speedrun_rejects_bad_settings():
    with pytest.raises(ConfigError, match="momentum"):
        dataclasses.replace(PRESETS["speedrun"], momentum=1.0)
    with pytest.raises(ConfigError, match="epochs"):
        dataclasses.replace(PRESETS["speedrun"], epochs=0)
    with pytest.raises(SetupError, match="larger than the 8 training"):
        Engine(_speed_config(batch_size=16), _separable(8, 4), log=lambda line: None)


def test_recipe_details_match_airbench94():
    """Whitening order, init scales and BatchNorm momentum as airbench94 sets them."""
    images = _images(256).astype(np.float32) / 255.0
    covariance = np.asarray(_speednet.patch_covariance(jnp.asarray(images)), np.float64)
    kernel = _speednet.kernel_from_covariance(covariance)
    filters = kernel.transpose(3, 0, 1, 2).reshape(24, -1)
    eigenvalues = np.linalg.eigvalsh(covariance)[::-1]  # descending
    # Each filter is v_i / sqrt(l_i + eps): its norm gives its eigenvalue back.
    np.testing.assert_allclose(1 / np.sum(filters[:12] ** 2, axis=1) - 5e-4, eigenvalues,
                               rtol=1e-4, atol=1e-7)  # fmt: skip
    np.testing.assert_allclose(filters[12:], -filters[:12])

    net = SpeedNet(widths=(8, 32, 32))
    x = jnp.zeros((2, 31, 31, 24))
    variables = net.init(jax.random.key(0), x)
    conv = np.asarray(variables["params"]["block2"]["conv1"]["kernel"])  # (3, 3, 8, 32)
    random_part = conv[:, :, :, 8:]  # the first 8 filters are the identity
    bound = 1 / np.sqrt(3 * 3 * 8)
    assert np.abs(random_part).max() <= bound and np.abs(random_part).max() > 0.9 * bound
    head = np.asarray(variables["params"]["head"]["kernel"])
    assert np.abs(head).max() <= 1 / np.sqrt(32) and np.abs(head).max() > 0.9 / np.sqrt(32)

    # Running statistics: 0.6 old + 0.4 batch (airbench's momentum 0.6 -> torch's 0.4).
    inputs = jax.random.normal(jax.random.key(1), (4, 31, 31, 24)) + 3.0
    _, updated = net.apply(variables, inputs, train=True, mutable=["batch_stats"])
    old = variables["batch_stats"]["block1"]["norm1"]["mean"]
    new = updated["batch_stats"]["block1"]["norm1"]["mean"]
    features = net.apply(variables, inputs, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=lambda module, name: module.name == "conv1"
                         and module.parent.name == "block1")[1]["intermediates"]  # fmt: skip
    pooled = _speednet._pool(features["block1"]["conv1"]["__call__"][0], 2)
    np.testing.assert_allclose(new, 0.6 * old + 0.4 * pooled.mean(axis=(0, 1, 2)), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
