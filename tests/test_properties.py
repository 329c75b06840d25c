"""A property sweep over every public transform: dtypes, shapes, finiteness, stable state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import mixed_tree

import sgdjax
from sgdjax import schedules


def _conv_and_dense(params):
    return {k: k in ("dense", "conv") for k in params}


def _labels(params):
    return {k: ("big" if k in ("dense", "conv") else "small") for k in params}


# name -> factory of a transform; every public transform factory appears here.
TRANSFORMS = {
    "scale": lambda: sgdjax.scale(0.5),
    "scale_by_learning_rate": lambda: sgdjax.scale_by_learning_rate(0.1),
    "scale_by_learning_rate_schedule": lambda: sgdjax.scale_by_learning_rate(
        schedules.cosine_annealing(0.1, t_max=5)
    ),
    "momentum": lambda: sgdjax.momentum(0.9),
    "momentum_nesterov": lambda: sgdjax.momentum(0.9, nesterov=True),
    "momentum_dampened": lambda: sgdjax.momentum(0.9, dampening=0.3),
    "momentum_bfloat16_buffer": lambda: sgdjax.momentum(0.9, accumulator_dtype=jnp.bfloat16),
    "clip": lambda: sgdjax.clip(0.1),
    "clip_by_norm": lambda: sgdjax.clip_by_norm(0.5),
    "clip_by_global_norm": lambda: sgdjax.clip_by_global_norm(0.5),
    "adaptive_grad_clip": lambda: sgdjax.adaptive_grad_clip(0.01),
    "add_decayed_weights": lambda: sgdjax.add_decayed_weights(1e-2),
    "add_decayed_weights_masked": lambda: sgdjax.add_decayed_weights(1e-2, mask=_conv_and_dense),
    "decoupled_weight_decay": lambda: sgdjax.decoupled_weight_decay(1e-2, 0.1),
    "skip_non_finite": lambda: sgdjax.skip_non_finite(sgdjax.sgd(0.1, momentum=0.9)),
    "chain": lambda: sgdjax.chain(sgdjax.clip_by_global_norm(1.0), sgdjax.sgd(0.1)),
    "named_chain": lambda: sgdjax.named_chain(
        ("momentum", sgdjax.momentum(0.9)), ("lr", sgdjax.scale_by_learning_rate(0.1))
    ),
    "masked": lambda: sgdjax.masked(sgdjax.momentum(0.9), _conv_and_dense),
    "multi_transform": lambda: sgdjax.multi_transform(
        {"big": sgdjax.sgd(0.1, momentum=0.9), "small": sgdjax.sgd(1.0)}, _labels
    ),
    "inject_hyperparams": lambda: sgdjax.inject_hyperparams(sgdjax.sgd)(
        learning_rate=0.1, momentum=0.9
    ),
    "flatten": lambda: sgdjax.flatten(sgdjax.sgd(0.1, momentum=0.9)),
    "sgd": lambda: sgdjax.sgd(0.1),
    "sgd_all_options": lambda: sgdjax.sgd(
        schedules.step_decay(0.1, 2),
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        maximize=True,
    ),  # fmt: skip
    "sgd_dampened": lambda: sgdjax.sgd(0.1, momentum=0.5, dampening=0.5),
    "sgdw": lambda: sgdjax.sgdw(0.1, momentum=0.9, weight_decay=1e-2),
    "scale_by_trust_ratio": lambda: sgdjax.scale_by_trust_ratio(0.01),
    "lars": lambda: sgdjax.lars(
        0.1,
        weight_decay=1e-4,
        weight_decay_mask=sgdjax.exclude_bias_and_norm,
        trust_ratio_mask=sgdjax.exclude_bias_and_norm,
    ),  # fmt: skip
    "lookahead": lambda: sgdjax.lookahead(sgdjax.sgd(0.1, momentum=0.9), sync_period=2),
    "diagnostics": lambda: sgdjax.diagnostics(sgdjax.sgd(0.1), clip_threshold=1.0),
    "schedule_free_sgd": lambda: sgdjax.schedule_free_sgd(0.1, weight_decay=1e-4),
}

# Public names that are not transform factories (or are covered through others).
NOT_FACTORIES = {
    "DecoupledWeightDecayState", "MomentumState", "ScalarOrSchedule", "ScaleByLearningRateState",
    "Schedule", "SkipNonFiniteState", "all_finite", "apply_updates", "global_norm", "schedules",
    "unitwise_norm", "DiagnosticsState", "EmaState", "LookaheadState", "diagnostics_metrics",
    "ema_init", "ema_update", "ema_value", "exclude_bias_and_norm", "ScheduleFreeState",
    "schedule_free_eval_params",
}  # fmt: skip


def test_every_public_transform_is_in_the_sweep():
    covered = {name.split("_schedule")[0] for name in TRANSFORMS}
    missing = [
        name
        for name in sgdjax.__all__
        if name not in NOT_FACTORIES and not any(c.startswith(name) for c in covered)
    ]
    assert not missing, f"add these to TRANSFORMS: {missing}"


def _gradients(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _structure(tree):
    return jax.tree.structure(tree), [
        (np.shape(x), jnp.asarray(x).dtype) for x in jax.tree.leaves(tree)
    ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_properties(name, dtype):
    tx = TRANSFORMS[name]()
    params = mixed_tree(dtype)
    state = tx.init(params)
    first = _structure(state)

    # no two state leaves share a buffer, nor share one with the params: both are donated
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)
                if isinstance(leaf, jax.Array) and leaf.size]  # fmt: skip
    param_pointers = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(params)}
    assert len(pointers) == len(set(pointers)) and not set(pointers) & param_pointers

    # init on abstract shapes gives the same structure
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    chex.assert_trees_all_equal_structs(jax.eval_shape(tx.init, shapes), state)

    update = jax.jit(tx.update)
    for seed in range(3):
        updates, new_state = update(_gradients(params, seed), state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        chex.assert_tree_all_finite(new_state)
        assert _structure(new_state) == first, "state structure, shapes or dtypes drifted"

        # the state must be usable on both sides of a lax.cond
        def pick(flag, new, old):
            return jax.lax.cond(flag, lambda: new, lambda: old)

        chex.assert_trees_all_equal_structs(jax.jit(pick)(True, new_state, state), state)
        state = new_state
        params = optax.apply_updates(params, updates)

    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.integer):
            assert jnp.asarray(leaf).dtype == jnp.int32


MISMATCH_CASES = {
    "momentum": lambda: sgdjax.momentum(0.9),
    "sgd_momentum": lambda: sgdjax.sgd(0.1, momentum=0.9),
    "add_decayed_weights": lambda: sgdjax.add_decayed_weights(0.1),
}


@pytest.mark.parametrize("name", sorted(MISMATCH_CASES))
def test_mismatched_gradients_are_explained(name):
    tx = MISMATCH_CASES[name]()
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"missing from updates: \['b'\]"):
        tx.update({"w": jnp.ones((3, 2))}, state, params)
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape float32\[2, 3\]"):
        tx.update({"w": jnp.ones((2, 3)), "b": jnp.ones(2)}, state, params)


def test_apply_updates_explains_mismatch():
    with pytest.raises(ValueError, match=r"not in params: \['extra'\]"):
        sgdjax.apply_updates({"w": jnp.ones(2)}, {"w": jnp.ones(2), "extra": jnp.ones(1)})
