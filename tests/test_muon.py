"""``sgdjax.muon`` against ``torch.optim.Muon`` (its rule evaluated in float32), a float64
numpy reference, and ``optax.contrib``'s Newton-Schulz iteration."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from optax.contrib._muon import orthogonalize_via_newton_schulz
from torch.optim import _muon as torch_muon

import sgdjax
from sgdjax._muon import _newton_schulz

NUM_STEPS = 20
SHAPES = {"tall": (12, 5), "wide": (4, 9), "square": (6, 6), "vector_like": (1, 7)}
COEFFICIENTS = (3.4445, -4.775, 2.0315)


def _newton_schulz_float32(grad, ns_coefficients, ns_steps, eps):
    """torch's ``_zeropower_via_newtonschulz`` line for line, in float32, not bfloat16."""
    a, b, c = ns_coefficients
    ortho_grad = grad.to(torch.float32, copy=True)  # like .bfloat16(), a copy
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


@pytest.fixture
def torch_in_float32(monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _newton_schulz_float32)


def _matrices(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _gradient_sequence(params, seed, num_steps=NUM_STEPS):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
            for _ in range(num_steps)]  # fmt: skip


def _torch_muon(params, grads, **kwargs):
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    optimizer = torch.optim.Muon(list(tensors.values()), **kwargs)
    history = []
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.from_numpy(g[k].copy())
        optimizer.step()
        history.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return history


def _reference_muon(params, grads, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                    ns_steps=5, eps=1e-7, adjust_lr_fn=None):  # fmt: skip
    """The docstring's rule in float64."""
    a, b, c = COEFFICIENTS
    theta = {k: v.astype(np.float64) for k, v in params.items()}
    buffers = {k: np.zeros_like(v) for k, v in theta.items()}
    history = []
    for g in grads:
        for k in theta:
            grad = g[k].astype(np.float64)
            buffers[k] = momentum * buffers[k] + (1 - momentum) * grad
            m = grad + momentum * (buffers[k] - grad) if nesterov else buffers[k]
            x = m.T if m.shape[0] > m.shape[1] else m
            x = x / max(np.linalg.norm(x), eps)
            for _ in range(ns_steps):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if m.shape[0] > m.shape[1] else x
            rows, cols = m.shape
            if adjust_lr_fn == "match_rms_adamw":
                ratio = 0.2 * math.sqrt(max(rows, cols))
            else:
                ratio = math.sqrt(max(1, rows / cols))
            theta[k] = theta[k] * (1 - lr * weight_decay) - lr * ratio * x
        history.append(dict(theta))
    return history


CASES = {
    "defaults": dict(lr=0.02),
    "heavy_ball_no_decay": dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False),
    "match_rms_adamw": dict(lr=0.01, weight_decay=0.05, adjust_lr_fn="match_rms_adamw"),
    "three_steps_original": dict(lr=0.03, ns_steps=3, adjust_lr_fn="original", momentum=0.5),
}


def _ours(lr=1e-3, **kwargs):
    return sgdjax.muon(lr, **kwargs)


# The iteration multiplies rounding differences by up to ~|a|^steps on small singular
# values; float32 matmuls summed in another order than torch's stay within this.
RTOL, ATOL = 2e-5, 2e-6


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_muon_matches_torch_in_float32_and_the_float64_rule(name, jit, torch_in_float32):
    kwargs = CASES[name]
    params = _matrices(sorted(CASES).index(name))
    grads = _gradient_sequence(params, seed=10 + sorted(CASES).index(name))
    theirs = _torch_muon(params, grads, **kwargs)
    reference = _reference_muon(params, grads, **kwargs)
    tx = _ours(**kwargs)
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    update = jax.jit(tx.update) if jit else tx.update
    for step, g in enumerate(grads):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = sgdjax.apply_updates(ours, updates)
        chex.assert_trees_all_close(ours, theirs[step], rtol=RTOL, atol=ATOL,
                                    custom_message=f"{name} step {step} vs torch")  # fmt: skip
        chex.assert_trees_all_close(ours, reference[step], rtol=RTOL, atol=ATOL,
                                    custom_message=f"{name} step {step} vs float64")  # fmt: skip


