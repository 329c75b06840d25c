"""Regression tests for defects found by running sgdjax the way its users run it.

Each test reproduces one defect that cuts across modules: building factories inside
transformed functions, complex parameters, extra arguments and reading the step count.
The defects of one module are tested with that module (``inject_hyperparams``'s
``static_args`` in test_combine.py, an overflowing update in test_skip.py,
``clip_by_global_norm``'s ``norm_type`` in test_clipping.py).
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import complex_quadratic, minimise, mixed_tree

import sgdjax
from sgdjax import schedules


def _complex_tree(seed=0):
    return mixed_tree(jnp.complex64, seed=seed)


def _numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.complex128), tree)


# ---------------------------------------------------------------- factories inside jit


def test_nesterov_momentum_builds_inside_jit():
    params = {"w": jnp.ones(3)}
    state = jax.jit(lambda p: sgdjax.momentum(0.9, nesterov=True).init(p))(params)
    chex.assert_trees_all_equal(state.momentum_buffer, {"w": jnp.zeros(3)})

    def step(p):
        tx = sgdjax.sgd(0.1, momentum=0.9, nesterov=True)
        return tx.update(p, tx.init(p), p)[0]

    # u = -0.1 * (g + 0.9 * g) = -0.19 for g = 1
    chex.assert_trees_all_close(jax.jit(step)(params), {"w": jnp.full(3, -0.19)})


def test_nesterov_still_rejects_dampening_and_zero_momentum_inside_jit():
    with pytest.raises(ValueError, match="dampening=0"):
        jax.jit(lambda p: sgdjax.momentum(0.9, dampening=0.5, nesterov=True).init(p))(jnp.ones(2))
    with pytest.raises(ValueError, match="momentum > 0"):
        jax.jit(lambda p: sgdjax.sgd(0.1, nesterov=True).init(p))(jnp.ones(2))


# Every public schedule factory of sgdjax.schedules, built from constants.
SCHEDULES = {
    "chained": lambda: schedules.chained(
        0.1, [schedules.step_decay(0.1, 2), schedules.exponential_decay(0.1, 0.9)]
    ),
    "constant": lambda: schedules.constant(0.1),
    "constant_factor": lambda: schedules.constant_factor(0.1),
    "cosine_annealing": lambda: schedules.cosine_annealing(0.1, 5),
    "cosine_warm_restarts": lambda: schedules.cosine_warm_restarts(0.1, 3, t_mult=2),
    "cyclic": lambda: schedules.cyclic(0.01, 0.1, 2, mode="exp_range", gamma=0.9),
    "cyclic_momentum": lambda: schedules.cyclic_momentum(2),
    "exponential_decay": lambda: schedules.exponential_decay(0.1, 0.9),
    "join": lambda: schedules.join(
        [schedules.constant(0.1), schedules.cosine_annealing(0.1, 4)], [3]
    ),
    "lambda_factor": lambda: schedules.lambda_factor(0.1, lambda c: 0.9**c),
    "linear": lambda: schedules.linear(0.1),
    "multiplicative": lambda: schedules.multiplicative(0.1, lambda c: 0.9, 10),
    "multistep_decay": lambda: schedules.multistep_decay(0.1, [2, 5]),
    "one_cycle": lambda: schedules.one_cycle(0.1, 10),
    "one_cycle_momentum": lambda: schedules.one_cycle_momentum(10),
    "polynomial": lambda: schedules.polynomial(0.1),
    "step_decay": lambda: schedules.step_decay(0.1, 2),
    "swa_lr": lambda: schedules.swa_lr(0.1, 0.05, 3),
    "warmup": lambda: schedules.warmup(schedules.cosine_annealing(0.1, 5), 2),
}


def test_every_public_schedule_is_checked_inside_jit():
    public = {
        name
        for name, value in vars(schedules).items()
        if inspect.isfunction(value)
        and not name.startswith("_")
        and value.__module__ == schedules.__name__
        and "Schedule" in str(inspect.signature(value).return_annotation)
    }
    assert {"one_cycle", "cyclic", "warmup"} <= public
    assert public == set(SCHEDULES), sorted(public ^ set(SCHEDULES))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_builds_inside_jit_vmap_and_grad(name):
    counts = jnp.arange(8)
    eager = np.asarray([float(SCHEDULES[name]()(int(c))) for c in counts])
    batched = jax.vmap(lambda c: SCHEDULES[name]()(c))(counts)
    np.testing.assert_allclose(batched, eager, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda c: SCHEDULES[name]()(c))(counts[5]), eager[5])
    slope = jax.grad(lambda x: x * SCHEDULES[name]()(3))(1.0)
    np.testing.assert_allclose(slope, eager[3], rtol=1e-6)


def test_reduce_on_plateau_builds_inside_jit():
    def run(metric):
        plateau = schedules.reduce_on_plateau(0.1, patience=0)
        state = plateau.update(plateau.update(plateau.init(), metric), metric + 1.0)
        return plateau.value(state)

    np.testing.assert_allclose(jax.jit(run)(1.0), run(1.0))
    np.testing.assert_allclose(run(1.0), 0.01, rtol=1e-6)  # one bad epoch, patience 0


# ---------------------------------------------------------------- complex parameters


def test_global_norm_of_complex_values_is_real_and_equals_optax():
    tree = _complex_tree()
    ours = sgdjax.global_norm(tree)
    assert ours.dtype == jnp.float32
    expected = np.sqrt(sum(np.sum(np.abs(x) ** 2) for x in jax.tree.leaves(_numpy(tree))))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    np.testing.assert_allclose(ours, optax.global_norm(tree), rtol=1e-6)


def test_clip_by_norm_of_complex_values_against_numpy():
    tree = _complex_tree()
    updates, _ = sgdjax.clip_by_norm(0.5).update(tree, optax.EmptyState())
    for got, x in zip(jax.tree.leaves(updates), jax.tree.leaves(_numpy(tree))):
        norm = np.sqrt(np.sum(np.abs(x) ** 2))
        expected = x if norm < 0.5 else x * 0.5 / norm
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (sgdjax.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
        (sgdjax.adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)),
        (sgdjax.sgd(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
        (sgdjax.sgd(0.1, momentum=0.9, nesterov=True), optax.sgd(0.1, 0.9, nesterov=True)),
        (sgdjax.add_decayed_weights(0.1), optax.add_decayed_weights(0.1)),
        (sgdjax.lars(0.5, weight_decay=1e-3), optax.lars(0.5, weight_decay=1e-3)),
        (
            sgdjax.schedule_free_sgd(0.1, weight_decay=1e-3),
            optax.contrib.schedule_free_sgd(0.1, weight_decay=1e-3),
        ),
    ],
    ids=["clip_by_global_norm", "adaptive_grad_clip", "sgd", "nesterov", "decay", "lars", "sf"],
)
def test_complex_updates_equal_optax(ours, theirs):
    # Leaves optax's adaptive_grad_clip treats like sgdjax's (vectors, kernels, conv).
    params = {k: v for k, v in _complex_tree().items() if k in ("bias", "dense", "conv")}
    results = []
    for tx in (ours, theirs):
        p, state = params, tx.init(params)
        update = jax.jit(tx.update)
        for seed in range(4):
            grads = {k: v for k, v in _complex_tree(seed + 1).items() if k in params}
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results.append(p)
    chex.assert_trees_all_close(*results, rtol=2e-5, atol=2e-6)


def test_lars_converges_on_a_complex_problem():
    problem = complex_quadratic()
    learning_rate = sgdjax.schedules.cosine_annealing(0.5, t_max=600)
    params = minimise(sgdjax.lars(learning_rate, trust_coefficient=0.1), problem, 600)
    assert problem.solved(params), params


def test_diagnostics_norms_of_complex_values_against_numpy():
    params = _complex_tree()
    grads = _complex_tree(1)
    tx = sgdjax.diagnostics(sgdjax.sgd(0.1))
    _, state = tx.update(grads, tx.init(params), params)
    metrics = sgdjax.diagnostics_metrics(state)
    norm = lambda tree: np.sqrt(sum(np.sum(np.abs(x) ** 2) for x in jax.tree.leaves(tree)))  # noqa: E731
    np.testing.assert_allclose(metrics["grad_norm"], norm(_numpy(grads)), rtol=1e-6)
    np.testing.assert_allclose(metrics["param_norm"], norm(_numpy(params)), rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm/dense"], norm(_numpy(grads["dense"])), rtol=1e-6)
    np.testing.assert_allclose(metrics["update_norm"], 0.1 * norm(_numpy(grads)), rtol=1e-6)


def test_ema_and_lookahead_keep_the_imaginary_part():
    tree = _complex_tree()
    state = sgdjax.ema_update(sgdjax.ema_init(tree), tree, 0.9)
    chex.assert_trees_all_close(sgdjax.ema_value(state, 0.9), tree, rtol=1e-6)
    tx = sgdjax.lookahead(sgdjax.sgd(0.1), sync_period=1, slow_step_size=0.5)
    updates, _ = tx.update(tree, tx.init(tree), tree)  # phi + 0.5 (theta - 0.1 g - phi) - theta
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.05 * g, tree), rtol=1e-5)


def test_clip_by_value_rejects_complex_updates_with_a_clear_error():
    with pytest.raises(ValueError, match="complex64"):
        sgdjax.clip(1.0).update(_complex_tree(), optax.EmptyState())


def test_real_momentum_buffer_for_complex_params_is_rejected():
    with pytest.raises(ValueError, match="accumulator_dtype"):
        sgdjax.momentum(0.9, accumulator_dtype=jnp.bfloat16).init(_complex_tree())


# ---------------------------------------------------------------- extra arguments


def _plateau_run(tx, steps=6):
    """Runs ``tx`` passing ``value=`` the loss, as a chain with reduce_on_plateau needs."""
    params = {"w": jnp.ones(3)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2))(params)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(
    "make",
    [
        lambda plateau: sgdjax.chain(sgdjax.schedule_free_sgd(0.1), plateau),
        lambda plateau: sgdjax.lookahead(sgdjax.chain(sgdjax.sgd(0.1), plateau)),
        lambda plateau: sgdjax.skip_non_finite(sgdjax.chain(sgdjax.sgd(0.1), plateau)),
        lambda plateau: sgdjax.diagnostics(sgdjax.chain(sgdjax.sgd(0.1), plateau)),
        lambda plateau: sgdjax.flatten(sgdjax.chain(sgdjax.sgd(0.1), plateau)),
    ],
    ids=["schedule_free_sgd", "lookahead", "skip_non_finite", "diagnostics", "flatten"],
)
def test_extra_arguments_reach_reduce_on_plateau(make):
    def plateau():
        return optax.contrib.reduce_on_plateau(patience=1, factor=0.5, min_scale=1e-3)

    tx = make(plateau())
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    reference = optax.chain(optax.sgd(0.1), plateau())
    params = {"w": jnp.ones(3)}
    state, reference_state = tx.init(params), reference.init(params)
    for loss in (1.0, 2.0, 3.0, 4.0, 5.0):
        value = jnp.asarray(loss)
        _, state = tx.update(params, state, params, value=value)
        _, reference_state = reference.update(params, reference_state, params, value=value)
    scale = optax.tree_utils.tree_get(state, "scale")
    np.testing.assert_allclose(scale, optax.tree_utils.tree_get(reference_state, "scale"))
    assert float(scale) < 1.0  # the rising losses reached the plateau logic
    _plateau_run(tx)  # and jitted, inside a training loop


def test_every_sgdjax_leaf_transform_ignores_extra_arguments():
    params = {"w": jnp.ones(3)}
    for tx in (
        sgdjax.schedule_free_sgd(0.1),
        sgdjax.lookahead(sgdjax.sgd(0.1)),
        sgdjax.momentum(0.9),
        sgdjax.scale_by_learning_rate(0.1),
        sgdjax.clip_by_global_norm(1.0),
    ):
        plain, _ = tx.update(params, tx.init(params), params)
        extra, _ = tx.update(params, tx.init(params), params, value=jnp.asarray(1.0))
        chex.assert_trees_all_equal(plain, extra)


# ---------------------------------------------------------------- the step count


@pytest.mark.parametrize(
    "make",
    [
        lambda: sgdjax.sgd(0.1),
        lambda: sgdjax.sgd(0.1, momentum=0.9),
        lambda: sgdjax.sgd(sgdjax.schedules.step_decay(0.1, 2), momentum=0.9, dampening=0.1),
        lambda: sgdjax.sgdw(0.1, momentum=0.9, weight_decay=1e-2),
        lambda: sgdjax.lars(0.1),
        lambda: sgdjax.skip_non_finite(sgdjax.sgd(0.1, momentum=0.9)),
        lambda: sgdjax.chain(sgdjax.clip_by_global_norm(1.0), sgdjax.sgd(0.1, momentum=0.9)),
    ],
    ids=["sgd", "momentum", "schedule", "sgdw", "lars", "skip_non_finite", "chain"],
)
def test_the_step_is_read_as_documented(make):
    tx = make()
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update({"w": jnp.ones(2)}, state, params)
    lr_state = optax.tree_utils.tree_get(state, "ScaleByLearningRateState")
    assert int(lr_state.count) == 3
    # every counter in the state counts the same steps
    counts = optax.tree_utils.tree_get_all_with_path(state, "count")
    assert counts and all(int(count) == 3 for _, count in counts)
