"""SWA: ``swa_init/update/value`` against ``torch.optim.swa_utils.AveragedModel``, and
``training.recompute_batch_stats`` against ``update_bn`` and a float64 reference."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import mixed_tree
from torch.optim import swa_utils

import sgdjax
from sgdjax import schedules
from sgdjax.training import recompute_batch_stats

NUM_STEPS = 25


def _random_trees(params, seed, count=NUM_STEPS):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
            for _ in range(count)]  # fmt: skip


class _TorchTree(torch.nn.Module):
    """The leaves of a tree as torch parameters, in flattening order."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(x)) for x in leaves])


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_swa_matches_averaged_model_and_the_mean(jit):
    params = mixed_tree()
    trees = _random_trees(params, seed=0)
    leaves, treedef = jax.tree.flatten(params)
    model = _TorchTree([np.asarray(x) for x in leaves])
    averaged = swa_utils.AveragedModel(model)
    update = jax.jit(sgdjax.swa_update) if jit else sgdjax.swa_update
    state = sgdjax.swa_init(params)
    chex.assert_trees_all_close(sgdjax.swa_value(state), params)  # a copy before any update
    for step, tree in enumerate(trees):
        with torch.no_grad():
            for p, x in zip(model.leaves, treedef.flatten_up_to(tree)):
                p.copy_(torch.from_numpy(x))
        averaged.update_parameters(model)
        state = update(state, tree)
        theirs = treedef.unflatten([p.detach().numpy() for p in averaged.module.leaves])
        chex.assert_trees_all_close(sgdjax.swa_value(state), theirs, rtol=1e-6, atol=1e-7,
                                    custom_message=f"step {step}")  # fmt: skip
        mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0),
                            *trees[: step + 1])  # fmt: skip
        chex.assert_trees_all_close(sgdjax.swa_value(state), mean, rtol=2e-6, atol=1e-6)
    assert int(state.count) == NUM_STEPS


def test_swa_golden_values_dtypes_and_abstract_init():
    state = sgdjax.swa_init(jnp.zeros(()))
    for x in (2.0, 4.0, 9.0):  # 2, (2 + 4) / 2 = 3, 3 + (9 - 3) / 3 = 5
        state = sgdjax.swa_update(state, jnp.asarray(x))
    np.testing.assert_allclose(sgdjax.swa_value(state), 5.0)
    params = mixed_tree(jnp.bfloat16)
    state = sgdjax.swa_update(sgdjax.swa_init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(sgdjax.swa_value(state), params)
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    chex.assert_trees_all_equal_structs(jax.eval_shape(sgdjax.swa_init, shapes), state)
    with pytest.raises(ValueError, match="missing from tree"):
        sgdjax.swa_update(sgdjax.swa_init({"a": jnp.ones(1), "b": jnp.ones(1)}),
                          {"a": jnp.ones(1)})  # fmt: skip


def test_swa_recipe_matches_torch():
    """torch's recipe: SGD; from epoch 2 on, an average of the weights and SWALR's step
    after each epoch (SWALR built at the start, whose rate stays 0.1 until stepped)."""
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(6, 4, 3)).astype(np.float32)  # 6 epochs of 4 steps
    weight = torch.zeros(3, requires_grad=True)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight.detach().clone())
    optimizer = torch.optim.SGD([holder.weight], lr=0.1, momentum=0.9)
    averaged = swa_utils.AveragedModel(holder)
    swa_scheduler = swa_utils.SWALR(optimizer, swa_lr=0.02, anneal_epochs=2)
    # the SWALR rate per epoch from epoch 2 on; a constant 0.1 before
    lr = schedules.join([schedules.constant(0.1), schedules.swa_lr(0.1, 0.02, 2)], [2])
    tx = sgdjax.inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9)
    params = jnp.zeros(3)
    opt_state, swa_state = tx.init(params), sgdjax.swa_init(params)
    for epoch in range(6):
        opt_state.hyperparams["learning_rate"] = lr(epoch)
        for step in range(4):
            holder.weight.grad = torch.from_numpy(grads[epoch, step].copy())
            optimizer.step()
            updates, opt_state = tx.update(jnp.asarray(grads[epoch, step]), opt_state, params)
            params = sgdjax.apply_updates(params, updates)
        if epoch >= 2:
            averaged.update_parameters(holder)
            swa_state = sgdjax.swa_update(swa_state, params)
            swa_scheduler.step()
        np.testing.assert_allclose(params, holder.weight.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sgdjax.swa_value(swa_state),
                               averaged.module.weight.detach().numpy(), rtol=1e-5)  # fmt: skip


# --------------------------------------------------------------------------------------
# recompute_batch_stats (torch's update_bn)
# --------------------------------------------------------------------------------------


class _Block(nn.Module):
    features: int
    momentum: float

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Dense(self.features)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                            epsilon=1e-5)(x)  # fmt: skip


