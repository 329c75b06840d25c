"""sgdjax/_momentum.py: heavy-ball and Nesterov momentum against a float64 numpy
reference written from the docstring's update rule, optax.trace and golden values.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from helpers import NUM_STEPS, check_against_reference, random_tree, run_transform

import sgdjax


def _momentum_reference(mu, tau=0.0, nesterov=False):
    buffers = {}

    def step(grads, params, t):
        out = {}
        for name, g in grads.items():
            b = g.copy() if t == 0 else mu * buffers[name] + (1.0 - tau) * g
            buffers[name] = b
            out[name] = g + mu * b if nesterov else b
        return out

    return step


class TestMomentum(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("heavy_ball", 0.9, 0.0, False),
        ("dampened", 0.8, 0.3, False),
        ("full_dampening", 0.5, 1.0, False),
        ("nesterov", 0.9, 0.0, True),
        ("nesterov_small", 0.1, 0.0, True),
    )
    def test_momentum(self, mu, tau, nesterov):
        check_against_reference(
            sgdjax.momentum(mu, dampening=tau, nesterov=nesterov),
            _momentum_reference(mu, tau, nesterov),
            variant=self.variant,
        )

    def test_golden_values(self):
        # mu = 0.5, tau = 0.5, g = 2, 2, 2:
        #   b_1 = 2 (no dampening on the first step)
        #   b_2 = 0.5 * 2 + 0.5 * 2 = 2
        # with g_3 = 4: b_3 = 0.5 * 2 + 0.5 * 4 = 3
        tx = sgdjax.momentum(0.5, dampening=0.5)
        state = tx.init(jnp.zeros(()))
        outputs = []
        for g in (2.0, 2.0, 4.0):
            u, state = tx.update(jnp.asarray(g), state)
            outputs.append(float(u))
        assert outputs == [2.0, 2.0, 3.0]
        # Nesterov, mu = 0.5, g = 1, 1: b_1 = 1, u_1 = 1 + 0.5 * 1 = 1.5;
        # b_2 = 0.5 * 1 + 1 = 1.5, u_2 = 1 + 0.5 * 1.5 = 1.75
        tx = sgdjax.momentum(0.5, nesterov=True)
        state = tx.init(jnp.zeros(()))
        u1, state = tx.update(jnp.asarray(1.0), state)
        u2, state = tx.update(jnp.asarray(1.0), state)
        assert (float(u1), float(u2)) == (1.5, 1.75)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("heavy_ball", False), ("nesterov", True))
    def test_equals_optax_trace_without_dampening(self, nesterov):
        rng = np.random.default_rng(1)
        params = random_tree(rng)
        grads = [random_tree(rng) for _ in range(NUM_STEPS)]
        ours = run_transform(
            sgdjax.momentum(0.9, nesterov=nesterov), params, grads, variant=self.variant
        )
        theirs = run_transform(
            optax.trace(decay=0.9, nesterov=nesterov), params, grads, variant=self.variant
        )
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)

    def test_bfloat16_accumulator(self):
        params = {"w": jnp.zeros((8,), jnp.float32)}
        tx = sgdjax.momentum(0.9, accumulator_dtype=jnp.bfloat16)
        state = tx.init(params)
        chex.assert_type(state.momentum_buffer["w"], jnp.bfloat16)
        grads = {"w": jnp.linspace(-1.0, 1.0, 8)}
        for _ in range(3):
            updates, state = jax.jit(tx.update)(grads, state)
        chex.assert_type(updates["w"], jnp.float32)
        chex.assert_type(state.momentum_buffer["w"], jnp.bfloat16)
        # b_3 = (1 + 0.9 + 0.81) g, stored in bfloat16 (8 bits of mantissa).
        np.testing.assert_allclose(updates["w"], 2.71 * grads["w"], rtol=1e-2, atol=1e-2)
