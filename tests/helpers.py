"""Shared test helpers: trees, a small problem set, scripts and a tiny image folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CLASSES = tuple(f"class{i}" for i in range(10))
# Three classes (sorted: airplane=0, cat=1, dog=2), 4 training and 2 test images each.
SMALL_FOLDER = dict(classes=("cat", "airplane", "dog"), train_per_class=4, test_per_class=2)


# ---------------------------------------------------------------- scripts and data


def load_script(name: str) -> ModuleType:
    """``experiments/<name>.py`` as a fresh module (the experiments are scripts).

    The module is registered in ``sys.modules`` as ``experiments_<name>`` while it
    runs, since dataclasses look their module up there.
    """
    path = ROOT / "experiments" / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no script experiments/{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_image_folder(
    root: Path,
    classes=CIFAR_CLASSES,
    train_per_class: int = 8,
    test_per_class: int = 4,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random 32x32 RGB PNGs in CIFAR's folder layout, ``root/<split>/<class>/NNNN.png``.

    PNG keeps the pixels exact, so a loader's output can be compared with them.
    Returns ``{split: (images, labels)}`` in load order (classes sorted, label = rank).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    expected = {}
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
                images.append(pixels)
                labels.append(label)
        expected[split] = (np.stack(images), np.asarray(labels, np.int32))
    return expected


def image_batch(n: int = 8, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random uint8 ``size`` x ``size`` RGB images and labels in 0..9."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def train_state(model, tx=None, size: int = 32):
    """A ``TrainState`` of ``model`` for ``size`` x ``size`` images; SGD
    (0.01, momentum 0.9, weight decay 5e-4) unless ``tx`` is given."""
    import sgdjax
    from sgdjax import training

    tx = tx or sgdjax.sgd(0.01, momentum=0.9, weight_decay=5e-4)
    return training.TrainState.create(
        model=model, tx=tx, rng=jax.random.key(0), sample_input=jnp.zeros((1, size, size, 3))
    )


# ---------------------------------------------------------------- transforms against references

# Every core transform is run against a float64 plain-numpy reference loop written
# from the update rule in its docstring, not from its code.

NUM_STEPS = 12
RTOL, ATOL = 2e-5, 2e-6

# A mixed-shape tree: scalar, vector, dense kernel (in, out), conv kernel HWIO.
SHAPES = {"scale": (), "bias": (5,), "dense": (6, 4), "conv": (3, 3, 2, 4)}


def random_tree(rng, scale=1.0):
    """A float64 numpy tree of ``SHAPES`` with normal entries times ``scale``."""
    return {name: (scale * rng.normal(size=shape)) for name, shape in SHAPES.items()}


def as_float32(tree):
    """The tree as float32 JAX arrays."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def run_transform(tx, params, grads_sequence, *, variant, evolve=True):
    """Runs ``tx`` and returns its updates and params per step (as float64 numpy)."""
    import sgdjax

    params = as_float32(params)
    state = tx.init(params)

    @variant
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return updates, state, sgdjax.apply_updates(params, updates)

    updates_out, params_out = [], []
    for grads in grads_sequence:
        updates, state, new_params = step(as_float32(grads), state, params)
        if evolve:
            params = new_params
        updates_out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), updates))
        params_out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
    return updates_out, params_out


def apply_steps(tx, params, grads_sequence, *, jit=True):
    """``tx`` applied to ``params`` for each gradient tree in turn (float32, no casts).

    Returns the final params, the final state and the params after every step.
    """
    import sgdjax

    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return sgdjax.apply_updates(params, updates), state

    if jit:
        step = jax.jit(step)
    trajectory = []
    for grads in grads_sequence:
        params, state = step(params, state, grads)
        trajectory.append(params)
    return params, state, trajectory


def reference_run(step_fn, params, grads_sequence, *, evolve=True):
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


def check_against_reference(
    tx, reference_step, *, variant, seed=0, evolve=True, grads_sequence=None
):
    """``tx`` and the numpy ``reference_step`` on the same random params and gradients
    (``NUM_STEPS`` of them unless given) agree to ``RTOL``, ``ATOL``."""
    import chex

    rng = np.random.default_rng(seed)
    params = random_tree(rng)
    if grads_sequence is None:
        grads_sequence = [random_tree(rng) for _ in range(NUM_STEPS)]
    ours = run_transform(tx, params, grads_sequence, variant=variant, evolve=evolve)
    theirs = reference_run(reference_step, params, grads_sequence, evolve=evolve)
    chex.assert_trees_all_close(ours, theirs, rtol=RTOL, atol=ATOL)


def sgd_reference(lr, mu=0.0, tau=0.0, nesterov=False, wd=0.0, maximize=False, decoupled=0.0):
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


# ---------------------------------------------------------------- trees and problems


