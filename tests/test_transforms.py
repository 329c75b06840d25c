"""Every core transform against a float64 plain-numpy reference loop, jitted and not.

Each reference below is written from the update rule in the transform's docstring,
not from its code: plain loops over leaves, float64 throughout.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import sgdjax

NUM_STEPS = 12
RTOL, ATOL = 2e-5, 2e-6

# A mixed-shape tree: scalar, vector, dense kernel (in, out), conv kernel HWIO.
SHAPES = {"scale": (), "bias": (5,), "dense": (6, 4), "conv": (3, 3, 2, 4)}


def _random_tree(rng, scale=1.0):
    return {name: (scale * rng.normal(size=shape)) for name, shape in SHAPES.items()}


def _to_jax(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _run(tx, params, grads_sequence, *, variant, evolve=True):
    """Runs ``tx`` and returns its updates and params per step (as float64 numpy)."""
    params = _to_jax(params)
    state = tx.init(params)

    @variant
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return updates, state, sgdjax.apply_updates(params, updates)

    updates_out, params_out = [], []
    for grads in grads_sequence:
        updates, state, new_params = step(_to_jax(grads), state, params)
        if evolve:
            params = new_params
        updates_out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), updates))
        params_out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
    return updates_out, params_out


def _reference_run(step_fn, params, grads_sequence, *, evolve=True):
    """Runs a numpy reference ``step_fn(grads, params, t) -> updates`` (t from 0)."""
    params = jax.tree.map(np.float64, params)
    updates_out, params_out = [], []
    for t, grads in enumerate(grads_sequence):
        updates = step_fn(jax.tree.map(np.float64, grads), params, t)
        if evolve:
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        updates_out.append(updates)
        params_out.append(params)
    return updates_out, params_out


def _check(tx, reference_step, *, variant, seed=0, evolve=True, grads_sequence=None):
    rng = np.random.default_rng(seed)
    params = _random_tree(rng)
    if grads_sequence is None:
        grads_sequence = [_random_tree(rng) for _ in range(NUM_STEPS)]
    ours = _run(tx, params, grads_sequence, variant=variant, evolve=evolve)
    theirs = _reference_run(reference_step, params, grads_sequence, evolve=evolve)
    chex.assert_trees_all_close(ours, theirs, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- references


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


def _unit_norms(x):
    if x.ndim <= 1:
        return np.full(x.shape, np.sqrt(np.sum(x**2)))
    axes = tuple(range(x.ndim - 1))
    return np.broadcast_to(np.sqrt(np.sum(x**2, axis=axes, keepdims=True)), x.shape)


def _sgd_reference(lr, mu=0.0, tau=0.0, nesterov=False, wd=0.0, maximize=False, decoupled=0.0):
    """torch.optim.SGD's algorithm, written out (plus decoupled decay for SGDW)."""
    buffers = {}

    def step(grads, params, t):
        eta = lr(t) if callable(lr) else lr
        out = {}
        for name, grad in grads.items():
            g = -grad if maximize else grad
            g = g + wd * params[name]
            if mu != 0.0:
                b = g.copy() if t == 0 else mu * buffers[name] + (1.0 - tau) * g
                buffers[name] = b
                g = g + mu * b if nesterov else b
            out[name] = -eta * g - eta * decoupled * params[name]
        return out

    return step


# ---------------------------------------------------------------- scaling