class _Net(nn.Module):
    """Dense-BN-ReLU, then a nested Dense-BN with another momentum."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(_Block(5, 0.9)(x, train=train))
        return _Block(3, 0.99)(x, train=train)


def _torch_twin(variables):
    p = variables["params"]
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5, momentum=0.1), torch.nn.ReLU(),
        torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3, momentum=0.01),
    )  # fmt: skip
    with torch.no_grad():
        for index, block in ((0, "_Block_0"), (3, "_Block_1")):
            net[index].weight.copy_(torch.tensor(np.asarray(p[block]["Dense_0"]["kernel"]).T))
            net[index].bias.copy_(torch.tensor(np.asarray(p[block]["Dense_0"]["bias"])))
            bn = net[index + 1]
            bn.weight.copy_(torch.tensor(np.asarray(p[block]["BatchNorm_0"]["scale"])))
            bn.bias.copy_(torch.tensor(np.asarray(p[block]["BatchNorm_0"]["bias"])))
    return net


def _reference_stats(variables, batches):
    """float64: each BatchNorm's batch mean and biased variance, averaged over batches."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])
    sums = {name: [0.0, 0.0] for name in ("_Block_0", "_Block_1")}
    for x in batches:
        h = np.asarray(x, np.float64)
        for name in ("_Block_0", "_Block_1"):
            z = h @ p[name]["Dense_0"]["kernel"] + p[name]["Dense_0"]["bias"]
            mean, var = z.mean(0), z.var(0)
            sums[name][0] += mean
            sums[name][1] += var
            bn = p[name]["BatchNorm_0"]
            h = np.maximum((z - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"], 0.0)
    return {name: {"BatchNorm_0": {"mean": m / len(batches), "var": v / len(batches)}}
            for name, (m, v) in sums.items()}  # fmt: skip


def test_recompute_batch_stats_matches_update_bn_and_the_float64_average():
    net = _Net()
    rng = np.random.default_rng(2)
    variables = net.init(jax.random.key(0), jnp.zeros((1, 4)), train=False)
    variables = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32),
                             variables)  # fmt: skip  # stale statistics, ignored
    batch_size = 16
    batches = [(rng.normal(size=(batch_size, 4)) * 2 + 1).astype(np.float32) for _ in range(7)]
    ours = recompute_batch_stats(net, variables, [(x, None) for x in batches])
    reference = _reference_stats(variables, batches)
    # the last ReLU layer feeds the second block, so the reference runs the network
    chex.assert_trees_all_close(
        {k: {"BatchNorm_0": v["BatchNorm_0"]} for k, v in ours.items()}, reference,
        rtol=2e-5, atol=1e-6,
    )  # fmt: skip
    twin = _torch_twin(variables)
    swa_utils.update_bn([torch.from_numpy(x) for x in batches], twin)
    unbias = (batch_size - 1) / batch_size  # torch stores the unbiased variance
    for index, block in ((1, "_Block_0"), (4, "_Block_1")):
        stats = ours[block]["BatchNorm_0"]
        np.testing.assert_allclose(stats["mean"], twin[index].running_mean, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], twin[index].running_var * unbias, rtol=2e-5)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, variables["batch_stats"])


def test_recompute_batch_stats_takes_dict_batches_and_a_preprocess():
    net = _Net()
    variables = net.init(jax.random.key(1), jnp.zeros((1, 4)), train=False)
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 255, size=(8, 4)).astype(np.uint8) for _ in range(3)]
    ours = recompute_batch_stats(
        net,
        variables,
        [{"image": x, "label": np.zeros(8)} for x in batches],
        preprocess=lambda x: x.astype(jnp.float32) / 255.0,
    )
    reference = _reference_stats(variables, [x / 255.0 for x in batches])
    chex.assert_trees_all_close(ours, reference, rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batches is empty"):
        recompute_batch_stats(net, variables, [])
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        recompute_batch_stats(net, {"params": variables["params"]}, batches)


def test_swa_then_recompute_batch_stats_on_a_convnet():
    """The whole SWA ending: average the params, then recompute the statistics."""
    from sgdjax.training import ConvNet

    model = ConvNet(num_classes=3)
    rng = np.random.default_rng(4)
    images = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), images[:1], train=False)
    swa_state = sgdjax.swa_init(variables["params"])
    for seed in range(3):
        noisy = jax.tree.map(lambda x, s=seed: x + 0.01 * s, variables["params"])
        swa_state = sgdjax.swa_update(swa_state, noisy)
    averaged = {"params": sgdjax.swa_value(swa_state), "batch_stats": variables["batch_stats"]}
    stats = recompute_batch_stats(model, averaged, [images[:4], images[4:]])
    chex.assert_trees_all_equal_shapes_and_dtypes(stats, variables["batch_stats"])
    chex.assert_tree_all_finite(stats)
    assert not math.isclose(float(jax.tree.leaves(stats)[0].sum()), 0.0)
    logits = model.apply({**averaged, "batch_stats": stats}, images, train=False)
    chex.assert_tree_all_finite(logits)
