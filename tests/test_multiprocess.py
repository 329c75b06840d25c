"""Two processes x two CPU devices on 127.0.0.1 against one process with four devices."""

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _multiprocess import ProcessesFailed, run_processes, tiny_training, worker_argv

MODES = ("sharded", "zero", "shard_map", "pmap")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives")
    run_processes(worker_argv("collectives", out), 2, log_dir=out / "logs", timeout=240)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_train_as_one_process_with_four_devices(two_processes, mode):
    expected = jax.tree.leaves(tiny_training(mode))
    for process in (0, 1):
        saved = np.load(two_processes / f"{mode}-{process}.npz")
        got = [saved[f"leaf{i}"] for i in range(len(saved.files))]
        assert len(got) == len(expected)
        *numbers, psum, rows = got
        # A cross-process psum of the rows' indices 0..15, and each process's own rows.
        assert float(psum) == sum(range(16))
        np.testing.assert_array_equal(rows, [8 * process, 8 * process + 8])
        for value, reference in zip(numbers, expected[:-2]):
            np.testing.assert_allclose(value, reference, rtol=2e-6, atol=1e-7)


def test_the_processes_agree_or_all_fail_with_one_line(tmp_path):
    run_processes(worker_argv("checks", tmp_path), 2, log_dir=tmp_path / "logs", timeout=120)
    for process in (0, 1):
        config = (tmp_path / f"config-{process}.txt").read_text()
        assert config == (
            "the processes disagree on the config (process 0 against the others): "
            "process 1: lr=0.1 vs 0.2"
        )
        folder = (tmp_path / f"folder-{process}.txt").read_text()
        assert "is not one shared folder: process(es) [1] did not see" in folder
        assert "\n" not in folder
        assert (tmp_path / f"any-{process}.txt").read_text() == "True"
    assert not list((tmp_path / "shared").iterdir())  # the probe file is removed


@pytest.mark.parametrize("fail", [True, False], ids=["one-fails", "time-runs-out"])
def test_the_harness_kills_every_child_when_one_fails_or_time_runs_out(tmp_path, fail):
    start = time.monotonic()
    extra = ("fail",) if fail else ()
    with pytest.raises(ProcessesFailed, match="process 1: exit None .killed at the time bound"):
        run_processes(
            worker_argv("hang", tmp_path, *extra), 2, log_dir=tmp_path / "logs",
            timeout=40 if fail else 8,
        )  # fmt: skip
    elapsed = time.monotonic() - start
    assert elapsed < (30 if fail else 20)  # one failed: its peers get a grace, then die
    for process in (0, 1):
        pid = int((tmp_path / f"pid-{process}.txt").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------- experiments/cifar.py


CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar")
    generator = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def _cifar_args(data_dir, out, *extra):
    return [
        "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16", "--widths", "4",
        "8", "--epochs", "2", "--steps-per-call", "1", "--checkpoint-every-steps", "2",
        "--parallel", "sharded", "--no-progress", *extra,
    ]  # fmt: skip


def _load_cli():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "cifar.py"
    spec = importlib.util.spec_from_file_location("cifar_cli_multiprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for_checkpoint(processes, directory, step, timeout=240.0):
    from sgdjax.training import Checkpointer

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(saved >= step for saved in Checkpointer.saved_steps(directory)):
            return
        if any(process.poll() is not None for process in processes):
            raise AssertionError(f"a process ended before checkpoint {step}")
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint {step} in {directory} within {timeout} s")


def test_two_processes_stopped_by_sigterm_and_sigkill_resume_to_one_process_result(
    image_folder, tmp_path
):
    """2 processes x 2 CPU devices train experiments/cifar.py --parallel sharded on one
    shared --out: SIGTERM to process 1 alone stops both after the same step (exit 75,
    saved); resumed, both are SIGKILLed after a later checkpoint; resumed again, the run
    ends with the parameters of 1 process x 4 devices, and every file is process 0's."""
    import signal as signals

    from _multiprocess import start_processes, wait_processes

    from sgdjax import data, training

    out = tmp_path / "run"
    argv = lambda extra: lambda i: ["experiments/cifar.py", *_cifar_args(image_folder, out, *extra)]  # noqa: E731
    # 1. SIGTERM to one process: both save the same step and exit 75.
    processes = start_processes(argv(()), 2, devices_per_process=2, log_dir=tmp_path / "logs1")
    try:
        _wait_for_checkpoint(processes, out / "checkpoints", 2)
        processes[1].send_signal(signals.SIGTERM)
        codes = wait_processes(processes, timeout=120)
    finally:
        wait_processes(processes, timeout=0)
    logs = [(tmp_path / "logs1" / f"process-{i}.log").read_text() for i in (0, 1)]
    assert codes == [training.PREEMPTED_EXIT_STATUS] * 2, logs
    assert "stopped by a signal on another process" in logs[0] and "--resume" in logs[0]
    assert "stopped by SIGTERM" in logs[1]
    stopped = max(training.Checkpointer.saved_steps(out / "checkpoints"))
    # 2. Resumed, then SIGKILLed (both) after a later checkpoint: nothing is released.
    processes = start_processes(
        argv(("--resume",)), 2, devices_per_process=2, log_dir=tmp_path / "logs2"
    )
    try:
        _wait_for_checkpoint(processes, out / "checkpoints", stopped + 2)
    finally:
        wait_processes(processes, timeout=0)  # SIGKILL to each process group
    assert (out / ".lock").exists()  # left by the killed process 0
    # 3. Resumed to the end; the stale lock is recognised and taken over.
    finished = run_processes(
        argv(("--resume",)), 2, log_dir=tmp_path / "logs3", timeout=240
    )  # fmt: skip
    assert "took over the lock of process" in finished[0].output
    assert "epoch   2" in finished[0].output and "epoch" not in finished[1].output
    # One process with four devices, the same flags, uninterrupted.
    cli = _load_cli()
    parser = cli.build_parser()
    config = cli.make_config(
        parser.parse_args(_cifar_args(image_folder, tmp_path / "one", "--num-devices", "4")),
        parser,
    )
    engine = training.Engine(config, data.load_cifar10(image_folder), log=lambda message: None)
    engine.run(config.seed, tmp_path / "one", progress=False)
    like = engine._initial_state(config.seed)
    results = []
    for workdir in (out, tmp_path / "one"):
        checkpoints = training.Checkpointer(workdir / "checkpoints")
        assert max(checkpoints.saved_steps(workdir / "checkpoints")) == 10
        results.append(checkpoints.restore_tree(10, like)[0])
        checkpoints.close()
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results
    )  # fmt: skip
    rows, dropped = training.read_jsonl(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2] and dropped == []
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