def test_flax_layout_is_torch_on_the_transpose_and_kernels_flatten(torch_in_float32):
    """A Flax kernel (in, out) is torch's weight transposed; conv kernels flatten HWI x O."""
    params = _matrices(3)
    grads = _gradient_sequence(params, seed=4)
    theirs = _torch_muon(params, grads, lr=0.02)
    transposed = {k: jnp.asarray(v.T) for k, v in params.items()}
    conv = jnp.asarray(np.random.default_rng(5).normal(size=(3, 3, 2, 4)), jnp.float32)
    conv_grads = np.random.default_rng(6).normal(size=(NUM_STEPS, 3, 3, 2, 4)).astype(np.float32)
    tx = sgdjax.muon(0.02, matrix_layout="in_out")
    state = tx.init({**transposed, "conv": conv})
    flat_tx = sgdjax.muon(0.02, matrix_layout="in_out")
    flat = conv.reshape(18, 4)
    flat_state = flat_tx.init(flat)
    update, flat_update = jax.jit(tx.update), jax.jit(flat_tx.update)
    for step, g in enumerate(grads):
        g = {**{k: jnp.asarray(v.T) for k, v in g.items()}, "conv": jnp.asarray(conv_grads[step])}
        tree = {**transposed, "conv": conv}
        updates, state = update(g, state, tree)
        tree = sgdjax.apply_updates(tree, updates)
        conv, transposed = tree.pop("conv"), tree
        chex.assert_trees_all_close({k: v.T for k, v in transposed.items()}, theirs[step],
                                    rtol=RTOL, atol=ATOL)  # fmt: skip
        flat_updates, flat_state = flat_update(g["conv"].reshape(18, 4), flat_state, flat)
        flat = sgdjax.apply_updates(flat, flat_updates)
        chex.assert_trees_all_close(conv.reshape(18, 4), flat, rtol=1e-6, atol=1e-7)


def test_bfloat16_iteration_follows_torch_bfloat16():
    """The bfloat16 option against torch's own (bfloat16) Muon, products rounded alike.

    (bfloat16 against float32 differs by about 1e-2; ours against torch's by about 1e-5.)
    """
    params = _matrices(7, {"w": (16, 8), "v": (8, 24)})
    grads = _gradient_sequence(params, seed=8, num_steps=3)
    theirs = _torch_muon(params, grads, lr=0.02)
    tx = sgdjax.muon(0.02, ns_dtype=jnp.bfloat16)
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    for step, g in enumerate(grads):
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, ours)
        chex.assert_trees_all_equal_dtypes(updates, ours)
        ours = sgdjax.apply_updates(ours, updates)
        for k in ours:
            moved_ours, moved_theirs = ours[k] - params[k], theirs[step][k] - params[k]
            error = np.linalg.norm(moved_ours - moved_theirs) / np.linalg.norm(moved_theirs)
            assert error < 1e-3, (k, step, error)


