"""Checkpoints that never lose work: refusals, unreadable checkpoints, changed configs,
mid-epoch steps, and the preemption guard."""

import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import newest_checkpoint

import sgdjax
from sgdjax.training import ConvNet, TrainState
from sgdjax.training._checkpoint import (
    Checkpointer,
    CheckpointError,
    ConfigChangedError,
    config_differences,
)
from sgdjax.training._preemption import PREEMPTED_EXIT_STATUS, PreemptionGuard
from sgdjax.training._rundir import read_jsonl

CONFIG = {"seed": 0, "learning_rate": 0.1, "epochs": 2, "model": "convnet"}


def _state(seed=0, widths=(4, 4), ema=False):
    return TrainState.create(
        model=ConvNet(widths=widths),
        tx=sgdjax.sgd(0.1, momentum=0.9),
        rng=jax.random.key(seed),
        sample_input=jnp.zeros((1, 32, 32, 3)),
        ema=ema,
    )


def _stepped(state, steps):
    """``state`` with its step, parameters and key changed as training would."""
    return state.replace(
        step=state.step + steps,
        params=jax.tree.map(lambda x: x + 0.5 * steps, state.params),
        rng=jax.random.fold_in(state.rng, steps),
    )


@pytest.fixture
def checkpoints(tmp_path):
    manager = Checkpointer(tmp_path / "checkpoints")
    yield manager
    manager.close()


def test_a_mid_epoch_checkpoint_is_named_by_step_and_records_the_epoch(checkpoints):
    state = _stepped(_state(ema=True), 7)  # step 7: epoch 3 of 3-step epochs, 1 step in
    checkpoints.save(7, state, CONFIG, epoch=2)
    assert Checkpointer.saved_steps(checkpoints.directory) == [7]
    restored = checkpoints.restore_latest(_state(seed=1, ema=True), config=CONFIG)
    assert restored.epoch == 2 and int(restored.state.step) == 7
    assert "step 7 (epoch 2)" in restored.note
    chex.assert_trees_all_equal(restored.state.params, state.params)
    chex.assert_trees_all_equal(restored.state.ema, state.ema)
    np.testing.assert_array_equal(
        jax.random.key_data(restored.state.rng), jax.random.key_data(state.rng)
    )
    assert restored.config == CONFIG


def test_a_save_orbax_would_skip_is_an_error_naming_step_and_folder(checkpoints):
    state = _state()
    checkpoints.save(5, state, CONFIG)
    with pytest.raises(CheckpointError, match=r"step 3 in .*checkpoints.*\[5\] already exist"):
        checkpoints.save(3, state, CONFIG)
    with pytest.raises(CheckpointError, match="step 5 in"):
        checkpoints.save(5, state, CONFIG)
    (checkpoints.directory / "99").mkdir()  # a stray folder
    with pytest.raises(CheckpointError, match=r"step 6 .*\[99\]"):
        checkpoints.save(6, state, CONFIG)


def test_an_orbax_failure_is_an_error_naming_step_and_folder(checkpoints, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints._manager, "save", fail)
    with pytest.raises(CheckpointError, match=r"step 4 in .*checkpoints failed: OSError.*space"):
        checkpoints.save(4, _state(), CONFIG)


def _corrupt(folder):
    for path in folder.rglob("*"):
        if path.is_file() and "CHECKPOINT_METADATA" not in path.name:
            path.write_bytes(b"\0garbage")


