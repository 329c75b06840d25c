"""LARS, Lookahead, parameter averaging, diagnostics, ASGD, Muon and SWA against numpy,
optax and training."""

import functools
import json
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import mixed_tree

import sgdjax
from sgdjax import training
from sgdjax.parallel import DATA_AXIS

STEPS = 12


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _run(tx, params, steps=STEPS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for t in range(steps):
        updates, state = update(_grads(params, t), state, params)
        params = sgdjax.apply_updates(params, updates)
        history.append(params)
    return history, state


def test_lars_equals_optax_lars_with_masks():
    params = mixed_tree()
    options = dict(weight_decay=1e-3, trust_coefficient=0.01, momentum=0.9)
    ours, _ = _run(
        sgdjax.lars(
            0.5,
            weight_decay_mask=sgdjax.exclude_bias_and_norm,
            trust_ratio_mask=sgdjax.exclude_bias_and_norm,
            **options,
        ),
        params,
    )
    theirs, _ = _run(
        optax.lars(
            0.5,
            weight_decay_mask=sgdjax.exclude_bias_and_norm,
            trust_ratio_mask=sgdjax.exclude_bias_and_norm,
            **options,
        ),
        params,
    )
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_trust_ratio_against_numpy():
    params = mixed_tree()
    grads = _grads(params, 0)
    tx = sgdjax.scale_by_trust_ratio(0.02, eps=1e-3)
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, g, p in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(params)):
        g64, p64 = np.asarray(g, np.float64), np.asarray(p, np.float64)
        ratio = 0.02 * np.linalg.norm(p64) / (np.linalg.norm(g64) + 1e-3)
        np.testing.assert_allclose(u, ratio * g64, rtol=1e-5, atol=1e-7)


def test_lookahead_against_numpy():
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    k, alpha, lr = 3, 0.5, 0.1
    history, state = _run(sgdjax.lookahead(sgdjax.sgd(lr), sync_period=k, slow_step_size=alpha),
                          params, steps=10)  # fmt: skip
    fast = np.asarray(params["w"], np.float64)
    slow = fast.copy()
    for t in range(10):
        fast = fast - lr * np.asarray(_grads(params, t)["w"], np.float64)
        if (t + 1) % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.copy()
        np.testing.assert_allclose(history[t]["w"], fast, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.slow_params["w"], slow, rtol=1e-5, atol=1e-6)


def test_ema_covers_params_and_batch_stats_against_numpy():
    tree = {"params": {"w": jnp.ones(3)}, "batch_stats": {"mean": jnp.zeros(2)}}
    state = sgdjax.ema_init(tree)
    reference = jax.tree.map(lambda x: np.zeros(x.shape), tree)
    for t in range(5):
        new = jax.tree.map(lambda x, t=t: x + t, tree)
        state = jax.jit(sgdjax.ema_update, static_argnums=2)(state, new, 0.8)
        reference = jax.tree.map(lambda a, x: 0.8 * a + 0.2 * np.asarray(x), reference, new)
    chex.assert_trees_all_close(state.average, reference, rtol=1e-6)
    debiased = sgdjax.ema_value(state, 0.8)
    chex.assert_trees_all_close(
        debiased, jax.tree.map(lambda a: a / (1 - 0.8**5), reference), rtol=1e-5
    )


