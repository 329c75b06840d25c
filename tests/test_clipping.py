"""sgdjax/_clipping.py: clipping by value, per-leaf norm, global norm and AGC against
a float64 numpy reference, optax and golden values; ``norm_type`` against torch.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from absl.testing import parameterized
from helpers import check_against_reference, mixed_tree, random_tree, run_transform

import sgdjax


def _unit_norms(x):
    if x.ndim <= 1:
        return np.full(x.shape, np.sqrt(np.sum(x**2)))
    axes = tuple(range(x.ndim - 1))
    return np.broadcast_to(np.sqrt(np.sum(x**2, axis=axes, keepdims=True)), x.shape)


class TestClipping(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_clip(self):
        check_against_reference(
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

        check_against_reference(sgdjax.clip_by_norm(1.5), reference, variant=self.variant)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("clipped", 2.0), ("not_clipped", 1e3))
    def test_clip_by_global_norm(self, max_norm):
        def reference(g, p, t):
            norm = math.sqrt(sum(np.sum(v**2) for v in g.values()))
            factor = 1.0 if norm < max_norm else max_norm / norm
            return {k: v * factor for k, v in g.items()}

        check_against_reference(
            sgdjax.clip_by_global_norm(max_norm), reference, variant=self.variant
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_adaptive_grad_clip(self):
        def reference(g, p, t):
            out = {}
            for k, v in g.items():
                max_norm = 0.05 * np.maximum(_unit_norms(p[k]), 1e-3)
                norm = _unit_norms(v)
                out[k] = np.where(norm < max_norm, v, v * max_norm / norm)
            return out

        check_against_reference(sgdjax.adaptive_grad_clip(0.05), reference, variant=self.variant)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("clip", sgdjax.clip(0.3), optax.clip(0.3)),
        ("global_norm", sgdjax.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
        ("agc", sgdjax.adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)),
    )
    def test_equals_optax(self, ours_tx, optax_tx):
        rng = np.random.default_rng(2)
        params = random_tree(rng)
        grads = [random_tree(rng) for _ in range(4)]
        ours = run_transform(ours_tx, params, grads, variant=self.variant)
        theirs = run_transform(optax_tx, params, grads, variant=self.variant)
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


# ---------------------------------------------------------------- norm_type


def _torch_clip(tree, max_norm, norm_type):
    tensors = [torch.tensor(np.asarray(x), dtype=torch.float64) for x in jax.tree.leaves(tree)]
    for t in tensors:
        t.grad = t.detach().clone()
    total = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type=norm_type)
    return float(total), [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, 7.5, float("inf")])
@pytest.mark.parametrize("max_norm", [0.3, 1e4])
def test_clip_by_global_norm_norm_type_equals_torch(norm_type, max_norm):
    tree = mixed_tree(jnp.float32, seed=3)
    total, expected = _torch_clip(tree, max_norm, norm_type)
    assert (total > max_norm) == (max_norm == 0.3)  # one case clips, the other does not
    tx = sgdjax.clip_by_global_norm(max_norm, norm_type=norm_type)
    for update in (tx.update, jax.jit(tx.update)):
        got, _ = update(tree, optax.EmptyState())
        # torch divides by ||g||_p + 1e-6, sgdjax by ||g||_p: 1e-6 / ||g|| relative
        for g, e in zip(jax.tree.leaves(got), expected):
            np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-7)


def test_clip_by_global_norm_norm_type_against_numpy_and_golden_values():
    tree = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([[12.0]])}
    # ||.||_1 = 19, ||.||_2 = 13, ||.||_inf = 12
    for norm_type, norm in ((1, 19.0), (2, 13.0), (float("inf"), 12.0)):
        got, _ = sgdjax.clip_by_global_norm(1.0, norm_type=norm_type).update(tree, None)
        chex.assert_trees_all_close(got, jax.tree.map(lambda x, n=norm: x / n, tree), rtol=1e-6)
    # p = 3: (27 + 64 + 1728) ** (1/3) = 1819 ** (1/3)
    got, _ = sgdjax.clip_by_global_norm(1.0, norm_type=3).update(tree, None)
    chex.assert_trees_all_close(got, jax.tree.map(lambda x: x / 1819 ** (1 / 3), tree), rtol=1e-6)
    # large p does not overflow float32 (100 ** 30 = 1e60)
    big = {"a": jnp.array([100.0, 100.0])}
    got, _ = sgdjax.clip_by_global_norm(1.0, norm_type=30).update(big, None)
    chex.assert_trees_all_close(got, {"a": jnp.full(2, 100.0 / (2 ** (1 / 30) * 100.0))})


@pytest.mark.parametrize("norm_type", [0, -1.0, float("nan"), "2", True])
def test_clip_by_global_norm_rejects_bad_norm_types(norm_type):
    with pytest.raises(ValueError, match="norm_type"):
        sgdjax.clip_by_global_norm(1.0, norm_type=norm_type)
