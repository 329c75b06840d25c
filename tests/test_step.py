"""sgdjax/training/_step.py: the pure train, multi-step and eval steps on tiny generated
batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import image_batch, train_state

import sgdjax
from sgdjax import data, training


def test_loss_decreases_on_a_fixed_batch():
    state = train_state(training.ConvNet(), tx=sgdjax.sgd(0.01, momentum=0.9))
    step = training.make_train_step()
    batch = image_batch(16)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_works_with_optax_and_reads_injected_learning_rate():
    tx = sgdjax.inject_hyperparams(optax.sgd)(learning_rate=0.03, momentum=0.9)
    state = train_state(training.ConvNet(), tx=tx)
    _, metrics = training.make_train_step()(state, image_batch())
    np.testing.assert_allclose(metrics["learning_rate"], 0.03, rtol=1e-6)
    schedule = sgdjax.schedules.exponential_decay(0.1, gamma=0.5)
    state = train_state(training.ConvNet(), tx=sgdjax.sgd(schedule))
    step = training.make_train_step(learning_rate_fn=schedule)
    for expected in (0.1, 0.05, 0.025):
        state, metrics = step(state, image_batch())
        np.testing.assert_allclose(metrics["learning_rate"], expected, rtol=1e-6)


def test_step_donates_the_old_state():
    state = train_state(training.ConvNet())
    old_kernel = jax.tree.leaves(state.params)[0]
    new_state, _ = training.make_train_step()(state, image_batch())
    assert old_kernel.is_deleted()
    assert not jax.tree.leaves(new_state.params)[0].is_deleted()


def test_batch_stats_move_in_training_and_not_in_evaluation():
    state = train_state(training.ConvNet())
    before = jax.tree.map(np.asarray, state.model_state)
    eval_step = training.make_eval_step()
    eval_step(state, image_batch())
    chex.assert_trees_all_equal(before, jax.tree.map(np.asarray, state.model_state))
    state, _ = training.make_train_step(donate=False)(state, image_batch())
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, state.model_state)
    assert all(jax.tree.leaves(changed))


def test_evaluate_handles_a_partial_last_batch():
    state = train_state(training.ConvNet())
    batch = image_batch(23)
    eval_step = training.make_eval_step()
    whole = training.evaluate(eval_step, state, batch["image"], batch["label"], batch_size=23)
    chunked = training.evaluate(eval_step, state, batch["image"], batch["label"], batch_size=10)
    np.testing.assert_allclose(chunked["loss"], whole["loss"], rtol=1e-5)
    assert chunked["accuracy"] == whole["accuracy"]


def test_bfloat16_compute_keeps_float32_params():
    state = train_state(training.ConvNet(dtype=jnp.bfloat16))
    state, metrics = training.make_train_step()(state, image_batch())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    chex.assert_tree_all_finite(metrics["loss"])


def test_cross_entropy_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    for smoothing in (0.0, 0.2):
        ours = training.cross_entropy(
            jnp.asarray(logits), jnp.asarray(labels), label_smoothing=smoothing
        )
        theirs = torch.nn.functional.cross_entropy(
            torch.tensor(logits), torch.tensor(labels), label_smoothing=smoothing
        )
        np.testing.assert_allclose(ours, theirs.item(), rtol=1e-6)


@pytest.mark.parametrize("unroll", [1, True])
def test_multi_step_scan_equals_single_steps(unroll):
    batches = [image_batch(8, seed=i) for i in range(3)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    single = training.make_train_step(augment_fn=data.augment)
    state_a = train_state(training.ConvNet())
    for batch in batches:
        state_a, metrics_a = single(state_a, batch)
    multi = training.make_multi_step(3, augment_fn=data.augment, unroll=unroll)
    state_b, metrics_b = multi(train_state(training.ConvNet()), stacked)
    chex.assert_trees_all_close(state_a.params, state_b.params, rtol=1e-5, atol=1e-6)
    assert metrics_b["loss"].shape == (3,)
    np.testing.assert_allclose(metrics_b["loss"][-1], metrics_a["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="stack 3 batches"):
        multi(train_state(training.ConvNet()), batches[0])


def test_flip_tta_averages_the_mirror_image():
    state = train_state(training.ConvNet())
    batch = image_batch(6)
    plain = training.make_eval_step(jit=False)
    tta = training.make_eval_step(tta="flip")
    mirrored = dict(batch, image=batch["image"][:, :, ::-1])
    both = tta(state, batch)
    # the averaged logits are symmetric in the flip: the mirrored batch scores the same
    np.testing.assert_allclose(tta(state, mirrored)["loss_sum"], both["loss_sum"], rtol=1e-5)
    assert float(plain(state, batch)["loss_sum"]) != float(both["loss_sum"])
