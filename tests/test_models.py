"""sgdjax/training/_models.py: every model trains a real step; ResNet-18's layout; the
reshape max pool against flax's."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import image_batch, train_state

from sgdjax import data, training


@pytest.mark.parametrize(
    "model, size",
    [
        (training.ConvNet(), 32),
        (training.ResNet9(), 16),
        (training.ResNet18(stage_sizes=(1, 1, 1, 1)), 16),
    ],
    ids=["convnet", "resnet9", "resnet18_small"],
)
def test_one_real_training_step_per_model(model, size):
    state = train_state(model, size=size)
    step = training.make_train_step(augment_fn=data.augment)
    new_state, metrics = step(state, image_batch(4, size))
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "learning_rate"}
    chex.assert_tree_all_finite((new_state.params, metrics["loss"], metrics["grad_norm"]))
    assert int(new_state.step) == 1
    assert "batch_stats" in new_state.model_state


def test_resnet18_has_the_standard_layout():
    params = train_state(training.ResNet18()).params
    leaves = jax.tree.leaves(params)
    assert len(leaves) == 62  # as torchvision's CIFAR ResNet-18: 62 parameter tensors
    assert 11_100_000 < sum(x.size for x in leaves) < 11_200_000


def test_reshape_max_pool_equals_flax_max_pool():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))  # continuous values: no ties
    chex.assert_trees_all_close(
        training.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)), rtol=0, atol=0
    )
    weights = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    ours = jax.grad(lambda x: jnp.sum(training.max_pool_2x2(x) * weights))(x)
    flax_grad = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * weights))(x)
    chex.assert_trees_all_close(ours, flax_grad)
