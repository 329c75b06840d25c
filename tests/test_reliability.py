"""Reliability: corrupted checkpoints, non-finite steps, reproducibility by seed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgdjax
from sgdjax import data, training

TIMING_KEYS = {"epoch_seconds", "images_per_second"}


def _dataset(n_train=64, n_test=32, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return data.Dataset(
        rng.integers(0, 256, (n_train, 32, 32, 3)).astype(dtype),
        rng.integers(0, 10, n_train).astype(np.int32),
        rng.integers(0, 256, (n_test, 32, 32, 3)).astype(dtype),
        rng.integers(0, 10, n_test).astype(np.int32),
        tuple(str(i) for i in range(10)),
    )


def _config(**overrides):
    values = dict(epochs=2, batch_size=16, schedule="cosine", learning_rate=0.02)
    values.update(overrides)
    return training.Config(**values)


def _metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_same_seed_same_metrics_and_different_seeds_differ(tmp_path):
    dataset = _dataset()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        training.train_and_evaluate(
            _config(seed=seed), tmp_path / name, progress=False, dataset=dataset
        )
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert _metrics(tmp_path / "a") != _metrics(tmp_path / "c")


def test_corrupt_newest_checkpoint_falls_back_to_the_last_good_one(tmp_path, capsys):
    dataset = _dataset()
    training.train_and_evaluate(_config(), tmp_path, progress=False, dataset=dataset)
    newest = tmp_path / "checkpoints" / "8"  # named by global step: 4 steps an epoch
    damaged = 0
    for file in newest.rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"\0" * 7)
            damaged += 1
    assert damaged
    training.train_and_evaluate(
        _config(epochs=3), tmp_path, resume=True, progress=False, dataset=dataset
    )
    output = capsys.readouterr().out
    assert "resuming from the checkpoint of step 4 (epoch 1)" in output
    assert "moved unreadable checkpoint(s) aside: step 8" in output
    assert [row["epoch"] for row in _metrics(tmp_path)] == [1, 2, 3]


def test_non_finite_step_is_skipped_and_counted():
    tx = sgdjax.skip_non_finite(sgdjax.sgd(0.05, momentum=0.9))
    state = training.TrainState.create(
        model=training.ConvNet(), tx=tx, rng=jax.random.key(0),
        sample_input=jnp.zeros((1, 32, 32, 3)),
    )  # fmt: skip
    step = training.make_train_step(donate=False)
    images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    labels = np.zeros(8, np.int32)
    poisoned = images.copy()
    poisoned[3, 5, 5, 1] = np.nan
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, {"image": poisoned, "label": labels})
    assert not np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.params))
    assert int(state.opt_state.skipped_steps) == 1
    state, _ = step(state, {"image": images, "label": labels})
    assert int(state.opt_state.consecutive_skipped) == 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))


def test_run_stops_after_too_many_non_finite_steps(tmp_path):
    dataset = _dataset(dtype=np.float32)
    poisoned = dataset._replace(train_images=np.full_like(dataset.train_images, np.nan))
    with pytest.raises(training.NonFiniteError, match="3 steps in a row had non-finite"):
        training.train_and_evaluate(
            _config(max_bad_steps=3, epochs=1), tmp_path, progress=False, dataset=poisoned
        )


def test_a_second_run_on_a_locked_folder_is_refused_before_placing_data_or_compiling(
    tmp_path, monkeypatch, capsys
):
    """The lock is the first thing a run takes: a held one refuses the run at once."""
    import time

    from helpers import load_script, write_image_folder

    write_image_folder(tmp_path / "data", train_per_class=2, test_per_class=1)
    work = []
    monkeypatch.setattr(training.Engine, "_place_data", lambda self: work.append("placed"))
    monkeypatch.setattr(training.Engine, "_compile", lambda self: work.append("compiled"))
    cli = load_script("cifar")
    argv = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--widths",
            "4", "8", "--batch-size", "4", "--epochs", "1", "--no-progress"]  # fmt: skip
    with training.RunLock(tmp_path / "run"):  # a live writer (this process) holds --out
        start = time.monotonic()
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        elapsed = time.monotonic() - start
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is in use by process" in error[0], error
    assert work == [] and elapsed < 5.0, (work, elapsed)
    engine = training.Engine(_config(epochs=1), _dataset())  # the library's way in
    with training.RunLock(tmp_path / "run"), pytest.raises(training.RunDirectoryLocked):
        engine.run(0, tmp_path / "run", progress=False)
    assert work == []
