"""sgdjax/_skip.py: skip_non_finite against a float64 numpy reference, its counters, and an
update that overflows from finite gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from helpers import NUM_STEPS, check_against_reference, random_tree, sgd_reference

import sgdjax


class TestSkipNonFinite(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_skip_non_finite(self):
        rng = np.random.default_rng(7)
        grads = [random_tree(rng) for _ in range(NUM_STEPS)]
        bad_steps = {2, 3, 7}
        for t in bad_steps:
            grads[t]["dense"][0, 0] = np.nan if t != 3 else np.inf
        inner_reference = sgd_reference(0.05, mu=0.9)
        finite_count = 0

        def reference(g, p, t):
            nonlocal finite_count
            if t in bad_steps:
                return {k: np.zeros_like(v) for k, v in g.items()}
            out = inner_reference(g, p, finite_count)
            finite_count += 1
            return out

        tx = sgdjax.skip_non_finite(sgdjax.sgd(0.05, momentum=0.9))
        check_against_reference(tx, reference, variant=self.variant, grads_sequence=grads)

    def test_skip_non_finite_counts(self):
        tx = sgdjax.skip_non_finite(sgdjax.sgd(0.1, momentum=0.9))
        params = {"w": jnp.ones(3)}
        state = tx.init(params)
        update = jax.jit(tx.update)
        before = state.inner_state
        for g in ([jnp.nan, 0.0, 0.0], [0.0, jnp.inf, 0.0]):
            updates, state = update({"w": jnp.asarray(g)}, state, params)
            chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3)})
        chex.assert_trees_all_equal(state.inner_state, before)
        assert int(state.skipped_steps) == 2 and int(state.consecutive_skipped) == 2
        _, state = update({"w": jnp.ones(3)}, state, params)
        assert int(state.skipped_steps) == 2 and int(state.consecutive_skipped) == 0
        assert bool(state.last_finite)


# ---------------------------------------------------------------- skip_non_finite


def test_skip_non_finite_skips_an_overflowing_update_from_finite_gradients():
    # learning rate 1e38: -1e38 * (g + 0.9 b) overflows float32 once |g + 0.9 b| > 3.4
    tx = sgdjax.skip_non_finite(sgdjax.sgd(1e38, momentum=0.9))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update({"w": jnp.full(3, 1e-3)}, state, params)  # finite: applied
    assert int(state.skipped_steps) == 0
    before = state.inner_state
    updates, state = update({"w": jnp.full(3, 10.0)}, state, params)  # overflows
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3)})
    chex.assert_trees_all_equal(state.inner_state, before)
    assert int(state.skipped_steps) == 1 and int(state.consecutive_skipped) == 1
    assert not bool(state.last_finite)
