"""``sgdjax.asgd`` against ``torch.optim.ASGD`` and a float64 numpy reference loop."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import mixed_tree

import sgdjax
from sgdjax import schedules

NUM_STEPS = 25


def _gradient_sequence(params, seed, num_steps=NUM_STEPS):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
            for _ in range(num_steps)]  # fmt: skip


def _torch_asgd(params, grads, make_scheduler=None, **kwargs):
    """torch's params and ``ax`` after each step."""
    leaves, treedef = jax.tree.flatten(params)
    tensors = [torch.tensor(np.asarray(leaf), requires_grad=True) for leaf in leaves]
    optimizer = torch.optim.ASGD(tensors, foreach=False, **kwargs)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    history = []
    for g in grads:
        for tensor, leaf in zip(tensors, treedef.flatten_up_to(g)):
            tensor.grad = torch.from_numpy(np.array(leaf))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history.append((
            treedef.unflatten([t.detach().numpy().copy() for t in tensors]),
            treedef.unflatten([optimizer.state[t]["ax"].numpy().copy() for t in tensors]),
        ))  # fmt: skip
    return history


def _reference_asgd(params, grads, lr, lambd, alpha, t0, weight_decay, maximize):
    """The docstring's rule in float64."""
    theta = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    average = jax.tree.map(np.zeros_like, theta)
    eta, mu, history = lr, 1.0, []
    for t, grad in enumerate(grads, start=1):
        g = jax.tree.map(lambda d, p: (-d if maximize else d) + weight_decay * p, grad, theta)
        theta = jax.tree.map(lambda p, d, e=eta: p * (1 - lambd * e) - e * d, theta, g)
        if mu == 1:
            average = theta
        else:
            average = jax.tree.map(lambda a, p, w=mu: a + w * (p - a), average, theta)
        eta, mu = lr / (1 + lambd * lr * t) ** alpha, 1 / max(1, t - t0)
        history.append((theta, average))
    return history


CASES = {
    "defaults": dict(),
    "averaging_from_step_5": dict(lr=0.05, t0=5.0),
    "strong_decay": dict(lr=0.2, lambd=0.05, alpha=0.6, t0=3.0, weight_decay=1e-2),
    "maximize_fractional_t0": dict(lr=0.02, lambd=1e-3, alpha=1.0, t0=7.5, maximize=True),
    "no_lambd": dict(lr=0.1, lambd=0.0, t0=0.0),
}


def _ours(lr=0.01, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, maximize=False):
    return sgdjax.asgd(lr, lambd, alpha, t0, weight_decay, maximize)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_asgd_matches_torch_and_the_float64_rule_every_step(name, jit):
    kwargs = CASES[name]
    params = mixed_tree()
    grads = _gradient_sequence(params, seed=sorted(CASES).index(name))
    torch_kwargs = {("lr" if k == "lr" else k): v for k, v in kwargs.items()}
    theirs = _torch_asgd(params, grads, **torch_kwargs)
    full = dict(lr=0.01, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, maximize=False)
    reference = _reference_asgd(params, grads, **{**full, **kwargs})
    tx = _ours(**kwargs)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for step, g in enumerate(grads):
        updates, state = update(g, state, params)
        params = sgdjax.apply_updates(params, updates)
        averaged = sgdjax.asgd_averaged_params(state)
        message = f"{name}, step {step}"
        chex.assert_trees_all_close(params, theirs[step][0], rtol=2e-6, atol=1e-6,
                                    custom_message=message)  # fmt: skip
        chex.assert_trees_all_close(averaged, theirs[step][1], rtol=2e-6, atol=1e-6,
                                    custom_message=message)  # fmt: skip
        chex.assert_trees_all_close(params, reference[step][0], rtol=2e-6, atol=1e-6)
        chex.assert_trees_all_close(averaged, reference[step][1], rtol=2e-6, atol=1e-6)
    # the cases that average: the average differs from the last iterate
    if kwargs.get("t0", 1e6) < NUM_STEPS - 1:
        assert not np.allclose(averaged["bias"], params["bias"])