def test_diagnostics_against_numpy():
    params = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([[1.0, 2.0], [2.0, 4.0]])}
    grads = {"a": jnp.asarray([0.0, 10.0]), "b": jnp.asarray([[0.0, 0.0], [0.0, 1.0]])}
    tx = sgdjax.diagnostics(sgdjax.chain(sgdjax.clip_by_global_norm(5.0), sgdjax.sgd(0.1)),
                            clip_threshold=5.0)  # fmt: skip
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    metrics = sgdjax.diagnostics_metrics(state)
    g = np.sqrt(100.0 + 1.0)
    u = 0.1 * 5.0  # clipped to norm 5, times lr
    np.testing.assert_allclose(metrics["grad_norm"], g, rtol=1e-6)
    np.testing.assert_allclose(metrics["update_norm"], u, rtol=1e-5)
    np.testing.assert_allclose(metrics["effective_learning_rate"], u / g, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm/a"], 10.0)
    np.testing.assert_allclose(metrics["update_ratio/b"], 0.1 * 5 / g * 1.0 / 5.0, rtol=1e-5)
    assert float(metrics["clipped_fraction"]) == 1.0
    _, state = jax.jit(tx.update)(jax.tree.map(lambda x: x * 0.01, grads), state, params)
    assert float(sgdjax.diagnostics_metrics(state)["clipped_fraction"]) == 0.5


def test_schedule_free_against_numpy_and_optax():
    params = mixed_tree()
    ours, state = _run(sgdjax.schedule_free_sgd(0.05, b1=0.8), params)
    theirs, their_state = _run(optax.contrib.schedule_free_sgd(0.05, b1=0.8), params)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        sgdjax.schedule_free_eval_params(state),
        optax.contrib.schedule_free_eval_params(their_state, theirs[-1]),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    # The paper's recursion in float64, with a warm-up schedule (weights (max lr)^2).
    leaves = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
    y, z, x = list(leaves), list(leaves), list(leaves)
    schedule = sgdjax.schedules.linear(0.05, start_factor=0.2, total_iters=4)
    history, state = _run(sgdjax.schedule_free_sgd(schedule, b1=0.8), params)
    weight_sum, max_lr = 0.0, 0.0
    for t in range(STEPS):
        grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(_grads(params, t))]
        lr = float(schedule(t))
        max_lr = max(max_lr, lr)
        weight_sum += max_lr**2
        c = max_lr**2 / weight_sum
        z = [zi - lr * g for zi, g in zip(z, grads)]
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z)]
        y = [0.8 * xi + 0.2 * zi for xi, zi in zip(x, z)]
        chex.assert_trees_all_close(jax.tree.leaves(history[t]), y, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(
        jax.tree.leaves(sgdjax.schedule_free_eval_params(state)), x, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: sgdjax.schedule_free_sgd(0.02),
        lambda: sgdjax.lars(1.0, weight_decay=1e-4,
                            weight_decay_mask=sgdjax.exclude_bias_and_norm,
                            trust_ratio_mask=sgdjax.exclude_bias_and_norm),
        lambda: sgdjax.lookahead(sgdjax.sgd(0.02, momentum=0.9), sync_period=3),
        lambda: sgdjax.diagnostics(sgdjax.sgd(0.02, momentum=0.9)),
    ],
    ids=["schedule_free", "lars", "lookahead", "diagnostics"],
)  # fmt: skip
def test_variant_trains_the_convnet_without_nan(make):
    state = training.TrainState.create(
        model=training.ConvNet(), tx=make(), rng=jax.random.key(0),
        sample_input=jnp.zeros((1, 32, 32, 3)),
    )  # fmt: skip
    step = training.make_train_step()
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, 16).astype(np.int32)}  # fmt: skip
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    chex.assert_tree_all_finite(state.params)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: sgdjax.scale_by_trust_ratio(0.0), "trust_coefficient"),
        (lambda: sgdjax.lookahead(sgdjax.sgd(0.1), sync_period=0), "sync_period"),
        (lambda: sgdjax.lookahead(sgdjax.sgd(0.1), slow_step_size=1.5), "slow_step_size"),
        (lambda: sgdjax.diagnostics(sgdjax.sgd(0.1), clip_threshold=-1.0), "clip_threshold"),
        (lambda: sgdjax.ema_update(sgdjax.ema_init(jnp.ones(1)), jnp.ones(1), 1.0), "decay"),
    ],
)
def test_bad_arguments(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_sam_step_uses_the_gradient_at_the_perturbed_point():
    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 4, 4, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}  # fmt: skip
    state = training.TrainState.create(
        model=Linear(), tx=sgdjax.sgd(0.1), rng=jax.random.key(0),
        sample_input=jnp.zeros((1, 4, 4, 3)),
    )  # fmt: skip

    def loss(params):
        logits = state.apply_fn({"params": params}, batch["image"], train=True)
        return training.cross_entropy(logits, batch["label"])

    g = jax.grad(loss)(state.params)
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda p, gi: p + 0.05 * gi / norm, state.params, g)
    expected = jax.tree.map(lambda p, gi: p - 0.1 * gi, state.params, jax.grad(loss)(perturbed))
    new_state, _ = training.make_train_step(sam_rho=0.05, donate=False)(state, batch)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)


