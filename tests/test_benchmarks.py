"""Each benchmark runs end to end in its --quick form, so none of them rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, extra",
    [
        ("update_overhead.py", []),
        ("train_throughput.py", ["--contenders", "sgdjax", "flax+optax", "torch eager"]),
        (
            "train_throughput.py",
            [
                "--host-devices",
                "2",
                "--contenders",
                "sgdjax",
                "sgdjax sharded",
                "sgdjax 8 steps/call",
            ],  # fmt: skip
        ),
        ("scaling.py", []),
        ("nesterov_temporary.py", []),
        ("layout_crossover.py", []),
        ("bandwidth.py", []),
        ("engine_overhead.py", []),
        ("skip_forms.py", []),
        ("conv_passes.py", []),
        ("xla_cpu_backends.py", []),
        ("tta_views.py", []),
    ],
)
def test_benchmark_quick_run(tmp_path, script, extra):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["environment"]["versions"]["jax"]
    assert any(word in result.stdout for word in ("median", "images/s", "img/s", "XLA_FLAGS"))
    if script == "nesterov_temporary.py":  # the same-rounding forms are bitwise the chain's
        differences = payload["max_abs_difference"]
        assert {differences[name] for name in ("chain", "chunked loop", "leaf by leaf")} == {0.0}
    if script == "layout_crossover.py":
        assert {tree["rule_picks_flat"] for tree in payload["trees"]} == {False, True}
    if script == "skip_forms.py":  # every form computes what it claims
        assert all(form["behaves"] for form in payload["results"].values())
    if script == "conv_passes.py":  # every way computes its pass (bf16 to its precision)
        for row in payload["results"]:
            assert row["relative_difference"] < (1e-2 if row["way"] == "bf16" else 1e-5), row
        assert {row["pass"] for row in payload["results"]} == {
            "forward",
            "input-grad",
            "kernel-grad",
        }
    if script == "xla_cpu_backends.py":  # each convolution is found, in XLA or in a library
        for row in payload["results"]:
            found = row["convolutions_in_xla"] + sum(row["convolutions_in_library"].values())
            assert found == {"conv": 3, "conv block": 3, "matmul": 0}[row["program"]], row
            assert row["same_as_no_flags"] or row["flags"]
    if script == "tta_views.py":  # both ways give the same logits, bitwise
        assert set(payload["max_abs_difference"].values()) == {0.0}
    if script == "engine_overhead.py":
        rates = [r["images_per_second"] for r in payload["results"].values()]
        assert all(rate[name] > 0 for rate in rates for name in ("host loop", "engine"))
    if "--host-devices" in extra:
        assert payload["jax_devices"] == 2
        ran = {run["contender"] for run in payload["runs"] if "failed" not in run}
        assert ran == {"sgdjax", "sgdjax sharded", "sgdjax 8 steps/call"}


def test_rounds_are_shuffled_so_no_contender_always_follows_the_same_one():
    sys.path.insert(0, str(BENCHMARKS))
    from _common import round_orders

    names = ["sgdjax", "optax", "torch-foreach", "torch-fused"]
    orders = round_orders(names, 40)
    assert all(sorted(order) == sorted(names) for order in orders)
    assert len({tuple(order) for order in orders}) > 5
    # Each contender comes right after torch-fused in some round (or opens a round).
    followers = set()
    for previous, order in zip([[None]] + orders, orders):
        sequence = [previous[-1], *order]
        followers |= {b for a, b in zip(sequence, sequence[1:]) if a == "torch-fused"}
    assert followers - {"torch-fused"} == {"sgdjax", "optax", "torch-foreach"}
    assert round_orders(names, 3) == round_orders(names, 3)  # the same seed, the same orders


def test_the_gpu_figures_script_runs_every_step_at_toy_sizes(tmp_path):
    """benchmarks/gpu_figures.sh in its SMOKE mode, on this CPU: every step runs and
    the seven files it promises are written."""
    import os
    import tarfile

    from helpers import write_image_folder

    write_image_folder(tmp_path / "cifar10", train_per_class=26, test_per_class=20)
    archive = tmp_path / "cifar10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar10", arcname="cifar10")
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, AIRBENCH_CMD="echo airbench ran")
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_figures.sh"), str(archive), str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    for name in ("update", "throughput", "speedrun", "resnet9", "airbench"):
        assert f"=== {name}: exit 0" in log, log[-3000:]
    assert (out / "airbench.txt").read_text().strip() == "airbench ran"
    assert json.loads((out / "speedrun.json").read_text())["accuracy_mean"] >= 0
    assert json.loads((out / "resnet9.json").read_text())["images_per_second"] > 0
    assert json.loads((out / "update.json").read_text())["torch_device"] == "cpu"
    assert json.loads((out / "throughput.json").read_text())["torch_device"] == "cpu"
    assert "jax" in (out / "environment.txt").read_text()
