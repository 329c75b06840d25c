"""sgdjax/_combine.py: chain, named_chain, masked, multi_transform, inject_hyperparams
and apply_updates.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import check_against_reference, random_tree, run_transform, sgd_reference

import sgdjax


class TestCombine(chex.TestCase):
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
        params = random_tree(rng)
        grads = [random_tree(rng) for _ in range(5)]
        mixed_a = sgdjax.chain(
            optax.clip_by_global_norm(1.0), sgdjax.momentum(0.9), optax.scale(-0.1)
        )
        mixed_b = optax.chain(sgdjax.clip_by_global_norm(1.0), optax.trace(0.9), sgdjax.scale(-0.1))
        pure = optax.chain(optax.clip_by_global_norm(1.0), optax.trace(0.9), optax.scale(-0.1))
        runs = [
            run_transform(tx, params, grads, variant=jax.jit) for tx in (mixed_a, mixed_b, pure)
        ]
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
        decay_ref = sgd_reference(0.05, mu=0.9, wd=0.1)
        bias_ref = sgd_reference(0.5, mu=0.9)

        def reference(g, p, t):
            out = decay_ref({k: g[k] for k in ("dense", "conv")}, p, t)
            out.update(bias_ref({"bias": g["bias"]}, p, t))
            out["scale"] = 0.0 * g["scale"]
            return out

        check_against_reference(tx, reference, variant=self.variant)

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


def test_apply_updates_keeps_params_where_updates_are_none():
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    new = sgdjax.apply_updates(params, {"w": jnp.ones(2), "b": None})
    np.testing.assert_array_equal(new["w"], 2.0)
    np.testing.assert_array_equal(new["b"], 1.0)


# ---------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_accepts_a_single_static_name():
    factory = sgdjax.inject_hyperparams(sgdjax.sgdw, static_args="mask")
    tx = factory(0.1, momentum=0.9, weight_decay=1e-2, mask={"w": True, "b": False})
    state = tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})
    assert "mask" not in state.hyperparams and "learning_rate" in state.hyperparams
    tx = sgdjax.inject_hyperparams(sgdjax.sgd, static_args="momentum")(0.1, momentum=0.9)
    assert "momentum" not in tx.init(jnp.ones(2)).hyperparams
    with pytest.raises(ValueError, match=r"static_args names \['moment'\]"):
        sgdjax.inject_hyperparams(sgdjax.sgd, static_args="moment")
    # norm_type chooses the computation: always static, never injected
    tx = sgdjax.inject_hyperparams(sgdjax.clip_by_global_norm)(1.0, norm_type=1)
    state = tx.init(jnp.ones(2))
    assert set(state.hyperparams) == {"max_norm"}
    chex.assert_trees_all_close(tx.update(jnp.full(2, 3.0), state)[0], jnp.full(2, 0.5))