def test_a_newer_unreadable_checkpoint_is_moved_aside_and_named(checkpoints, capsys):
    checkpoints.save(3, _stepped(_state(), 3), CONFIG, epoch=1)
    checkpoints.save(6, _stepped(_state(), 6), CONFIG, epoch=2)
    _corrupt(checkpoints.directory / "6")
    (checkpoints.directory / "9").mkdir()  # a stray, empty step folder
    restored = checkpoints.restore_latest(_state(), config=CONFIG)
    assert int(restored.state.step) == 3 and restored.epoch == 1
    assert "moved unreadable checkpoint(s) aside" in restored.note
    assert "6.unreadable" in restored.note and "9.unreadable" in restored.note
    assert sorted(p.name for p in checkpoints.directory.iterdir()) == [
        "3", "6.unreadable", "9.unreadable",
    ]  # fmt: skip
    # Nothing at or beyond the next steps is left to make orbax refuse them.
    checkpoints.save(6, _stepped(_state(), 6), CONFIG, epoch=2)
    checkpoints.save(9, _stepped(_state(), 9), CONFIG, epoch=3)
    assert Checkpointer.saved_steps(checkpoints.directory) == [3, 6, 9]
    _corrupt(checkpoints.directory / "9")
    restored = checkpoints.restore_latest(_state(), config=CONFIG)
    assert int(restored.state.step) == 6 and "9.unreadable-2" in restored.note


def test_no_readable_checkpoint_at_all_starts_from_scratch_and_says_so(checkpoints, capsys):
    checkpoints.save(2, _state(), CONFIG)
    _corrupt(checkpoints.directory / "2")
    assert checkpoints.restore_latest(_state(), config=CONFIG) is None
    assert "no readable checkpoint" in capsys.readouterr().out
    assert (checkpoints.directory / "2.unreadable").is_dir()


def test_a_changed_config_is_an_error_listing_the_differences(checkpoints):
    checkpoints.save(4, _state(), CONFIG)
    changed = dict(CONFIG, learning_rate=0.2, epochs=5, seed=3)
    with pytest.raises(ConfigChangedError) as caught:
        checkpoints.restore_latest(_state(), config=changed)
    message = str(caught.value)
    assert "learning_rate: 0.1 -> 0.2" in message and "seed: 0 -> 3" in message
    assert "epochs" not in message and "--accept-config-changes" in message
    assert "\n" not in message
    assert Checkpointer.saved_steps(checkpoints.directory) == [4]  # nothing moved
    restored = checkpoints.restore_latest(_state(), config=changed, accept_config_changes=True)
    assert "accepted config changes: learning_rate: 0.1 -> 0.2; seed: 0 -> 3" in restored.note
    # The one change allowed by default: more epochs.
    restored = checkpoints.restore_latest(_state(), config=dict(CONFIG, epochs=10))
    assert "accepted" not in restored.note


def test_an_accepted_change_that_does_not_fit_is_an_error_and_moves_nothing(checkpoints):
    checkpoints.save(4, _state(), CONFIG)
    wider = dict(CONFIG, model="wider")
    with pytest.raises(CheckpointError, match="does not fit the changed config"):
        checkpoints.restore_latest(_state(widths=(8, 4)), config=wider, accept_config_changes=True)
    assert Checkpointer.saved_steps(checkpoints.directory) == [4]


def test_config_differences_normalises_through_json():
    assert config_differences({"widths": [4, 4]}, {"widths": (4, 4)}) == []
    assert config_differences({"a": 1}, {"a": 1, "new_field": 2}) == []  # older checkpoint
    assert config_differences({"epochs": 1}, {"epochs": 2}, ignore=()) == ["epochs: 1 -> 2"]


def test_the_preemption_guard_turns_signals_into_a_flag_and_restores_handlers():
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        signal.raise_signal(signal.SIGINT)
        assert guard.requested and guard.signal_name == "SIGINT"
        assert guard.should_stop() and guard.should_stop(agree=lambda flag: flag)
        assert not guard.should_stop(agree=lambda flag: False)
    assert {number: signal.getsignal(number) for number in before} == before
    assert PREEMPTED_EXIT_STATUS == 75


def test_a_second_signal_gives_up_at_once():
    # Python's own SIGINT handler beforehand, whatever an earlier test in this worker left
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with PreemptionGuard() as guard:
                signal.raise_signal(signal.SIGTERM)
                assert guard.requested
                signal.raise_signal(signal.SIGINT)  # back to Python's handler: raises
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_the_guard_rejects_signals_it_cannot_handle():
    with pytest.raises(ValueError, match="signals must be"):
        PreemptionGuard(signals=(signal.SIGKILL,))


