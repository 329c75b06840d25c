"""``sgdjax.sgd`` against ``torch.optim.SGD`` over the whole option grid."""

import itertools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import apply_steps

import sgdjax
from sgdjax import schedules

SHAPES = [(4, 3), (7,), (2, 3, 2, 2), ()]
NUM_STEPS = 25


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]
    grads = [
        [rng.normal(size=shape).astype(np.float32) for shape in SHAPES] for _ in range(NUM_STEPS)
    ]
    return params, grads


def _torch_trajectory(params, grads, make_scheduler=None, **options):
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    optimizer = torch.optim.SGD(tensors, **options)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    trajectory = []
    for step_grads in grads:
        for tensor, grad in zip(tensors, step_grads):
            tensor.grad = torch.tensor(grad)
        optimizer.step()
        if scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler.step()
        trajectory.append([t.detach().numpy().copy() for t in tensors])
    return trajectory


def _sgdjax_trajectory(tx, params, grads, *, jit=True):
    params = [jnp.asarray(p) for p in params]
    grads = [[jnp.asarray(g) for g in step_grads] for step_grads in grads]
    trajectory = apply_steps(tx, params, grads, jit=jit)[2]
    return [[np.asarray(p) for p in step_params] for step_params in trajectory]


def _assert_trajectories_close(ours, theirs, rtol=1e-5, atol=2e-6):
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for leaf_a, leaf_b in zip(a, b):
            np.testing.assert_allclose(
                leaf_a, leaf_b, rtol=rtol, atol=atol, err_msg=f"differs at step {step + 1}"
            )


def _option_grid():
    grid = itertools.product(
        [0.0, 0.5, 0.9],  # momentum
        [0.0, 0.3, 1.0],  # dampening
        [False, True],  # nesterov
        [0.0, 1e-2],  # weight_decay
        [False, True],  # maximize
    )
    for momentum, dampening, nesterov, weight_decay, maximize in grid:
        if nesterov and (momentum == 0.0 or dampening != 0.0):
            continue  # torch rejects these, and so do we (tested below)
        yield dict(
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=maximize,
        )


@pytest.mark.parametrize("options", list(_option_grid()), ids=lambda o: str(o))
def test_sgd_matches_torch_for_every_option(options):
    params, grads = _problem()
    theirs = _torch_trajectory(params, grads, lr=0.05, **options)
    ours = _sgdjax_trajectory(sgdjax.sgd(0.05, **options), params, grads)
    _assert_trajectories_close(ours, theirs)


def test_sgd_matches_torch_without_jit_and_with_positional_arguments():
    params, grads = _problem(seed=1)
    theirs = _torch_trajectory(params, grads, lr=0.1, momentum=0.9, dampening=0.1)
    ours = _sgdjax_trajectory(sgdjax.sgd(0.1, 0.9, 0.1), params, grads, jit=False)
    _assert_trajectories_close(ours, theirs)


def test_sgd_defaults_equal_torch_defaults():
    import inspect

    torch_defaults = {
        name: p.default
        for name, p in inspect.signature(torch.optim.SGD).parameters.items()
        if name in ("momentum", "dampening", "nesterov", "weight_decay", "maximize")
    }
    ours = {
        name: p.default
        for name, p in inspect.signature(sgdjax.sgd).parameters.items()
        if name in torch_defaults
    }
    assert ours == torch_defaults


SCHEDULE_PAIRS = {
    "step": (
        lambda: schedules.step_decay(0.1, step_size=4, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
    ),
    "cosine": (
        lambda: schedules.cosine_annealing(0.1, t_max=10, eta_min=0.001),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.001),
    ),
    "onecycle": (
        lambda: schedules.one_cycle(0.1, total_steps=NUM_STEPS + 1),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=NUM_STEPS + 1, cycle_momentum=False
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULE_PAIRS))
def test_sgd_with_schedule_matches_torch_scheduler(name):
    make_schedule, make_scheduler = SCHEDULE_PAIRS[name]
    params, grads = _problem(seed=2)
    options = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
    theirs = _torch_trajectory(params, grads, make_scheduler=make_scheduler, lr=0.1, **options)
    ours = _sgdjax_trajectory(sgdjax.sgd(make_schedule(), **options), params, grads)
    _assert_trajectories_close(ours, theirs)


def test_sgd_with_parameter_groups_matches_torch_param_groups():
    """torch param groups (no decay on the bias, 10x bias lr) == sgdjax.multi_transform."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(3, 2)).astype(np.float32)
    bias = rng.normal(size=(2,)).astype(np.float32)
    grads = [
        {"weight": rng.normal(size=(3, 2)).astype(np.float32), "bias": rng.normal(size=(2,))}
        for _ in range(NUM_STEPS)
    ]
    tw, tb = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    optimizer = torch.optim.SGD(
        [
            {"params": [tw], "weight_decay": 1e-2},
            {"params": [tb], "lr": 0.5, "weight_decay": 0.0},
        ],
        lr=0.05,
        momentum=0.9,
    )
    tx = sgdjax.multi_transform(
        {
            "weights": sgdjax.sgd(0.05, momentum=0.9, weight_decay=1e-2),
            "biases": sgdjax.sgd(0.5, momentum=0.9),
        },
        {"weight": "weights", "bias": "biases"},
    )
    params = {"weight": jnp.asarray(weight), "bias": jnp.asarray(bias, jnp.float32)}
    state = tx.init(params)
    for step_grads in grads:
        tw.grad = torch.tensor(step_grads["weight"])
        tb.grad = torch.tensor(step_grads["bias"].astype(np.float32))
        optimizer.step()
        jax_grads = {k: jnp.asarray(v, jnp.float32) for k, v in step_grads.items()}
        updates, state = tx.update(jax_grads, state, params)
        params = sgdjax.apply_updates(params, updates)
    np.testing.assert_allclose(params["weight"], tw.detach().numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(params["bias"], tb.detach().numpy(), rtol=1e-5, atol=2e-6)


def test_sgd_trains_a_torch_model_identically():
    """A small MLP trained on the same data by torch and by sgdjax stays in step."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 1))).astype(np.float32)
    w1 = (rng.normal(size=(5, 8)) / np.sqrt(5)).astype(np.float32)
    w2 = (rng.normal(size=(8, 1)) / np.sqrt(8)).astype(np.float32)

    tw1, tw2 = torch.tensor(w1, requires_grad=True), torch.tensor(w2, requires_grad=True)
    optimizer = torch.optim.SGD([tw1, tw2], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        loss = ((torch.tanh(torch.tensor(x) @ tw1) @ tw2 - torch.tensor(y)) ** 2).mean()
        loss.backward()
        optimizer.step()

    def loss_fn(params):
        return jnp.mean((jnp.tanh(x @ params[0]) @ params[1] - y) ** 2)

    tx = sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    params = [jnp.asarray(w1), jnp.asarray(w2)]
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return sgdjax.apply_updates(params, updates), state

    for _ in range(30):
        params, state = step(params, state)
    chex.assert_trees_all_close(
        params, [tw1.detach().numpy(), tw2.detach().numpy()], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.0, nesterov=True),
        dict(momentum=0.9, dampening=0.5, nesterov=True),
    ],
)
def test_sgd_rejects_what_torch_rejects(options):
    with pytest.raises(ValueError):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, **options)
    with pytest.raises(ValueError, match="nesterov"):
        sgdjax.sgd(0.1, **options)
