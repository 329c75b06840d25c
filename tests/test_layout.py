"""The automatic layout (flat buffers for many small leaves) and the recomputed temporary."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import apply_steps

import sgdjax
from sgdjax import _flatten


def _many_small(count=40, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(2, 9)), int(rng.integers(2, 9))) for _ in range(count)]
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [[jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes] for _ in range(4)]
    return params, grads


def _run(tx, params, grads, *, jit=True):
    return apply_steps(tx, params, grads, jit=jit)[:2]


def _per_leaf_sgd(learning_rate, momentum, weight_decay):
    """``sgd``'s pieces in optax's chain, which keeps one buffer per leaf."""
    return optax.chain(
        sgdjax.add_decayed_weights(weight_decay),
        sgdjax.momentum(momentum, nesterov=True),
        sgdjax.scale_by_learning_rate(learning_rate),
    )


def test_sgd_picks_flat_buffers_for_many_small_leaves_and_per_leaf_for_few_large():
    small, _ = _many_small()
    state = sgdjax.sgd(0.1, momentum=0.9).init(small)
    assert {k: v.shape for k, v in state[0].momentum_buffer.items()} == {"float32": (sum(
        p.size for p in small),)}  # fmt: skip
    large = [jnp.zeros((256, 256)), jnp.zeros((256,))]
    state = sgdjax.sgd(0.1, momentum=0.9).init(large)
    chex.assert_trees_all_equal_shapes(state[0].momentum_buffer, large)


def test_flat_layout_gives_bitwise_the_per_leaf_results():
    params, grads = _many_small()

    tx = sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    flat_params, flat_state = _run(tx, params, grads)
    leaf_params, leaf_state = _run(_per_leaf_sgd(0.05, 0.9, 1e-2), params, grads)
    assert jax.tree.leaves(flat_state[1].momentum_buffer)[0].ndim == 1
    assert jax.tree.leaves(leaf_state[1].momentum_buffer)[0].ndim == 2
    chex.assert_trees_all_equal(flat_params, leaf_params)


def _mixed_dtypes(count=40, seed=1):
    """Small leaves of float32 and bfloat16 interleaved, so the two flat buffers'
    segments alternate in leaf order; gradients large enough that clipping acts."""
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(2, 9)), int(rng.integers(2, 9))) for _ in range(count)]
    dtypes = [jnp.float32 if i % 3 else jnp.bfloat16 for i in range(count)]

    def draw(scale):
        return [jnp.asarray(rng.normal(size=s) * scale, d) for s, d in zip(shapes, dtypes)]

    return draw(1.0), [draw(10.0) for _ in range(4)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("make_tree", [_many_small, _mixed_dtypes])
def test_chain_with_global_norm_clip_runs_flat_with_bitwise_the_per_leaf_results(
    make_tree, norm_type
):
    params, grads = make_tree()

    def clips():
        return sgdjax.clip_by_global_norm(1.0, norm_type=norm_type), sgdjax.clip(0.5)

    tx = sgdjax.chain(*clips(), sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2))
    flat_params, flat_state = _run(tx, params, grads)
    # The clip, the decay, the momentum and the learning rate all ran on flat buffers.
    buffers = optax.tree_utils.tree_get(flat_state, "momentum_buffer")
    assert sorted(buffers) == sorted({jnp.dtype(p.dtype).name for p in params})
    leaf_params, leaf_state = _run(
        optax.chain(*clips(), _per_leaf_sgd(0.05, 0.9, 1e-2)), params, grads
    )
    assert jax.tree.leaves(optax.tree_utils.tree_get(leaf_state, "momentum_buffer"))[0].ndim == 2
    chex.assert_trees_all_equal(flat_params, leaf_params)
    chex.assert_trees_all_equal(
        jax.tree.leaves(buffers),
        jax.tree.leaves(_flatten._pack(
            optax.tree_utils.tree_get(leaf_state, "momentum_buffer"), _flatten._groups(params)
        )),
    )  # fmt: skip
    # sgdjax.flatten around the chain (flat buffers of flat buffers): the same numbers.
    chex.assert_trees_all_equal(_run(sgdjax.flatten(tx), params, grads)[0], leaf_params)
    # Not jitted: flat and per leaf agree again.
    reference = optax.chain(*clips(), _per_leaf_sgd(0.05, 0.9, 1e-2))
    chex.assert_trees_all_equal(
        _run(tx, params, grads, jit=False)[0], _run(reference, params, grads, jit=False)[0]
    )


def test_global_norm_on_flat_buffers_adds_the_per_leaf_sums_in_leaf_order():
    params, grads = _mixed_dtypes()
    reference = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads[0]))
    per_leaf = sgdjax.global_norm(grads[0])
    np.testing.assert_allclose(float(per_leaf), reference, rtol=1e-6)
    seen = {}

    def record(updates, state, params=None):
        seen["views"] = [v.shape for v in _flatten.leaf_views(updates)]
        seen["norm"] = sgdjax.global_norm(updates)
        return updates, state

    inner = optax.GradientTransformation(lambda p: optax.EmptyState(), record)
    jax.jit(lambda g: sgdjax.flatten(inner).update(g, optax.EmptyState()))(grads[0])
    assert seen["views"] == [(g.size,) for g in grads[0]]
    flat_norm = jax.jit(
        lambda g: sgdjax.flatten(
            optax.GradientTransformation(
                lambda p: optax.EmptyState(),
                lambda u, s, p=None: ({k: sgdjax.global_norm(u) + 0 * v for k, v in u.items()}, s),
            )
        ).update(g, optax.EmptyState())[0]
    )(grads[0])
    assert all(float(jnp.ravel(leaf)[0]) == float(per_leaf) for leaf in flat_norm)


def test_recomputing_the_nesterov_temporary_gives_bitwise_the_stored_form():
    params, grads = _many_small(count=3)

    def make():  # sgd's pieces in optax's chain: the temporary is stored
        return optax.chain(sgdjax.clip_by_global_norm(1.0), _per_leaf_sgd(0.05, 0.9, 1e-2))

    ours = _flatten.recompute_temporaries(make())
    chex.assert_trees_all_equal(_run(ours, params, grads), _run(make(), params, grads))


def test_recomputed_update_needs_no_temporary_the_size_of_the_params():
    tx = sgdjax.chain(
        sgdjax.clip_by_global_norm(1.0),
        sgdjax.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    )
    params = [jnp.ones((256, 256))]

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return sgdjax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    compiled = compiled.compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 256 * 256 * 4
    # Two loops over the leaf: the new buffer, and the new params; no third.
    loops = re.findall(r"f32\[256,256\]\{1,0\} fusion\(", compiled.as_text())
    assert len(loops) == 2


def test_layout_is_stable_under_cond_vmap_and_abstract_init():
    params, grads = _many_small()
    tx = sgdjax.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    abstract = jax.eval_shape(
        tx.init, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, state)

    def step(pred, state):
        return jax.lax.cond(pred, lambda s: tx.update(grads[0], s, params)[1], lambda s: s, state)

    chex.assert_trees_all_equal_structs(jax.jit(step)(True, state), state)
    batched = jax.vmap(lambda g: tx.update(g, state, params)[0])(
        jax.tree.map(lambda g: jnp.stack([g, 2 * g]), grads[0])
    )
    single = jax.jit(lambda g: tx.update(g, state, params)[0])(grads[0])
    chex.assert_trees_all_close(jax.tree.map(lambda b: b[0], batched), single)


def test_differently_sharded_leaves_stay_per_leaf():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params, _ = _many_small()
    assert _flatten.prefers_flat_layout(params)
    sharded = [jax.device_put(jnp.zeros((4,)), split) for _ in range(40)]
    assert not _flatten.prefers_flat_layout(sharded)