def test_asgd_with_a_scheduled_rate_matches_torch_with_a_scheduler():
    """eta_t uses the rate of step t, as torch computes it after the step."""
    params = mixed_tree()
    grads = _gradient_sequence(params, seed=7)
    theirs = _torch_asgd(params, grads, lambda o: torch.optim.lr_scheduler.StepLR(o, 4, 0.5),
                         lr=0.1, lambd=0.05, t0=6.0)  # fmt: skip
    tx = sgdjax.asgd(schedules.step_decay(0.1, 4, 0.5), lambd=0.05, t0=6.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step, g in enumerate(grads):
        updates, state = update(g, state, params)
        params = sgdjax.apply_updates(params, updates)
        chex.assert_trees_all_close(params, theirs[step][0], rtol=2e-6, atol=1e-6)
        chex.assert_trees_all_close(
            sgdjax.asgd_averaged_params(state), theirs[step][1], rtol=2e-6, atol=1e-6
        )


def test_asgd_golden_values():
    tx = sgdjax.asgd(0.5, lambd=0.1, alpha=1.0, t0=0.0)
    params = jnp.ones(())
    state = tx.init(params)
    # step 1: theta = 1 * (1 - 0.1 * 0.5) - 0.5 * 1 = 0.45; a = theta (mu_0 = 1).
    updates, state = tx.update(jnp.ones(()), state, params)
    params = sgdjax.apply_updates(params, updates)
    np.testing.assert_allclose([params, sgdjax.asgd_averaged_params(state)], [0.45, 0.45])
    # eta_1 = 0.5 / (1 + 0.1 * 0.5 * 1) = 0.47619; mu_1 = 1 / max(1, 1 - 0) = 1.
    # step 2: theta = 0.45 * (1 - 0.047619) - 0.47619 * 1 = -0.04762; a = theta.
    updates, state = tx.update(jnp.ones(()), state, params)
    params = sgdjax.apply_updates(params, updates)
    np.testing.assert_allclose(params, 0.45 * (1 - 0.1 * 0.5 / 1.05) - 0.5 / 1.05, rtol=1e-6)
    np.testing.assert_allclose(sgdjax.asgd_averaged_params(state), params)
    # mu_2 = 1 / max(1, 2) = 0.5: step 3 averages a = (a_2 + theta_3) / 2.
    before = sgdjax.asgd_averaged_params(state)
    updates, state = tx.update(jnp.ones(()), state, params)
    params = sgdjax.apply_updates(params, updates)
    np.testing.assert_allclose(sgdjax.asgd_averaged_params(state), (before + params) / 2)


def test_asgd_state_and_abstract_init():
    params = mixed_tree(jnp.bfloat16)
    tx = sgdjax.asgd()
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    abstract = jax.eval_shape(tx.init, shapes)
    chex.assert_trees_all_equal_structs(abstract, tx.init(params))
    averaged = sgdjax.asgd_averaged_params(abstract)
    chex.assert_trees_all_equal_shapes_and_dtypes(averaged, params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="no AsgdState"):
        sgdjax.asgd_averaged_params(sgdjax.sgd(0.1).init(params))


BAD = [
    (lambda: sgdjax.asgd(-0.1), "learning_rate", "-0.1"),
    (lambda: sgdjax.asgd(lambd=-1e-4), "lambd", "-0.0001"),
    (lambda: sgdjax.asgd(alpha=math.nan), "alpha", "nan"),
    (lambda: sgdjax.asgd(t0=-1.0), "t0", "-1.0"),
    (lambda: sgdjax.asgd(weight_decay=-1.0), "weight_decay", "-1.0"),
]


@pytest.mark.parametrize("make, argument, value", BAD, ids=[f"{a}={v}" for _, a, v in BAD])
def test_bad_arguments_name_argument_and_value(make, argument, value):
    with pytest.raises(ValueError) as raised:
        make()
    assert argument in str(raised.value) and value in str(raised.value)
