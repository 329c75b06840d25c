"""End to end: torch's most common SGD recipe and its sgdjax port give the same run.

A small torch network and its Flax twin start from the same weights and see the same
batches; torch trains with ``SGD(lr, momentum=0.9, nesterov=True, weight_decay=1e-4)``
and ``OneCycleLR(max_lr=0.1, total_steps=30)`` with its defaults (which cycle the
momentum too), sgdjax with ``sgd(one_cycle(0.1, 30), momentum=one_cycle_momentum(30),
nesterov=True, weight_decay=1e-4)``. The parameters agree to float32 tolerance after
every step. Without the momentum schedule the port drifts away, which the last test
checks so that the first one can fail.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import sgdjax
from sgdjax import schedules

TOTAL_STEPS = 30
BATCH = 16


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=True):
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


class FlaxCNN(nn.Module):
    """conv3x3(8) - BN - ReLU - maxpool2 - dense(10), NHWC."""

    @nn.compact
    def __call__(self, x, *, train=True):
        x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name="bn")(x)  # fmt: skip
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return nn.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


def _torch_mlp():
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


class _TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):  # x: NHWC, as the Flax twin sees it
        x = torch.relu(self.bn(self.conv(x.permute(0, 3, 1, 2))))
        x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))  # flatten HWC


def _mlp_params(net):
    """The Flax params holding the torch net's weights (kernels are weights transposed)."""
    return {
        "fc1": {"kernel": net[0].weight.detach().numpy().T, "bias": net[0].bias.detach().numpy()},
        "fc2": {"kernel": net[2].weight.detach().numpy().T, "bias": net[2].bias.detach().numpy()},
    }


def _cnn_params(net):
    return {
        "conv": {"kernel": net.conv.weight.detach().numpy().transpose(2, 3, 1, 0)},
        "bn": {"scale": net.bn.weight.detach().numpy(), "bias": net.bn.bias.detach().numpy()},
        "fc": {"kernel": net.fc.weight.detach().numpy().T, "bias": net.fc.bias.detach().numpy()},
    }


NETWORKS = {
    "mlp": (FlaxMLP, _torch_mlp, _mlp_params, (12,)),
    "cnn": (FlaxCNN, _TorchCNN, _cnn_params, (8, 8, 3)),
}


def _batches(input_shape, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(TOTAL_STEPS, BATCH, *input_shape)).astype(np.float32)
    labels = rng.integers(0, 10, size=(TOTAL_STEPS, BATCH))
    return images, labels


def _torch_run(name):
    """torch's params (as Flax trees) after each of the steps, and the initial ones."""
    _, make_torch, to_flax, input_shape = NETWORKS[name]
    torch.manual_seed(0)
    net = make_torch()

    def snapshot():  # copies: .numpy() shares memory with the tensors torch updates
        return jax.tree.map(np.array, to_flax(net))

    initial = snapshot()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=TOTAL_STEPS)
    images, labels = _batches(input_shape)
    history = []
    for step in range(TOTAL_STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            net(torch.from_numpy(images[step])), torch.from_numpy(labels[step])
        )
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.append(snapshot())
    return initial, history


def _sgdjax_run(name, tx, initial):
    make_flax, _, _, input_shape = NETWORKS[name]
    model = make_flax()
    images, labels = _batches(input_shape)
    variables = model.init(jax.random.key(0), jnp.asarray(images[0]))
    params = jax.tree.map(jnp.asarray, initial)
    assert jax.tree.structure(params) == jax.tree.structure(variables["params"])
    batch_stats = variables.get("batch_stats", {})

    def loss_fn(params, batch_stats, x, y):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, mutated.get("batch_stats", {})

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return sgdjax.apply_updates(params, updates), batch_stats, opt_state

    opt_state = tx.init(params)
    history = []
    for step in range(TOTAL_STEPS):
        params, batch_stats, opt_state = train_step(
            params, batch_stats, opt_state, jnp.asarray(images[step]), jnp.asarray(labels[step])
        )
        history.append(params)
    return history


def _port(momentum):
    return sgdjax.sgd(schedules.one_cycle(0.1, TOTAL_STEPS), momentum=momentum, nesterov=True,
                      weight_decay=1e-4)  # fmt: skip


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_sgd_one_cycle_port_gives_torchs_run_step_by_step(name):
    initial, theirs = _torch_run(name)
    ours = _sgdjax_run(name, _port(schedules.one_cycle_momentum(TOTAL_STEPS)), initial)
    moved = 0.0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            where = f"step {step} {jax.tree_util.keystr(path)}"
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6, err_msg=where)
    for x, y in zip(jax.tree.leaves(theirs[-1]), jax.tree.leaves(initial)):
        moved = max(moved, float(np.max(np.abs(x - y))))
    assert moved > 1e-2, "the run must move the weights for the comparison to mean anything"


def test_without_the_momentum_schedule_the_port_drifts():
    """OneCycleLR cycles the momentum by default: a constant 0.9 is another run."""
    initial, theirs = _torch_run("mlp")
    ours = _sgdjax_run("mlp", _port(0.9), initial)
    drift = max(
        float(np.max(np.abs(x - y) / (np.abs(y) + 1e-3)))
        for x, y in zip(jax.tree.leaves(ours[-1]), jax.tree.leaves(theirs[-1]))
    )
    assert drift > 1e-3, drift