def _convnet_batch(size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, size).astype(np.int32)}  # fmt: skip


def test_ema_step_averages_params_and_batch_stats_against_numpy():
    decay = 0.7
    state = training.TrainState.create(
        model=training.ConvNet(), tx=sgdjax.sgd(0.05, momentum=0.9), rng=jax.random.key(0),
        sample_input=jnp.zeros((1, 32, 32, 3)), ema=True,
    )  # fmt: skip
    step = training.make_train_step(ema_decay=decay, donate=False)
    plain = training.make_train_step(donate=False)
    reference = jax.tree.map(
        lambda x: np.zeros(x.shape, np.float64), {"params": state.params, **state.model_state}
    )
    for t in range(4):
        batch = _convnet_batch(seed=t)
        expected_state, _ = plain(state, batch)
        state, _ = step(state, batch)
        # The average does not change the trajectory itself.
        chex.assert_trees_all_close(state.params, expected_state.params, rtol=1e-6, atol=1e-7)
        current = {"params": state.params, **state.model_state}
        reference = jax.tree.map(
            lambda a, x: decay * a + (1 - decay) * np.asarray(x, np.float64), reference, current
        )
    assert int(state.ema.count) == 4
    chex.assert_trees_all_close(state.ema.average, reference, rtol=1e-5, atol=1e-7)
    averaged = state.averaged(decay)
    debiased = jax.tree.map(lambda a: a / (1 - decay**4), reference)
    chex.assert_trees_all_close(averaged.params, debiased["params"], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        averaged.model_state["batch_stats"], debiased["batch_stats"], rtol=1e-5, atol=1e-7
    )
    # The averaged state evaluates like any other.
    sums = training.make_eval_step()(averaged, _convnet_batch(seed=9))
    assert np.isfinite(float(sums["loss_sum"]))


def test_ema_needs_a_state_that_keeps_one():
    state = training.TrainState.create(
        model=training.ConvNet(), tx=sgdjax.sgd(0.05), rng=jax.random.key(0),
        sample_input=jnp.zeros((1, 32, 32, 3)),
    )  # fmt: skip
    with pytest.raises(ValueError, match="ema=True"):
        training.make_train_step(ema_decay=0.9)(state, _convnet_batch())
    with pytest.raises(ValueError, match="ema=True"):
        state.averaged(0.9)
    with pytest.raises(ValueError, match="ema_decay"):
        training.make_train_step(ema_decay=1.0)


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_ema_under_data_parallelism_equals_one_device(mode):
    def fresh(bn_axis_name=None):
        return training.TrainState.create(
            model=training.ConvNet(bn_axis_name=bn_axis_name), tx=sgdjax.sgd(0.05, momentum=0.9),
            rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3)), ema=True,
        )  # fmt: skip

    single = fresh()
    step = training.make_train_step(ema_decay=0.8, donate=False)
    parallel = training.make_parallel_train_step(mode, num_devices=8, ema_decay=0.8)
    placed = parallel.place_state(fresh(DATA_AXIS if training.needs_bn_axis(mode) else None))
    for t in range(3):
        batch = _convnet_batch(size=32, seed=t)
        single, _ = step(single, batch)
        placed, _ = parallel.step(placed, parallel.place_batch(batch))
    gathered = parallel.gather_state(placed)
    chex.assert_trees_all_close(gathered.ema.average, single.ema.average, rtol=1e-5, atol=1e-6)
    assert int(gathered.ema.count) == 3


# ---------------------------------------------------------------- ASGD, Muon and SWA in the engine


