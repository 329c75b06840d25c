"""The automatic CPU arrangement: the rule, and cifar.py applying and recording it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from sgdjax import parallel
from sgdjax.parallel import CpuArrangement, choose_cpu_arrangement

ROOT = Path(__file__).resolve().parents[1]


def _choose(**overrides):
    values = dict(backend="cpu", cores=2, batch_size=128)
    values.update(overrides)
    return choose_cpu_arrangement(**values)


def test_the_rule_splits_a_cpu_into_devices_per_core_when_the_batch_divides():
    assert _choose() == CpuArrangement(8, "sharded", _choose().reason)
    assert "8 host devices" in _choose().reason and "16 per device" in _choose().reason
    assert _choose(batch_size=512).host_devices == 16
    assert _choose(cores=4, batch_size=512).host_devices == 32
    assert _choose(cores=1).host_devices == 8
    assert _choose(cores=1, batch_size=512).host_devices == 8


def test_the_rule_takes_the_largest_count_dividing_every_size():
    assert _choose(batch_size=96).host_devices == 6  # 8 and 7 do not divide 96
    assert _choose(batch_size=100).host_devices == 5  # 100 = 5 x 20
    assert _choose(divides=(50000, 1000)).host_devices == 8
    assert _choose(divides=(50004,)).host_devices == 4  # 50004 = 4 x 12501
    assert _choose(batch_size=64).host_devices == 4  # 16 examples a device at least


def test_small_or_indivisible_batches_stay_on_one_device():
    for batch, divides in ((16, ()), (31, ()), (128, (81,))):
        arrangement = _choose(batch_size=batch, divides=divides)
        assert (arrangement.host_devices, arrangement.parallel) == (1, None)
        assert "one CPU device" in arrangement.reason


def test_flags_accelerators_processes_and_a_started_jax_keep_the_config():
    cases = (
        (dict(explicit=("--parallel",)), "as given (--parallel)"),
        (dict(backend="gpu"), "gpu backend"),
        (dict(processes=2), "2 processes"),
        (dict(started=True), "already started"),
    )
    for overrides, words in cases:
        arrangement = _choose(**overrides)
        assert (arrangement.host_devices, arrangement.parallel) == (1, None)
        assert words in arrangement.reason


@pytest.mark.parametrize("name, value", [("cores", 0), ("batch_size", -1), ("cores", True)])
def test_the_rule_checks_its_arguments(name, value):
    with pytest.raises(ValueError, match=name):
        _choose(**{name: value})


def test_in_a_started_process_the_arrangement_keeps_one_device(monkeypatch):
    jax.devices()  # started first, with the suite's flags: other tests here need 8 devices
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert parallel.split_cpu(batch_size=128) == 1
    arrangement = parallel.arrange_cpu(batch_size=128)
    assert (arrangement.host_devices, arrangement.parallel) == (1, None)
    assert "already started" in arrangement.reason
    assert parallel.applied_arrangement() == arrangement.as_dict()


def _cifar(data_dir, out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [sys.executable, str(ROOT / "experiments" / "cifar.py"), "--data-dir",
               str(data_dir), "--out", str(out), "--no-progress", "--batch-size", "32",
               "--widths", "4", "8", "--epochs", "1", "--max-steps", "2",
               "--tensorboard", "--no-tensorboard", *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, json.loads((out / "summary.json").read_text())


def test_cifar_splits_the_cpu_by_itself_records_it_and_matches_one_device(image_folder, tmp_path):
    stdout, auto = _cifar(image_folder, tmp_path / "auto")
    assert "devices: " in stdout and "2 host devices" in stdout
    assert auto["environment"]["device_count"] == 2
    assert auto["environment"]["cpu_arrangement"]["host_devices"] == 2
    assert auto["config"]["parallel"] == "sharded"
    stdout, one = _cifar(image_folder, tmp_path / "one", "--parallel", "none")
    assert "as given (--parallel)" in stdout
    assert one["environment"]["device_count"] == 1 and one["config"]["parallel"] == "none"
    assert auto["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert auto["test_accuracy"] == one["test_accuracy"]
