"""Two processes x two CPU devices on 127.0.0.1 against one process with four devices."""

import os
import time

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