def test_newton_schulz_agrees_with_optax_contrib():
    """Same iteration as optax's (which divides by ||X|| + eps instead of max(||X||, eps))."""
    rng = np.random.default_rng(9)
    for shape in [(5, 5), (3, 8), (9, 4)]:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        ours = _newton_schulz(x, COEFFICIENTS, 5, 1e-7, jnp.float32)
        theirs = orthogonalize_via_newton_schulz(x, jnp.asarray(COEFFICIENTS), 5, eps=1e-7)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_muon_and_sgd_split_matches_torch_muon_and_sgd(torch_in_float32):
    """The usual split: Muon on the matrices, torch SGD on the biases and scales."""
    rng = np.random.default_rng(11)
    shapes = {"dense1": (6, 10), "bias1": (6,), "dense2": (3, 6), "bias2": (3,), "scale": ()}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(NUM_STEPS)]  # fmt: skip
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    matrices = [t for t in tensors.values() if t.ndim == 2]
    others = [t for t in tensors.values() if t.ndim != 2]
    muon_opt = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.01)
    sgd_opt = torch.optim.SGD(others, lr=0.1, momentum=0.9, nesterov=True)
    tx = sgdjax.multi_transform(
        {"muon": sgdjax.muon(0.02, weight_decay=0.01),
         "sgd": sgdjax.sgd(0.1, momentum=0.9, nesterov=True)},
        lambda tree: jax.tree.map(lambda p: "muon" if p.ndim == 2 else "sgd", tree),
    )  # fmt: skip
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    update = jax.jit(tx.update)
    for step, g in enumerate(grads):
        for k, t in tensors.items():
            t.grad = torch.from_numpy(np.array(g[k]))
        muon_opt.step()
        sgd_opt.step()
        updates, state = update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = sgdjax.apply_updates(ours, updates)
        theirs = {k: t.detach().numpy() for k, t in tensors.items()}
        chex.assert_trees_all_close(ours, theirs, rtol=RTOL, atol=ATOL,
                                    custom_message=f"step {step}")  # fmt: skip


def test_golden_first_step():
    # One step on a 1 x 2 matrix g = [3, 4] with momentum 0.5, no Nesterov, no decay:
    # B = 0.5 g = [1.5, 2]; X = B / 2.5 = [0.6, 0.8] (unit norm, so X X^T = 1 and one
    # iteration gives (a + b + c) X = 0.701 X); r = sqrt(max(1, 1 / 2)) = 1;
    # theta = 0 - 0.1 * 0.701 * [0.6, 0.8].
    tx = sgdjax.muon(0.1, weight_decay=0.0, momentum=0.5, nesterov=False, ns_steps=1)
    params = jnp.zeros((1, 2))
    updates, _ = tx.update(jnp.asarray([[3.0, 4.0]]), tx.init(params), params)
    np.testing.assert_allclose(updates, -0.1 * 0.701 * np.asarray([[0.6, 0.8]]), rtol=1e-5)


def test_abstract_init_and_shapes():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "k": jnp.ones((3, 3, 2, 4))}
    tx = sgdjax.muon(0.02, matrix_layout="in_out")
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    chex.assert_trees_all_equal_structs(jax.eval_shape(tx.init, shapes), tx.init(params))
    updates, state = jax.jit(tx.update)(params, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_tree_all_finite(state)
    with pytest.raises(ValueError, match=r"at least 2 axes, got shape \(3,\) at \['b'\]"):
        tx.init({"w": jnp.ones((4, 3)), "b": jnp.ones(3)})


BAD = [
    (lambda: sgdjax.muon(-1.0), "learning_rate", "-1.0"),
    (lambda: sgdjax.muon(weight_decay=-0.1), "weight_decay", "-0.1"),
    (lambda: sgdjax.muon(momentum=1.0), "momentum", "1.0"),
    (lambda: sgdjax.muon(ns_coefficients=(1.0, 2.0)), "ns_coefficients", "(1.0, 2.0)"),
    (lambda: sgdjax.muon(ns_coefficients=(1.0, 2.0, math.nan)), "ns_coefficients", "nan"),
    (lambda: sgdjax.muon(eps=0.0), "eps", "0.0"),
    (lambda: sgdjax.muon(ns_steps=100), "ns_steps", "100"),
    (lambda: sgdjax.muon(ns_steps=2.0), "ns_steps", "2.0"),
    (lambda: sgdjax.muon(adjust_lr_fn="rms"), "adjust_lr_fn", "'rms'"),
    (lambda: sgdjax.muon(ns_dtype=jnp.int32), "ns_dtype", "int32"),
    (lambda: sgdjax.muon(matrix_layout="hwio"), "matrix_layout", "'hwio'"),
]


@pytest.mark.parametrize("make, argument, value", BAD, ids=[f"{a}={v}" for _, a, v in BAD])
def test_bad_arguments_name_argument_and_value(make, argument, value):
    with pytest.raises(ValueError) as raised:
        make()
    assert argument in str(raised.value) and value in str(raised.value), str(raised.value)
