"""sgdjax/_flatten.py: one flat buffer per dtype gives the per-leaf updates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from helpers import NUM_STEPS, random_tree, run_transform

import sgdjax


class TestFlatten(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_flatten_equals_per_leaf_updates(self):
        rng = np.random.default_rng(9)
        params = random_tree(rng)
        grads = [random_tree(rng) for _ in range(NUM_STEPS)]

        def make():
            return sgdjax.chain(
                sgdjax.clip_by_global_norm(1.0),
                sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
            )

        ours = run_transform(sgdjax.flatten(make()), params, grads, variant=self.variant)
        reference = run_transform(make(), params, grads, variant=self.variant)
        chex.assert_trees_all_close(ours, reference, rtol=1e-6, atol=1e-7)

    def test_flatten_keeps_one_buffer_per_dtype(self):
        params = {
            "a": jnp.ones((2, 3), jnp.float32),
            "b": jnp.ones((4,), jnp.bfloat16),
            "c": jnp.ones((5,), jnp.float32),
        }
        tx = sgdjax.flatten(sgdjax.sgd(0.5, momentum=0.9))
        state = tx.init(params)
        buffers = state[0].momentum_buffer
        assert {k: (v.shape, v.dtype) for k, v in buffers.items()} == {
            "float32": ((11,), jnp.float32),
            "bfloat16": ((4,), jnp.bfloat16),
        }
        updates, _ = jax.jit(tx.update)(params, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        chex.assert_trees_all_close(
            jax.tree.map(lambda u: u.astype(jnp.float32), updates),
            jax.tree.map(lambda p: jnp.full(p.shape, -0.5), params),
        )