def mixed_tree(dtype=jnp.float32, seed: int = 0) -> dict[str, Any]:
    """Scalar, vector, dense kernel, conv kernel (HWIO) and a nested tuple/list.

    Complex dtypes get a random imaginary part too.
    """
    rng = np.random.default_rng(seed)
    is_complex = jnp.issubdtype(dtype, jnp.complexfloating)

    def leaf(*shape):
        value = rng.normal(size=shape)
        if is_complex:
            value = value + 1j * rng.normal(size=shape)
        return jnp.asarray(value, dtype)

    return {
        "scale": leaf(),
        "bias": leaf(7),
        "dense": leaf(5, 3),
        "conv": leaf(3, 3, 2, 4),
        "nested": (leaf(2, 2), [leaf(4), leaf(1, 6)]),
    }


@dataclasses.dataclass(frozen=True)
class Problem:
    """A loss to minimise from ``init_params``, and a check of the result."""

    name: str
    init_params: Any
    loss: Callable[[Any], jax.Array]
    solved: Callable[[Any], bool]


def quadratic() -> Problem:
    """An ill-conditioned bowl 0.5 (x - c)^T diag(h) (x - c), condition number 50."""
    h = jnp.asarray([1.0, 5.0, 20.0, 50.0])
    center = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    return Problem(
        "quadratic",
        {"x": jnp.zeros(4)},
        lambda p: 0.5 * jnp.sum(h * (p["x"] - center) ** 2),
        lambda p: float(jnp.linalg.norm(p["x"] - center)) < 1e-3,
    )


def rosenbrock() -> Problem:
    """(1 - x)^2 + 100 (y - x^2)^2 from (-1.2, 1); minimum at (1, 1)."""
    return Problem(
        "rosenbrock",
        {"xy": jnp.asarray([-1.2, 1.0])},
        lambda p: (1.0 - p["xy"][0]) ** 2 + 100.0 * (p["xy"][1] - p["xy"][0] ** 2) ** 2,
        lambda p: float(jnp.linalg.norm(p["xy"] - 1.0)) < 1e-2,
    )


def logistic_regression() -> Problem:
    """Generated, nearly separable two-class data in 5 dimensions (fixed seed)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    w_true = np.asarray([2.0, -1.0, 0.5, 0.0, 1.5], np.float32)
    y = (x @ w_true + 0.1 * rng.normal(size=400) > 0).astype(np.float32)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)

    def solved(p):
        accuracy = float(jnp.mean(((x @ p["w"] + p["b"]) > 0) == (y > 0.5)))
        return accuracy >= 0.95 and float(loss(p)) < 0.2

    return Problem("logistic_regression", {"w": jnp.zeros(5), "b": jnp.zeros(())}, loss, solved)


def complex_quadratic() -> Problem:
    """A complex64 bowl sum_k h_k |z_k - c_k|^2 / 2 over 4 complex numbers, condition 20."""
    h = jnp.asarray([1.0, 4.0, 10.0, 20.0])
    center = jnp.asarray([1.0 + 2.0j, -0.5j, 3.0 - 1.0j, -2.0 + 0.5j], jnp.complex64)
    return Problem(
        "complex_quadratic",
        {"z": jnp.zeros(4, jnp.complex64)},
        lambda p: 0.5 * jnp.sum(h * jnp.abs(p["z"] - center) ** 2),
        lambda p: float(jnp.linalg.norm(p["z"] - center)) < 1e-3,
    )


PROBLEMS = (quadratic, rosenbrock, logistic_regression, complex_quadratic)


def descent_direction(loss: Callable[[Any], jax.Array], params: Any) -> Any:
    """The gradient of a real ``loss``, conjugated for complex leaves (optax's convention).

    ``jax.grad`` of a real function of complex ``z`` returns the conjugate of the
    steepest-ascent direction (``2 conj(z)`` for ``|z|^2``); optimizers expect the
    direction itself (``2 z``), as in optax's own tests.
    """
    return jax.tree.map(jnp.conj, jax.grad(loss)(params))


def minimise(tx, problem: Problem, num_steps: int):
    """Runs ``num_steps`` updates of ``tx`` in one jitted ``lax.scan``; returns params."""
    import sgdjax

    def step(carry, _):
        params, state = carry
        grads = descent_direction(problem.loss, params)
        updates, state = tx.update(grads, state, params)
        return (sgdjax.apply_updates(params, updates), state), None

    @jax.jit
    def run(params):
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)
        return params

    return run(problem.init_params)


def newest_checkpoint(workdir, like):
    """``(step, arrays)`` of the newest checkpoint under ``workdir/checkpoints``, raw,
    bit for bit (restored into the structure of ``like``)."""
    from sgdjax.training import Checkpointer

    checkpoints = Checkpointer(workdir / "checkpoints")
    try:
        step = max(Checkpointer.saved_steps(workdir / "checkpoints"))
        return step, checkpoints.restore_tree(step, like)[0]
    finally:
        checkpoints.close()