class TestScaling(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_scale(self):
        _check(
            sgdjax.scale(-0.3),
            lambda g, p, t: {k: -0.3 * v for k, v in g.items()},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_scale_by_learning_rate_constant(self):
        _check(
            sgdjax.scale_by_learning_rate(0.05),
            lambda g, p, t: {k: -0.05 * v for k, v in g.items()},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_scale_by_learning_rate_schedule_is_evaluated_at_the_update_count(self):
        def schedule(count):
            return 0.1 * 0.5 ** (count // 3)

        _check(
            sgdjax.scale_by_learning_rate(schedule),
            lambda g, p, t: {k: -0.1 * 0.5 ** (t // 3) * v for k, v in g.items()},
            variant=self.variant,
        )


# ---------------------------------------------------------------- momentum


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
        _check(
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
        params = _random_tree(rng)
        grads = [_random_tree(rng) for _ in range(NUM_STEPS)]
        ours = _run(sgdjax.momentum(0.9, nesterov=nesterov), params, grads, variant=self.variant)
        theirs = _run(
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


# ---------------------------------------------------------------- clipping


class TestClipping(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_clip(self):
        _check(
            sgdjax.clip(0.5),
            lambda g, p, t: {k: np.clip(v, -0.5, 0.5) for k, v in g.items()},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_clip_by_norm(self):
        def reference(g, p, t):
            out = {}
            for k, v in g.items():
                norm = np.sqrt(np.sum(v**2))
                out[k] = v if norm < 1.5 else v * 1.5 / norm
            return out

        _check(sgdjax.clip_by_norm(1.5), reference, variant=self.variant)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("clipped", 2.0), ("not_clipped", 1e3))
    def test_clip_by_global_norm(self, max_norm):
        def reference(g, p, t):
            norm = math.sqrt(sum(np.sum(v**2) for v in g.values()))
            factor = 1.0 if norm < max_norm else max_norm / norm
            return {k: v * factor for k, v in g.items()}

        _check(sgdjax.clip_by_global_norm(max_norm), reference, variant=self.variant)

    @chex.variants(with_jit=True, without_jit=True)
    def test_adaptive_grad_clip(self):
        def reference(g, p, t):
            out = {}
            for k, v in g.items():
                max_norm = 0.05 * np.maximum(_unit_norms(p[k]), 1e-3)
                norm = _unit_norms(v)
                out[k] = np.where(norm < max_norm, v, v * max_norm / norm)
            return out

        _check(sgdjax.adaptive_grad_clip(0.05), reference, variant=self.variant)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("clip", sgdjax.clip(0.3), optax.clip(0.3)),
        ("global_norm", sgdjax.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
        ("agc", sgdjax.adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)),
    )
    def test_equals_optax(self, ours_tx, optax_tx):
        rng = np.random.default_rng(2)
        params = _random_tree(rng)
        grads = [_random_tree(rng) for _ in range(4)]
        ours = _run(ours_tx, params, grads, variant=self.variant)
        theirs = _run(optax_tx, params, grads, variant=self.variant)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)

    def test_golden_values(self):
        # global norm of (3, 4) and (12,) is sqrt(9 + 16 + 144) = 13; max 6.5 halves all.
        tx = sgdjax.clip_by_global_norm(6.5)
        u, _ = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}, tx.init(None))
        np.testing.assert_allclose(u["a"], [1.5, 2.0], rtol=1e-6)
        np.testing.assert_allclose(u["b"], [6.0], rtol=1e-6)
        # AGC: a dense kernel with columns of norm 5 and 1; lambda 0.1 gives limits 0.5
        # and 0.1; gradient columns of norm 1 and 0.05: the first scales by 0.5, the second
        # is kept.
        w = jnp.array([[3.0, 1.0], [4.0, 0.0]])
        g = jnp.array([[0.6, 0.05], [0.8, 0.0]])
        tx = sgdjax.adaptive_grad_clip(0.1)
        u, _ = tx.update(g, tx.init(w), w)
        np.testing.assert_allclose(u, [[0.3, 0.05], [0.4, 0.0]], rtol=1e-6)

    def test_bfloat16_norm_is_accumulated_in_float32(self):
        # 4096 entries of 1 have norm 64; in bfloat16 the running sum would saturate.
        g = {"w": jnp.ones((4096,), jnp.bfloat16)}
        assert float(sgdjax.global_norm(g)) == 64.0
        u, _ = sgdjax.clip_by_global_norm(32.0).update(g, optax.EmptyState())
        chex.assert_type(u["w"], jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(u["w"], np.float32), 0.5)

    def test_float16_norm_beyond_float16_range_still_clips(self):
        # Entries of 2000 over 4096 leaves: norm 128,000 > 65504 (float16's largest).
        g = {"w": jnp.full((4096,), 2000.0, jnp.float16)}
        for tx in (sgdjax.clip_by_global_norm(64.0), sgdjax.clip_by_norm(64.0)):
            u, _ = tx.update(g, tx.init(g))
            chex.assert_type(u["w"], jnp.float16)
            np.testing.assert_allclose(np.asarray(u["w"], np.float32), 1.0, rtol=1e-3)
        w = {"w": jnp.ones((4096, 1), jnp.float16)}
        big = {"w": jnp.full((4096, 1), 2000.0, jnp.float16)}
        tx = sgdjax.adaptive_grad_clip(1.0)
        u, _ = tx.update(big, tx.init(w), w)  # ||W|| = 64: the gradient is scaled to norm 64
        np.testing.assert_allclose(np.asarray(u["w"], np.float32), 1.0, rtol=1e-3)


# ---------------------------------------------------------------- weight decay


class TestWeightDecay(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_add_decayed_weights(self):
        _check(
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
        _check(
            sgdjax.add_decayed_weights(0.1, mask=mask),
            lambda g, p, t: {k: g[k] + 0.1 * p[k] if k in decayed else g[k] for k in g},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_add_decayed_weights_equals_optax(self):
        rng = np.random.default_rng(3)
        params = _random_tree(rng)
        grads = [_random_tree(rng) for _ in range(4)]
        ours = _run(sgdjax.add_decayed_weights(0.01), params, grads, variant=self.variant)
        theirs = _run(optax.add_decayed_weights(0.01), params, grads, variant=self.variant)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_decoupled_weight_decay_with_schedule(self):
        def schedule(count):
            return 0.1 / (1.0 + count)

        _check(
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


# ---------------------------------------------------------------- aliases


class TestAliases(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("plain", dict()),
        ("momentum", dict(momentum=0.9)),
        ("dampening", dict(momentum=0.9, dampening=0.2)),
        ("nesterov_decay", dict(momentum=0.9, nesterov=True, weight_decay=1e-2)),
        ("maximize", dict(momentum=0.5, weight_decay=1e-2, maximize=True)),
    )
    def test_sgd(self, options):
        reference = _sgd_reference(
            0.05,
            mu=options.get("momentum", 0.0),
            tau=options.get("dampening", 0.0),
            nesterov=options.get("nesterov", False),
            wd=options.get("weight_decay", 0.0),
            maximize=options.get("maximize", False),
        )
        _check(sgdjax.sgd(0.05, **options), reference, variant=self.variant)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sgd_with_schedule(self):
        def schedule(count):
            return 0.1 * 0.9**count

        _check(
            sgdjax.sgd(schedule, momentum=0.9),
            _sgd_reference(lambda t: 0.1 * 0.9**t, mu=0.9),
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_sgdw(self):
        _check(
            sgdjax.sgdw(0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
            _sgd_reference(0.05, mu=0.9, nesterov=True, decoupled=0.1),
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_sgd_equals_optax_sgd_where_the_rules_agree(self):
        rng = np.random.default_rng(5)
        params = _random_tree(rng)
        grads = [_random_tree(rng) for _ in range(NUM_STEPS)]
        ours = _run(
            sgdjax.sgd(0.1, momentum=0.9, nesterov=True), params, grads, variant=self.variant
        )
        theirs = _run(
            optax.sgd(0.1, momentum=0.9, nesterov=True), params, grads, variant=self.variant
        )
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)

    def test_sgdw_without_decay_equals_sgd(self):
        rng = np.random.default_rng(6)
        params = _random_tree(rng)
        grads = [_random_tree(rng) for _ in range(4)]
        ours = _run(sgdjax.sgdw(0.1, momentum=0.9), params, grads, variant=jax.jit)
        theirs = _run(sgdjax.sgd(0.1, momentum=0.9), params, grads, variant=jax.jit)
        chex.assert_trees_all_equal(ours, theirs)


# ---------------------------------------------------------------- wrappers


class TestWrappers(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_skip_non_finite(self):
        rng = np.random.default_rng(7)
        grads = [_random_tree(rng) for _ in range(NUM_STEPS)]
        bad_steps = {2, 3, 7}
        for t in bad_steps:
            grads[t]["dense"][0, 0] = np.nan if t != 3 else np.inf
        inner_reference = _sgd_reference(0.05, mu=0.9)
        finite_count = 0

        def reference(g, p, t):
            nonlocal finite_count
            if t in bad_steps:
                return {k: np.zeros_like(v) for k, v in g.items()}
            out = inner_reference(g, p, finite_count)
            finite_count += 1
            return out

        tx = sgdjax.skip_non_finite(sgdjax.sgd(0.05, momentum=0.9))
        _check(tx, reference, variant=self.variant, grads_sequence=grads)

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

    @chex.variants(with_jit=True, without_jit=True)
    def test_inject_hyperparams_changes_learning_rate_at_run_time(self):
        tx = sgdjax.inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9)
        params = {"w": jnp.array([1.0, -1.0])}
        state = tx.init(params)
        update = self.variant(tx.update)
        grads = {"w": jnp.array([1.0, 2.0])}
        u1, state = update(grads, state, params)
        state.hyperparams["learning_rate"] = jnp.asarray(0.01)
        u2, state = update(grads, state, params)
        # b_1 = g; b_2 = 0.9 g + g = 1.9 g; u_2 = -0.01 * 1.9 g
        np.testing.assert_allclose(u1["w"], [-0.1, -0.2], rtol=1e-6)
        np.testing.assert_allclose(u2["w"], [-0.019, -0.038], rtol=1e-5)
        chex.assert_type(state.hyperparams["learning_rate"], jnp.float32)

    def test_inject_hyperparams_keeps_float32_hyperparams_for_bfloat16_params(self):
        tx = sgdjax.inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9)
        state = tx.init({"w": jnp.ones(2, jnp.bfloat16)})
        chex.assert_type(state.hyperparams["learning_rate"], jnp.float32)
        assert float(state.hyperparams["learning_rate"]) == np.float32(0.1)

    def test_inject_hyperparams_with_a_schedule_and_a_mask(self):
        tx = sgdjax.inject_hyperparams(sgdjax.sgdw)(
            learning_rate=lambda count: 0.1 / (1 + count),
            weight_decay=0.5,
            mask={"w": True, "b": False},
        )
        params = {"w": jnp.ones(1), "b": jnp.ones(1)}
        state = tx.init(params)
        grads = {"w": jnp.zeros(1), "b": jnp.zeros(1)}
        for _ in range(2):
            updates, state = jax.jit(tx.update)(grads, state, params)
        # second step: eta = 0.1 / 2; decay only on w: -0.05 * 0.5 * 1
        np.testing.assert_allclose(updates["w"], [-0.025], rtol=1e-6)
        np.testing.assert_allclose(updates["b"], [0.0])

    def test_chain_mixes_sgdjax_and_optax_both_ways(self):
        rng = np.random.default_rng(8)
        params = _random_tree(rng)
        grads = [_random_tree(rng) for _ in range(5)]
        mixed_a = sgdjax.chain(
            optax.clip_by_global_norm(1.0), sgdjax.momentum(0.9), optax.scale(-0.1)
        )
        mixed_b = optax.chain(sgdjax.clip_by_global_norm(1.0), optax.trace(0.9), sgdjax.scale(-0.1))
        pure = optax.chain(optax.clip_by_global_norm(1.0), optax.trace(0.9), optax.scale(-0.1))
        runs = [_run(tx, params, grads, variant=jax.jit) for tx in (mixed_a, mixed_b, pure)]
        chex.assert_trees_all_close(runs[0], runs[2], rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(runs[1], runs[2], rtol=1e-6, atol=1e-7)

    def test_named_chain_exposes_states_by_name(self):
        tx = sgdjax.named_chain(
            ("momentum", sgdjax.momentum(0.9)), ("lr", sgdjax.scale_by_learning_rate(0.1))
        )
        state = tx.init({"w": jnp.ones(2)})
        assert set(state) == {"momentum", "lr"}
        with pytest.raises(ValueError, match="distinct"):
            sgdjax.named_chain(("a", sgdjax.scale(1.0)), ("a", sgdjax.scale(2.0)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_and_multi_transform(self):
        labels = {"scale": "none", "bias": "bias", "dense": "decay", "conv": "decay"}
        tx = sgdjax.multi_transform(
            {
                "decay": sgdjax.sgd(0.05, momentum=0.9, weight_decay=0.1),
                "bias": sgdjax.sgd(0.5, momentum=0.9),
                "none": sgdjax.masked(sgdjax.scale(0.0), lambda p: jax.tree.map(lambda _: True, p)),
            },
            labels,
        )
        decay_ref = _sgd_reference(0.05, mu=0.9, wd=0.1)
        bias_ref = _sgd_reference(0.5, mu=0.9)

        def reference(g, p, t):
            out = decay_ref({k: g[k] for k in ("dense", "conv")}, p, t)
            out.update(bias_ref({"bias": g["bias"]}, p, t))
            out["scale"] = 0.0 * g["scale"]
            return out

        _check(tx, reference, variant=self.variant)

    def test_multi_transform_rejects_unknown_labels(self):
        tx = sgdjax.multi_transform({"a": sgdjax.sgd(0.1)}, {"w": "a", "b": "typo"})
        with pytest.raises(ValueError, match="typo"):
            tx.init({"w": jnp.ones(1), "b": jnp.ones(1)})

    def test_apply_updates_keeps_dtypes(self):
        params = {"f32": jnp.ones(3), "bf16": jnp.ones(3, jnp.bfloat16)}
        updates = {"f32": jnp.full(3, 0.5), "bf16": jnp.full(3, 0.5, jnp.float32)}
        new = sgdjax.apply_updates(params, updates)
        chex.assert_trees_all_equal_dtypes(new, params)
        np.testing.assert_allclose(np.asarray(new["bf16"], np.float32), 1.5)


# ---------------------------------------------------------------- flat buffers


class TestFlatten(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_flatten_equals_per_leaf_updates(self):
        rng = np.random.default_rng(9)
        params = _random_tree(rng)
        grads = [_random_tree(rng) for _ in range(NUM_STEPS)]

        def make():
            return sgdjax.chain(
                sgdjax.clip_by_global_norm(1.0),
                sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
            )

        ours = _run(sgdjax.flatten(make()), params, grads, variant=self.variant)
        reference = _run(make(), params, grads, variant=self.variant)
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


def test_apply_updates_keeps_params_where_updates_are_none():
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    new = sgdjax.apply_updates(params, {"w": jnp.ones(2), "b": None})
    np.testing.assert_array_equal(new["w"], 2.0)
    np.testing.assert_array_equal(new["b"], 1.0)