def _tiny_dataset(train=80, test=20):
    from sgdjax import data

    rng = np.random.default_rng(0)
    return data.Dataset(
        rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, train).astype(np.int32),
        rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, test).astype(np.int32),
        tuple(f"class{i}" for i in range(10)),
    )


# No augmentation, so a hand-written loop sees the engine's batches.
PLAIN = dict(widths=(4, 8), flip="none", crop_padding=0, tensorboard=False, steps_per_call=1)


def _raw_checkpoint(workdir, like, step):
    """The raw arrays of the checkpoint of ``step`` in ``workdir``."""
    checkpoints = training.Checkpointer(workdir / "checkpoints")
    try:
        return checkpoints.restore_tree(step, like)[0]
    finally:
        checkpoints.close()


def _checkpoint(workdir, like, step):
    """The :class:`TrainState` of the checkpoint of ``step`` in ``workdir``."""
    from sgdjax.training._checkpoint import _from_tree

    return _from_tree(_raw_checkpoint(workdir, like, step), like)[0]


def _scored_loss(state, dataset):
    """Mean test loss of ``state`` over the whole test set, by the public eval step."""
    sums = training.make_eval_step()(state, {"image": dataset.test_images,
                                             "label": dataset.test_labels})  # fmt: skip
    return float(sums["loss_sum"]) / float(sums["count"])


def _with_recomputed_stats(state, params, images, batch_size, widths=(4, 8)):
    model = training.ConvNet(widths=widths)
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    stats = training.recompute_batch_stats(
        model, {"params": params, **state.model_state}, batches,
        preprocess=training.default_preprocess,
    )  # fmt: skip
    return state.replace(params=params, model_state={"batch_stats": stats})


