"""The public API: exports, docstrings, import hygiene, argument validation."""

import inspect
import math
import subprocess
import sys

import pytest

import sgdjax
from sgdjax import schedules

TYPE_ALIASES = {"ScalarOrSchedule", "Schedule"}


@pytest.mark.parametrize("module", [sgdjax, schedules], ids=["sgdjax", "schedules"])
def test_exports_are_sorted_unique_and_documented(module):
    names = module.__all__
    assert names == sorted(names) and len(set(names)) == len(names)
    for name in names:
        obj = getattr(module, name)
        if name in TYPE_ALIASES:
            continue
        assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_training_and_data_exports_are_documented():
    from sgdjax import data, training

    for module in (data, training):
        assert module.__all__ == sorted(module.__all__)
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, dict):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_core_imports_only_jax_numpy_and_optax():
    code = (
        "import sys, sgdjax, sgdjax.schedules\n"
        "heavy = ['flax', 'tensorflow_datasets', 'PIL', 'orbax', 'tqdm', 'matplotlib', 'torch']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


BAD = [
    (lambda: sgdjax.sgd(-0.1), "learning_rate", "-0.1"),
    (lambda: sgdjax.sgd(math.nan), "learning_rate", "nan"),
    (lambda: sgdjax.sgd(0.1, momentum=1.0), "momentum", "1.0"),
    (lambda: sgdjax.sgd(0.1, momentum=-0.1), "momentum", "-0.1"),
    (lambda: sgdjax.sgd(0.1, momentum=0.9, dampening=1.5), "dampening", "1.5"),
    (lambda: sgdjax.sgd(0.1, nesterov=True), "momentum", "0.0"),
    (lambda: sgdjax.sgd(0.1, momentum=0.9, dampening=0.5, nesterov=True), "dampening", "0.5"),
    (lambda: sgdjax.sgd(0.1, weight_decay=-1.0), "weight_decay", "-1.0"),
    (lambda: sgdjax.sgdw(0.1, weight_decay=math.inf), "weight_decay", "inf"),
    (lambda: sgdjax.momentum(1.5), "momentum", "1.5"),
    (lambda: sgdjax.clip(0.0), "max_delta", "0.0"),
    (lambda: sgdjax.clip_by_norm(0.0), "max_norm", "0.0"),
    (lambda: sgdjax.clip_by_global_norm(-1.0), "max_norm", "-1.0"),
    (lambda: sgdjax.adaptive_grad_clip(0.0), "clipping", "0.0"),
    (lambda: sgdjax.add_decayed_weights(-1e-4), "weight_decay", "-0.0001"),
    (lambda: sgdjax.decoupled_weight_decay(1e-4, -1.0), "learning_rate", "-1.0"),
    (lambda: sgdjax.scale_by_learning_rate(math.inf), "learning_rate", "inf"),
    (lambda: sgdjax.scale(math.nan), "step_size", "nan"),
]


@pytest.mark.parametrize("make, argument, value", BAD, ids=[f"{b[1]}={b[2]}" for b in BAD])
def test_bad_hyperparameters_name_argument_and_value(make, argument, value):
    with pytest.raises(ValueError) as raised:
        make()
    message = str(raised.value)
    assert argument in message and value in message, message


def test_injected_hyperparameters_are_not_checked_while_tracing():
    import jax
    import jax.numpy as jnp

    tx = sgdjax.inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9, dampening=0.1)
    state = jax.jit(tx.init)({"w": jnp.ones(2)})
    updates, _ = jax.jit(tx.update)({"w": jnp.ones(2)}, state, {"w": jnp.ones(2)})
    assert updates["w"].shape == (2,)