# ---------------------------------------------------------------- the engine, end to end


def _dataset():
    from sgdjax import data

    generator = np.random.default_rng(0)
    return data.Dataset(
        generator.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8),
        generator.integers(0, 10, 80).astype(np.int32),
        generator.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        generator.integers(0, 10, 20).astype(np.int32),
        tuple(f"class{i}" for i in range(10)),
    )


TINY = dict(batch_size=16, epochs=2, widths=(4, 8), checkpoint_every_steps=3, steps_per_call=1)


def _without_timings(rows):
    timing = ("epoch_seconds", "images_per_second", "train_loss", "train_accuracy")
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


@pytest.fixture(scope="module")
def engine():
    from sgdjax.training import Config, Engine

    notes = []
    built = Engine(Config(**TINY), _dataset(), log=notes.append)
    built.notes = notes
    return built


@pytest.fixture(scope="module")
def uninterrupted(engine, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    engine.run(0, workdir, progress=False)
    return workdir


@pytest.mark.parametrize("stop_at", [4, 7], ids=["epoch-1-step-4", "epoch-2-step-2"])
def test_sigterm_mid_epoch_saves_and_resumes_to_the_bit(engine, uninterrupted, tmp_path, stop_at):
    """A real SIGTERM, sent during program call ``stop_at``: the run saves that step,
    raises Preempted, and --resume ends bit-identical to a run never stopped."""
    from sgdjax.training import Preempted

    programs = engine._train_programs
    original = programs[1]
    calls = []

    def signalling(*args):
        calls.append(1)
        if len(calls) == stop_at:
            signal.raise_signal(signal.SIGTERM)
        return original(*args)

    programs[1] = signalling
    try:
        with pytest.raises(Preempted, match=f"SIGTERM at step {stop_at} .*--resume") as caught:
            engine.run(0, tmp_path, progress=False)
    finally:
        programs[1] = original
    assert caught.value.step == stop_at
    assert stop_at in Checkpointer.saved_steps(tmp_path / "checkpoints")
    assert not (tmp_path / ".lock").exists()  # released on the way out
    # Damage metrics.jsonl as a crash and a stranger would: a foreign row, a cut line.
    with open(tmp_path / "metrics.jsonl", "a") as stream:
        stream.write('{"other": 1}\n{"epoch": 2, "tr')
    engine.notes.clear()
    summary = engine.run(0, tmp_path, resume=True, progress=False)
    dropped = [note for note in engine.notes if "metrics.jsonl: dropped" in note]
    assert len(dropped) == 1 and "not a metrics row" in dropped[0] and "not JSON" in dropped[0]
    assert summary["steps"] == 10
    like = engine._initial_state(0)
    step, resumed = newest_checkpoint(tmp_path, like)
    reference_step, reference = newest_checkpoint(uninterrupted, like)
    assert step == reference_step == 10
    chex.assert_trees_all_equal(resumed, reference)  # bit for bit, keys and counters too
    rows, _ = read_jsonl(tmp_path / "metrics.jsonl")
    reference_rows, _ = read_jsonl(uninterrupted / "metrics.jsonl")
    assert _without_timings(rows) == _without_timings(reference_rows)


def test_resume_refuses_a_changed_config_and_keeps_the_old_outputs(engine, uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigChangedError, match=r"seed: 0 -> 1.*--accept-config-changes"):
        engine.run(1, tmp_path, resume=True, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert Checkpointer.saved_steps(tmp_path / "checkpoints") == [6, 9, 10]


def test_a_second_writer_on_the_same_out_is_refused(engine, tmp_path):
    from sgdjax.training import RunDirectoryLocked, RunLock

    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryLocked, match="is in use by process"):
            engine.run(0, tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