def test_engine_asgd_equals_a_hand_written_loop_and_scores_the_average(tmp_path):
    """Full-batch steps (the order within a batch changes no sum but its rounding), a
    constant rate: the engine's ASGD is sgdjax.asgd with t0 = asgd_start x steps, and
    its score is the average with BatchNorm statistics recomputed."""
    dataset = _tiny_dataset(train=32)
    config = training.Config(optimizer="asgd", learning_rate=0.05, schedule="constant",
                             asgd_lambd=1e-3, asgd_alpha=0.5, asgd_start=0.5,
                             batch_size=32, epochs=6, weight_decay=1e-3, **PLAIN)  # fmt: skip
    engine = training.Engine(config, dataset, log=lambda message: None)
    summary = engine.run(0, tmp_path, progress=False)
    final = _checkpoint(tmp_path, engine._initial_state(0), 6)

    tx = sgdjax.asgd(0.05, lambd=1e-3, alpha=0.5, t0=3, weight_decay=1e-3)  # t0 = 0.5 x 6
    state = training.TrainState.create(
        model=training.ConvNet(widths=(4, 8)), tx=tx, rng=jax.random.key(0),
        sample_input=jnp.zeros((1, 32, 32, 3)),
    )  # fmt: skip
    step = training.make_train_step(donate=False)
    batch = {"image": dataset.train_images, "label": dataset.train_labels}
    for _ in range(6):
        state, _ = step(state, batch)
    chex.assert_trees_all_close(final.params, state.params, rtol=2e-5, atol=2e-6)
    averaged = sgdjax.asgd_averaged_params(state.opt_state)
    chex.assert_trees_all_close(
        sgdjax.asgd_averaged_params(final.opt_state), averaged, rtol=2e-5, atol=2e-6
    )
    assert not np.allclose(averaged["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])
    scored = _with_recomputed_stats(state, averaged, dataset.train_images, 32)
    np.testing.assert_allclose(summary["test_loss"], _scored_loss(scored, dataset), rtol=1e-4)


def test_muon_takes_the_kernels_and_nesterov_sgd_the_rest():
    config = training.Config(optimizer="muon", learning_rate=0.03, muon_learning_rate=0.2,
                             muon_momentum=0.9, muon_weight_decay=0.01, momentum=0.8,
                             weight_decay=1e-3, schedule="constant", widths=(4, 8))  # fmt: skip
    tx, _ = training.make_optimizer(config, steps_per_epoch=10)
    params = training.ConvNet(widths=(4, 8)).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
    )["params"]
    muon_state = sgdjax._base.find_state(tx.init(params), sgdjax.MuonState)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    got_muon = {
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            muon_state.momentum_buffer, is_leaf=is_masked
        )
        if not is_masked(leaf)
    }
    assert got_muon == {"['Conv_0']['kernel']", "['Conv_1']['kernel']", "['Dense_0']['kernel']"}
    # One update against the two optimizers applied to their halves by hand.
    grads = _grads(params, 3)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        leaf = lambda tree, path=path: functools.reduce(lambda t, k: t[k.key], path, tree)  # noqa: E731
        p, g = leaf(params), leaf(grads)
        if name in got_muon:
            alone = sgdjax.muon(0.2, weight_decay=0.01, momentum=0.9, matrix_layout="in_out")
        else:
            alone = sgdjax.sgd(0.03, momentum=0.8, nesterov=True, weight_decay=1e-3)
        expected, _ = alone.update(g, alone.init(p), p)
        np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_engine_swa_scores_the_mean_of_the_epoch_ends_after_swa_start(tmp_path):
    """80 images, batch 16: 5 steps an epoch; swa_start 0.5 of 4 epochs averages the
    weights after epochs 3 and 4 (steps 15 and 20), with the rate annealed to swa_lr
    over epoch 3 and held in epoch 4."""
    dataset = _tiny_dataset()
    config = training.Config(swa_start=0.5, swa_lr=0.004, swa_anneal_epochs=1.0,
                             batch_size=16, epochs=4, **PLAIN)  # fmt: skip
    engine = training.Engine(config, dataset, log=lambda message: None)
    summary = engine.run(0, tmp_path, progress=False)
    like = engine._initial_state(0)
    at_15, at_20 = (_checkpoint(tmp_path, like, step) for step in (15, 20))
    mean = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + b) / 2, at_15.params,
                        at_20.params)  # fmt: skip
    swa = sgdjax._base.find_state(at_20.opt_state, training.SwaEpochState).swa
    assert int(swa.count) == 2
    chex.assert_trees_all_close(sgdjax.swa_value(swa), mean, rtol=1e-6, atol=1e-7)
    scored = engine.scored_state(at_20)
    chex.assert_trees_all_close(scored.params, mean, rtol=1e-6, atol=1e-7)
    expected = _with_recomputed_stats(at_20, sgdjax.swa_value(swa), dataset.train_images, 16)
    chex.assert_trees_all_close(
        scored.model_state["batch_stats"], expected.model_state["batch_stats"],
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert not np.allclose(expected.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                           at_20.model_state["batch_stats"]["BatchNorm_0"]["mean"])  # fmt: skip
    np.testing.assert_allclose(summary["test_loss"], _scored_loss(expected, dataset), rtol=1e-4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The rate of each epoch's last step: SWALR from the schedule's rate at step 10,
    # 4 of its 5 steps into the anneal at step 15, then swa_lr held.
    anneal = sgdjax.schedules.swa_lr(float(training.make_schedule(config, 20)(10)), 0.004, 5)
    np.testing.assert_allclose(rows[2]["learning_rate"], anneal(4), rtol=1e-6)
    np.testing.assert_allclose(rows[3]["learning_rate"], 0.004, rtol=1e-6)
    # Before swa_start the weights themselves are scored (no average yet).
    at_10 = _checkpoint(tmp_path, like, 10)
    assert engine.scored_state(at_10) is at_10


@pytest.mark.parametrize(
    "options",
    [dict(optimizer="asgd", asgd_start=0.3), dict(swa_start=0.25),
     dict(optimizer="muon", muon_learning_rate=0.05)],
    ids=["asgd", "swa", "muon"],
)  # fmt: skip
def test_a_resumed_averaging_run_ends_bit_identical(tmp_path, options):
    """Stopped after step 7 of 12 (inside epoch 3: after ASGD's t0 = 3 and SWA's first
    average at step 6) and resumed: the same final state, averages included, and the
    same score."""
    from sgdjax.training import Preempted

    dataset = _tiny_dataset(train=48)
    config = training.Config(batch_size=16, epochs=4, checkpoint_every_steps=7, **PLAIN,
                             **options)  # fmt: skip
    engine = training.Engine(config, dataset, log=lambda message: None)
    reference = engine.run(0, tmp_path / "whole", progress=False)
    original = engine._train_programs[1]
    calls = []

    def signalling(*args):
        calls.append(1)
        if len(calls) == 7:
            signal.raise_signal(signal.SIGTERM)
        return original(*args)

    engine._train_programs[1] = signalling
    try:
        with pytest.raises(Preempted):
            engine.run(0, tmp_path / "stopped", progress=False)
    finally:
        engine._train_programs[1] = original
    resumed = engine.run(0, tmp_path / "stopped", resume=True, progress=False)
    like = engine._initial_state(0)
    chex.assert_trees_all_equal(
        _raw_checkpoint(tmp_path / "stopped", like, 12),
        _raw_checkpoint(tmp_path / "whole", like, 12),
    )
    assert resumed["test_loss"] == reference["test_loss"]


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(optimizer="asgd", asgd_start=1.0), "asgd_start"),
        (dict(optimizer="asgd", asgd_lambd=-1e-4), "asgd_lambd"),
        (dict(optimizer="asgd", asgd_alpha=-0.5), "asgd_alpha"),
        (dict(optimizer="asgd", api="nnx"), "optimizer"),
        (dict(optimizer="muon", muon_learning_rate=0.0), "muon_learning_rate"),
        (dict(optimizer="muon", muon_momentum=1.0), "muon_momentum"),
        (dict(optimizer="muon", muon_weight_decay=-0.1), "muon_weight_decay"),
        (dict(optimizer="muon", momentum=0.0), "nesterov"),
        (dict(optimizer="muon", bias_scaler=2.0), "optimizer"),
        (dict(swa_start=0.0), "swa_start"),
        (dict(swa_start=1.0), "swa_start"),
        (dict(swa_start=0.9, epochs=5), "swa_start"),  # ceil(4.5) = 5: no epoch after it
        (dict(swa_start=0.5, swa_lr=0.0), "swa_lr"),
        (dict(swa_start=0.5, swa_anneal_epochs=-1.0), "swa_anneal_epochs"),
        (dict(swa_start=0.5, ema_decay=0.9), "swa_start"),
        (dict(swa_start=0.5, lookahead_period=5), "swa_start"),
        (dict(swa_start=0.5, optimizer="schedule_free"), "swa_start"),
        (dict(swa_start=0.5, optimizer="asgd"), "swa_start"),
        (dict(swa_start=0.5, api="nnx"), "swa_start"),
    ],
)
def test_bad_averaging_and_muon_settings_are_rejected(options, field):
    with pytest.raises(training.ConfigError) as raised:
        training.Config(**options)
    assert raised.value.field == field


def test_swa_every_epoch_checks_its_arguments():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        training.swa_every_epoch(0, 0, 10)
    with pytest.raises(ValueError, match="start_step"):
        training.swa_every_epoch(5, -1, 10)


@pytest.mark.parametrize(
    "options", [dict(optimizer="asgd", asgd_start=0.3), dict(swa_start=0.25)], ids=["asgd", "swa"]
)
def test_averaged_scores_sharded_over_8_devices_equal_one_device(tmp_path, options):
    dataset = _tiny_dataset(train=48)
    scores = {}
    for parallel in ("none", "sharded"):
        config = training.Config(batch_size=16, epochs=4, parallel=parallel, **PLAIN, **options)
        engine = training.Engine(config, dataset, log=lambda message: None)
        scores[parallel] = engine.run(0, tmp_path / parallel, progress=False)["test_loss"]
    np.testing.assert_allclose(scores["sharded"], scores["none"], rtol=1e-4)
