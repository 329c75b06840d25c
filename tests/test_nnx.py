"""NNX models in the pure train step: the NNX ConvNet follows the Linen one step for step."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sgdjax
from sgdjax import data
from sgdjax.training import (
    ConvNet,
    NNXConvNet,
    NNXModel,
    ResNet9,
    TrainState,
    load_linen_variables,
    make_eval_step,
    make_train_step,
    nnx_convnet_like,
)

SHAPE = (16, 16, 3)  # small images keep the test fast; the layers are the tutorial's


def _linen_variables(seed=0):
    model = ConvNet(num_classes=10)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *SHAPE)), train=False)
    return model, variables


def _nnx_from(variables):
    module = NNXConvNet(10, image_size=SHAPE[0], rngs=nnx.Rngs(123))
    load_linen_variables(module, variables)
    return module


def _batches(count, batch_size=8):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (batch_size, *SHAPE), dtype=np.uint8),
            "label": rng.integers(0, 10, (batch_size,), dtype=np.int32),
        }
        for _ in range(count)
    ]


def test_nnx_state_is_the_linen_variable_tree():
    _, variables = _linen_variables()
    module = NNXConvNet(10, image_size=SHAPE[0], rngs=nnx.Rngs(0))
    own = NNXModel(module).init(None)
    assert jax.tree.structure(own) == jax.tree.structure(jax.tree.map(jnp.asarray, variables))
    chex.assert_trees_all_equal_shapes_and_dtypes(own, variables)


def test_forward_equals_linen_in_train_and_eval_mode():
    linen, variables = _linen_variables()
    model = NNXModel(_nnx_from(variables))
    images = jnp.asarray(np.random.default_rng(1).normal(size=(4, *SHAPE)), jnp.float32)
    chex.assert_trees_all_close(
        model.apply(variables, images, train=False),
        linen.apply(variables, images, train=False),
        rtol=1e-6,
        atol=1e-6,
    )
    got = model.apply(variables, images, train=True, mutable=["batch_stats"])
    expected = linen.apply(variables, images, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("augment", [False, True])
def test_the_same_sgd_trajectory_as_linen(augment):
    linen, variables = _linen_variables()
    # Nesterov momentum, weight decay and clipping: every part of the update sees the trees.
    tx = sgdjax.chain(
        sgdjax.clip_by_global_norm(5.0),
        sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    )
    sample = jnp.zeros((1, *SHAPE))
    key = jax.random.key(7)
    linen_state = TrainState.create(model=linen, tx=tx, rng=key, sample_input=sample)
    nnx_state = TrainState.create(
        model=NNXModel(_nnx_from(linen_state_variables(linen_state))),
        tx=tx,
        rng=key,
        sample_input=sample,
    )
    step = make_train_step(augment_fn=data.augment if augment else None, donate=False)
    losses = {"linen": [], "nnx": []}
    for batch in _batches(5):
        linen_state, linen_metrics = step(linen_state, batch)
        nnx_state, nnx_metrics = step(nnx_state, batch)
        losses["linen"].append(float(linen_metrics["loss"]))
        losses["nnx"].append(float(nnx_metrics["loss"]))
    np.testing.assert_allclose(losses["nnx"], losses["linen"], rtol=1e-5)
    assert losses["linen"][-1] != losses["linen"][0]  # the weights moved
    chex.assert_trees_all_close(nnx_state.params, linen_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        nnx_state.model_state, linen_state.model_state, rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(nnx_state.opt_state, linen_state.opt_state, rtol=1e-5, atol=1e-6)
    evaluate = make_eval_step()
    batch = _batches(1)[0]
    chex.assert_trees_all_close(
        evaluate(nnx_state, batch), evaluate(linen_state, batch), rtol=1e-5, atol=1e-5
    )


def linen_state_variables(state):
    return {"params": state.params, **state.model_state}


def test_merge_rebuilds_a_module_with_the_trained_weights():
    _, variables = _linen_variables()
    model = NNXModel(_nnx_from(variables))
    doubled = jax.tree.map(lambda x: 2 * x, variables)
    module = model.merge(doubled)
    module.eval()
    images = jnp.ones((2, *SHAPE))
    chex.assert_trees_all_close(module(images), model.apply(doubled, images), rtol=1e-6)
    np.testing.assert_array_equal(
        module.Conv_0.kernel.get_value(), 2 * np.asarray(variables["params"]["Conv_0"]["kernel"])
    )


def test_load_refuses_a_mismatched_tree():
    _, variables = _linen_variables()  # widths (32, 64)
    module = NNXConvNet(10, widths=(32, 48), image_size=SHAPE[0], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchNorm_1.*float32\[64\]"):
        load_linen_variables(module, variables)
    with pytest.raises(ValueError, match="cache"):
        load_linen_variables(module, {**variables, "cache": {}})


def test_modules_with_other_state_are_refused():
    class WithDropout(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
            self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.dropout(self.linear(x))

    with pytest.raises(ValueError, match="RngState|RngKey|RngCount"):
        NNXModel(WithDropout())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"widths": ()}, "widths"),
        ({"widths": (8, 0)}, "widths"),
        ({"num_classes": 0}, "num_classes"),
        ({"image_size": 2}, "vanishes"),
    ],
)
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NNXConvNet(rngs=nnx.Rngs(0), **kwargs)


def test_the_twin_starts_from_the_linen_initial_weights():
    linen = ConvNet(num_classes=10)
    twin = nnx_convnet_like(linen, image_size=SHAPE[0])
    tx = sgdjax.sgd(0.1, momentum=0.9)
    sample = jnp.zeros((1, *SHAPE))
    expected = TrainState.create(model=linen, tx=tx, rng=jax.random.key(3), sample_input=sample)
    got = TrainState.create(model=twin, tx=tx, rng=jax.random.key(3), sample_input=sample)
    chex.assert_trees_all_equal(got.params, expected.params)
    chex.assert_trees_all_equal(got.model_state, expected.model_state)
    batch = _batches(1)[0]
    step = make_train_step(donate=False)
    (got, got_metrics), (expected, expected_metrics) = step(got, batch), step(expected, batch)
    chex.assert_trees_all_close(got_metrics, expected_metrics, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got.params, expected.params, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ConvNet only"):
        nnx_convnet_like(ResNet9())
    with pytest.raises(ValueError, match="init_from"):
        NNXModel(NNXConvNet(rngs=nnx.Rngs(0)), init_from="linen")


def test_api_nnx_trains_to_the_linen_numbers_in_the_engine(tmp_path):
    from sgdjax.data import Dataset
    from sgdjax.training import PRESETS, ConfigError, train_and_evaluate

    rng = np.random.default_rng(0)
    dataset = Dataset(
        rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, (48,), dtype=np.int32),
        rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, (20,), dtype=np.int32),
        tuple(f"class{i}" for i in range(10)),
    )
    base = dataclasses.replace(PRESETS["tutorial"], epochs=2, batch_size=16, tensorboard=False)
    summaries = {
        api: train_and_evaluate(
            dataclasses.replace(base, api=api), tmp_path / api, progress=False, dataset=dataset
        )  # fmt: skip
        for api in ("linen", "nnx")
    }
    assert summaries["nnx"]["config"]["api"] == "nnx"
    # The test loss on these random labels is about 75 after 2 epochs, and the two
    # programs differ in float32 rounding only: 3e-5 relative is measured.
    for key in ("test_loss", "test_accuracy"):
        assert summaries["nnx"][key] == pytest.approx(summaries["linen"][key], rel=1e-4)
    rows = {api: (tmp_path / api / "metrics.jsonl").read_text().splitlines() for api in summaries}
    for linen_row, nnx_row in zip(rows["linen"], rows["nnx"], strict=True):
        linen_row, nnx_row = json.loads(linen_row), json.loads(nnx_row)
        assert nnx_row["train_loss"] == pytest.approx(linen_row["train_loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="api"):
        dataclasses.replace(base, api="nnx", model="resnet9")
    with pytest.raises(ConfigError, match="api"):
        dataclasses.replace(base, api="haiku")
