"""A property sweep over every public transform: dtypes, shapes, finiteness, stable state."""

import inspect

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


def _by_rank(params):
    """Muon on the leaves with two or more axes, SGD on the rest."""
    return jax.tree.map(lambda p: "muon" if p.ndim >= 2 else "sgd", params)


# "factory" or "factory[variant]" -> a constructor; every public factory appears here.
TRANSFORMS = {
    "scale": lambda: sgdjax.scale(0.5),
    "scale_by_learning_rate": lambda: sgdjax.scale_by_learning_rate(0.1),
    "scale_by_learning_rate[schedule]": lambda: sgdjax.scale_by_learning_rate(
        schedules.cosine_annealing(0.1, t_max=5)
    ),
    "momentum": lambda: sgdjax.momentum(0.9),
    "momentum[nesterov]": lambda: sgdjax.momentum(0.9, nesterov=True),
    "momentum[dampened]": lambda: sgdjax.momentum(0.9, dampening=0.3),
    "momentum[bfloat16_buffer]": lambda: sgdjax.momentum(0.9, accumulator_dtype=jnp.bfloat16),
    "clip": lambda: sgdjax.clip(0.1),
    "clip_by_norm": lambda: sgdjax.clip_by_norm(0.5),
    "clip_by_global_norm": lambda: sgdjax.clip_by_global_norm(0.5),
    "clip_by_global_norm[norm_type]": lambda: sgdjax.clip_by_global_norm(0.5, norm_type=1.5),
    "clip_by_global_norm[inf]": lambda: sgdjax.clip_by_global_norm(0.5, norm_type=float("inf")),
    "adaptive_grad_clip": lambda: sgdjax.adaptive_grad_clip(0.01),
    "add_decayed_weights": lambda: sgdjax.add_decayed_weights(1e-2),
    "add_decayed_weights[masked]": lambda: sgdjax.add_decayed_weights(1e-2, mask=_conv_and_dense),
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
        learning_rate=0.1, momentum=0.9, nesterov=True
    ),
    "flatten": lambda: sgdjax.flatten(sgdjax.sgd(0.1, momentum=0.9)),
    "sgd": lambda: sgdjax.sgd(0.1),
    "sgd[all_options]": lambda: sgdjax.sgd(
        schedules.step_decay(0.1, 2),
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        maximize=True,
    ),  # fmt: skip
    "sgd[dampened]": lambda: sgdjax.sgd(0.1, momentum=0.5, dampening=0.5),
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
    "asgd": lambda: sgdjax.asgd(0.1, t0=1.0, weight_decay=1e-3),
    "asgd[scheduled_maximize]": lambda: sgdjax.asgd(
        schedules.cosine_annealing(0.1, 5), lambd=1e-2, maximize=True
    ),
    "muon[with_sgd]": lambda: sgdjax.multi_transform(
        {"muon": sgdjax.muon(0.02), "sgd": sgdjax.sgd(0.1, momentum=0.9)}, _by_rank
    ),
    "scale_by_muon[bfloat16_iteration]": lambda: sgdjax.multi_transform(
        {
            "muon": sgdjax.scale_by_muon(ns_dtype=jnp.bfloat16, matrix_layout="in_out"),
            "sgd": sgdjax.sgd(0.1),
        },
        _by_rank,
    ),
    "sgd[scheduled_momentum]": lambda: sgdjax.sgd(
        schedules.one_cycle(0.1, 10), momentum=schedules.one_cycle_momentum(10), nesterov=True
    ),
    "momentum[cyclic_dampened]": lambda: sgdjax.momentum(
        schedules.cyclic_momentum(2), dampening=0.1
    ),
}

# Transforms that cannot apply to complex values, and the error that says so.
REAL_ONLY = {
    "muon[with_sgd]": "muon needs real leaves",  # as torch
    "scale_by_muon[bfloat16_iteration]": "muon needs real leaves",
    "clip": "clip needs real updates",  # complex numbers have no order
    "momentum[bfloat16_buffer]": "accumulator_dtype",  # would drop the imaginary part
}


def _public_factories() -> list[str]:
    """Public functions of sgdjax that return a GradientTransformation (or a factory of one)."""
    names = []
    for name in sgdjax.__all__:
        value = getattr(sgdjax, name)
        if inspect.isfunction(value):
            annotation = inspect.signature(value).return_annotation
            if "GradientTransformation" in str(annotation):
                names.append(name)
    return names


def test_every_public_transform_is_in_the_sweep():
    factories = _public_factories()
    assert {"sgd", "momentum", "inject_hyperparams", "clip"} <= set(factories)
    covered = {key.split("[")[0] for key in TRANSFORMS}
    missing = sorted(set(factories) - covered)
    assert not missing, f"add these to TRANSFORMS: {missing}"
    assert not covered - set(factories), "TRANSFORMS names a factory that is not public"


def _gradients(params, seed):
    rng = np.random.default_rng(seed)

    def leaf(p):
        value = rng.normal(size=p.shape)
        if jnp.issubdtype(p.dtype, jnp.complexfloating):
            value = value + 1j * rng.normal(size=p.shape)
        return jnp.asarray(value, p.dtype)

    return jax.tree.map(leaf, params)


def _structure(tree):
    return jax.tree.structure(tree), [
        (np.shape(x), jnp.asarray(x).dtype) for x in jax.tree.leaves(tree)
    ]


DTYPES = [jnp.float32, jnp.bfloat16, jnp.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16", "complex64"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_properties(name, dtype):
    tx = TRANSFORMS[name]()
    params = mixed_tree(dtype)
    if dtype == jnp.complex64 and name in REAL_ONLY:
        with pytest.raises(ValueError, match=REAL_ONLY[name]):
            tx.update(_gradients(params, 0), tx.init(params), params)
        return
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

    # extra arguments (optax's GradientTransformationExtraArgs) are accepted
    assert isinstance(tx, optax.GradientTransformationExtraArgs)

    update = jax.jit(tx.update)
    for seed in range(3):
        grads = _gradients(params, seed)
        updates, new_state = update(grads, state, params)
        if seed == 0:
            chex.assert_trees_all_equal(update(grads, state, params, value=1.0)[0], updates)
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


def _build_and_update(name, params, grads):
    """Builds the transform from constants, then takes one update: all inside one trace."""
    tx = TRANSFORMS[name]()
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_factory_builds_inside_jit_vmap_and_grad(name):
    rng = np.random.default_rng(0)
    params = {"dense": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=2), jnp.float32)}  # fmt: skip
    grads = _gradients(params, 1)
    expected = _build_and_update(name, params, grads)
    build = lambda p, g: _build_and_update(name, p, g)  # noqa: E731
    chex.assert_trees_all_close(jax.jit(build)(params, grads), expected, rtol=1e-6, atol=1e-7)

    pair = lambda tree: jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)  # noqa: E731
    batched = jax.vmap(build)(pair(params), pair(grads))
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[0], batched), expected, rtol=1e-6, atol=1e-7
    )

    def loss(p):
        return sum(jnp.sum(u) for u in jax.tree.leaves(build(p, grads)))

    chex.assert_trees_all_equal_shapes_and_dtypes(jax.grad(loss)(params), params)


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
