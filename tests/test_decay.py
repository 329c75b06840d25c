"""sgdjax/_decay.py: coupled and decoupled weight decay against a float64 numpy reference
and optax.
"""

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from helpers import check_against_reference, random_tree, run_transform

import sgdjax


class TestWeightDecay(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_add_decayed_weights(self):
        check_against_reference(
            sgdjax.add_decayed_weights(0.1),
            lambda g, p, t: {k: g[k] + 0.1 * p[k] for k in g},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("tree", {"scale": False, "bias": False, "dense": True, "conv": True}),
        ("callable", lambda params: {k: v.ndim > 1 for k, v in params.items()}),
    )
    def test_add_decayed_weights_with_mask(self, mask):
        decayed = {"dense", "conv"}
        check_against_reference(
            sgdjax.add_decayed_weights(0.1, mask=mask),
            lambda g, p, t: {k: g[k] + 0.1 * p[k] if k in decayed else g[k] for k in g},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_add_decayed_weights_equals_optax(self):
        rng = np.random.default_rng(3)
        params = random_tree(rng)
        grads = [random_tree(rng) for _ in range(4)]
        ours = run_transform(sgdjax.add_decayed_weights(0.01), params, grads, variant=self.variant)
        theirs = run_transform(optax.add_decayed_weights(0.01), params, grads, variant=self.variant)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_decoupled_weight_decay_with_schedule(self):
        def schedule(count):
            return 0.1 / (1.0 + count)

        check_against_reference(
            sgdjax.decoupled_weight_decay(0.2, schedule),
            lambda g, p, t: {k: g[k] - 0.1 / (1.0 + t) * 0.2 * p[k] for k in g},
            variant=self.variant,
        )

    def test_decoupled_weight_decay_needs_params(self):
        tx = sgdjax.decoupled_weight_decay(0.1, 0.1)
        with pytest.raises(ValueError, match="needs params"):
            tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))

    def test_mask_of_wrong_structure_is_explained(self):
        tx = sgdjax.add_decayed_weights(0.1, mask={"w": True})
        params = {"w": jnp.ones(2), "b": jnp.ones(1)}
        with pytest.raises(ValueError, match=r"mask.*\['b'\]"):
            tx.update(params, tx.init(params), params)
