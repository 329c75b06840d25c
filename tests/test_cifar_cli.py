"""experiments/cifar.py end to end on a tiny generated image folder."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]

cifar = load_script("cifar")


@pytest.fixture(scope="module")
def tiny_data(image_folder):
    return image_folder


def _args(data_dir, out, *extra):
    return [
        "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16", "--no-progress",
        *extra,
    ]  # fmt: skip


def test_one_epoch_writes_every_output(tiny_data, tmp_path):
    summary = cifar.main(_args(tiny_data, tmp_path / "run", "--epochs", "1"))
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["step"] == 5
    for key in (
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "learning_rate",
        "epoch_seconds",
        "images_per_second",
    ):
        assert np.isfinite(rows[0][key]), key
    written = json.loads((out / "summary.json").read_text())
    assert written["test_accuracy"] == summary["test_accuracy"]
    for key in ("wall_seconds", "compile_seconds", "images_per_second", "config", "environment"):
        assert key in written
    assert written["config"]["model"] == "convnet" and written["config"]["epochs"] == 1
    assert written["environment"]["versions"]["jax"] == jax.__version__
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "checkpoints" / "5").is_dir()  # named by global step: 5 steps an epoch


def _final_params(out):
    import jax.numpy as jnp

    import sgdjax
    from sgdjax.training import Checkpointer, ConvNet, TrainState

    like = TrainState.create(
        model=ConvNet(), tx=sgdjax.skip_non_finite(sgdjax.sgd(0.1, momentum=0.9, nesterov=True,
                                                              weight_decay=5e-4)),
        rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3)),
    )  # fmt: skip
    checkpointer = Checkpointer(out / "checkpoints")
    checkpointer._manager.reload()
    step = checkpointer._manager.latest_step()
    tree, config = checkpointer.restore_tree(step, like)
    checkpointer.close()
    assert config["model"] == "convnet" and config["epochs"] == int(tree["epoch"])
    return tree["params"], int(tree["epoch"])


def test_run_killed_mid_training_resumes_to_identical_parameters(tiny_data, tmp_path):
    """SIGKILL a real run once its first checkpoint exists; --resume ends bit-identical."""
    common = ("--epochs", "3", "--schedule", "cosine")
    cifar.main(_args(tiny_data, tmp_path / "straight", *common))

    out = tmp_path / "killed"
    command = [
        sys.executable,
        str(ROOT / "experiments" / "cifar.py"),
        *_args(tiny_data, out, *common),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "5").is_dir() and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "checkpoints" / "5").is_dir()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"

    cifar.main(_args(tiny_data, out, "--resume", *common))
    straight, step_a = _final_params(tmp_path / "straight")
    resumed, step_b = _final_params(out)
    assert step_a == step_b == 3
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


BAD_FLAGS = [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--learning-rate", "0"], "--learning-rate must be a positive number"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite float32 number"),
    (["--learning-rate", "1e39"], "--learning-rate must be a finite float32 number"),
    (["--epochs", "1e20"], "--epochs must be at most 1000000"),
    (["--seed", str(2**64)], "--seed must lie in [0, 4294967295]"),
    (["--batch-size", "128"], "batch size 128 is larger than the 80 training images"),
    (["--out", ""], "--out must name a folder"),
    (["--widths", "8", "0"], "--widths must be 2 positive integers for convnet"),
    (["--model", "resnet9", "--widths", "8", "16"], "--widths applies to convnet and speednet"),
    (["--runs", "0"], "--runs must be positive"),
    (["--flip", "sideways"], "invalid choice: 'sideways'"),
    (["--momentum", "1.0"], "--momentum must lie in"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--batch-size", "12", "--parallel", "pmap"], "not divisible by the device count 8"),
    (["--num-devices", "9", "--parallel", "sharded"], "only 8 device(s) exist"),
    (["--accumulate", "3"], "--batch-size must be divisible by accumulate 3"),
    (["--seed", "-1"], "--seed must lie in [0, 4294967295]"),
    (["--ema-decay", "1.0"], "--ema-decay must lie in [0, 1)"),
]


@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[b[1][:30] for b in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(tiny_data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exited:
        cifar.main(["--data-dir", str(tiny_data), "--out", str(tmp_path / "o"), *extra])
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize(
    "make_dir, message",
    [
        (lambda tmp: tmp / "missing", "no such directory"),
        (lambda tmp: tmp, "is empty"),
    ],
)
def test_bad_data_directories(tmp_path, capsys, make_dir, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exited:
        cifar.main(["--data-dir", str(make_dir(empty)), "--out", str(tmp_path / "o")])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_directory(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exited:
        cifar.main(["--data-dir", str(tiny_data), "--out", str(blocker / "sub")])
    assert exited.value.code == 2 and "cannot write there" in capsys.readouterr().err


def test_out_with_checkpoints_needs_resume(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    cifar.main(_args(tiny_data, out, "--epochs", "1", "--max-steps", "2"))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exited:
        cifar.main(_args(tiny_data, out, "--epochs", "1", "--max-steps", "2"))
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "already holds checkpoints" in error_lines[0]
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("mode", ["pmap", "zero"])
def test_parallel_modes_from_the_command_line(tiny_data, tmp_path, mode):
    summary = cifar.main(
        _args(tiny_data, tmp_path / mode, "--epochs", "1", "--parallel", mode, "--max-steps", "2")
    )
    assert np.isfinite(summary["test_accuracy"])


def test_entry_point_runs_as_a_script(tiny_data, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "cifar.py"),
         *_args(tiny_data, tmp_path / "script", "--epochs", "1", "--max-steps", "2")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch   1" in result.stdout
    assert (tmp_path / "script" / "summary.json").is_file()


def test_compare_runs_several_optimizers_and_seeds_and_tabulates(tiny_data, tmp_path):
    compare = load_script("compare")
    argv = [
        "--data-dir", str(tiny_data), "--out", str(tmp_path), "--epochs", "1",
        "--batch-size", "16", "--max-steps", "2", "--optimizers", "nesterov", "adam", "sam",
        "--seeds", "0", "1", "--no-progress",
    ]  # fmt: skip
    results = compare.main(argv)
    assert set(results["runs"]) == {"nesterov", "adam", "sam"}
    assert (tmp_path / "compare.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["runs"]["adam"]["0"]["config"]["optimizer"] == "adam"
    assert len(saved["runs"]["nesterov"]["1"]["history"]) == 1
    for name, row in saved["summary"].items():
        accuracies = [saved["runs"][name][seed]["test_accuracy"] for seed in ("0", "1")]
        assert row["seeds"] == [0, 1]
        assert row["mean"] == pytest.approx(np.mean(accuracies))
        assert row["std"] == pytest.approx(np.std(accuracies, ddof=1))
        assert row["min"] == min(accuracies) and row["max"] == max(accuracies)
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert len(table) == 2 + 3 and all(line.count("|") == 7 for line in table)
    # Seeds differ, so their runs differ.
    runs = saved["runs"]["nesterov"]
    assert runs["0"]["history"][0]["train_loss"] != runs["1"]["history"][0]["train_loss"]

    # A second call reuses finished runs (same numbers, no training) and runs only new ones.
    # A run saved before a setting existed (here: no "ema_decay") still counts as finished.
    summary_path = tmp_path / "seed-0" / "adam" / "summary.json"
    older = json.loads(summary_path.read_text())
    del older["config"]["ema_decay"]
    summary_path.write_text(json.dumps(older))
    stamp = summary_path.stat().st_mtime_ns
    again = compare.main([*argv[:-8], "--optimizers", "adam", "--seeds", "0", "--no-progress"])
    assert (tmp_path / "seed-0" / "adam" / "summary.json").stat().st_mtime_ns == stamp
    assert again["runs"]["adam"][0]["test_accuracy"] == results["runs"]["adam"][0]["test_accuracy"]


def _copy_tree(source, target):
    import shutil

    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".sgdjax_cache"))
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "train" / "class3" / "2.png").write_bytes(b"junk"),
         "2.png: cannot decode image"),
        (lambda root: (root / "test" / "class9").rename(root / "test" / "zebra"),
         "class folders differ between train and test"),
        (lambda root: [p.rename(root / f"x{i}.txt") for i, p in enumerate(root.iterdir())],
         "no CIFAR-10 layout found"),
    ],
    ids=["corrupt_image", "class_mismatch", "wrong_layout"],
)  # fmt: skip
def test_bad_data_is_one_line_error(tiny_data, tmp_path, capsys, damage, message):
    root = _copy_tree(tiny_data, tmp_path / "data")
    damage(root)
    with pytest.raises(SystemExit) as exited:
        cifar.main(["--data-dir", str(root), "--out", str(tmp_path / "o")])
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_diagnostics_flag_logs_and_draws(tiny_data, tmp_path):
    out = tmp_path / "diag"
    cifar.main(_args(tiny_data, out, "--epochs", "2", "--max-steps", "2", "--diagnostics",
                     "--clip-norm", "1.0"))  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diagnostics = rows[-1]["diagnostics"]
    for key in ("grad_norm", "update_ratio", "effective_learning_rate", "clipped_fraction"):
        assert np.isfinite(diagnostics[key])
    assert any(key.startswith("update_norm/") for key in diagnostics)
    assert (out / "diagnostics.png").stat().st_size > 1000


VARIANTS = {
    "lars": ["--optimizer", "lars"],
    "schedule_free": ["--optimizer", "schedule_free"],
    "lookahead": ["--lookahead-period", "2"],
    "speedrun_pieces": ["--whiten", "--whiten-images", "16", "--flip", "alternating",
                        "--translate", "2", "--tta", "flip_shift", "--bias-scaler", "8"],
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_optimizers_train_from_the_command_line(tiny_data, tmp_path, variant):
    summary = cifar.main(_args(tiny_data, tmp_path / variant, "--epochs", "1",
                               "--max-steps", "3", *VARIANTS[variant]))  # fmt: skip
    assert np.isfinite(summary["test_accuracy"])
    rows = (tmp_path / variant / "metrics.jsonl").read_text().splitlines()
    assert np.isfinite(json.loads(rows[-1])["train_loss"])


def test_ema_run_resumes_to_the_same_averaged_model(tiny_data, tmp_path):
    extra = ("--max-steps", "2", "--ema-decay", "0.9")
    cifar.main(_args(tiny_data, tmp_path / "straight", "--epochs", "2", *extra))
    cifar.main(_args(tiny_data, tmp_path / "split", "--epochs", "1", *extra))
    cifar.main(_args(tiny_data, tmp_path / "split", "--epochs", "2", "--resume", *extra))
    rows = {
        name: [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("straight", "split")
    }
    assert [r["epoch"] for r in rows["split"]] == [1, 2]
    for key in ("test_loss", "test_accuracy", "train_loss"):
        assert rows["split"][-1][key] == pytest.approx(rows["straight"][-1][key], rel=1e-6)


def test_speedrun_preset_runs_end_to_end_with_a_step_limit(tiny_data, tmp_path, capsys):
    out = tmp_path / "speed"
    result = cifar.main([
        "--preset", "speedrun", "--data-dir", str(tiny_data), "--out", str(out),
        "--batch-size", "16", "--epochs", "1.5", "--max-steps", "2", "--runs", "2",
        "--widths", "8", "16", "16", "--no-progress", "--whiten-images", "16",
    ])  # fmt: skip
    saved = json.loads((out / "summary.json").read_text())
    assert [run["seed"] for run in saved["runs"]] == [0, 1]
    assert saved["steps_per_run"] == 3  # ceil(1.5 epochs x 2 steps): the second epoch partial
    assert all(run["steps"] == 3 for run in saved["runs"])
    assert 0.0 <= saved["accuracy_mean"] <= 1.0 and saved["compile_seconds"] > 0
    assert saved["config"]["epochs"] == 1.5 and saved["environment"]["versions"]["jax"]
    assert saved["config"]["widths"] == [8, 16, 16]
    assert result["accuracy_mean"] == saved["accuracy_mean"]
    assert "without compile" in capsys.readouterr().out
    for seed in (0, 1):  # every run keeps the engine's outputs, checkpoints included
        assert (out / f"seed-{seed}" / "checkpoints" / "3").is_dir()  # step 3, the end
        rows = (out / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(row)["test_accuracy"] is None for row in rows] == [True, False]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer", "adam"], "--optimizer must be sgd or sgdw with whiten"),
        (["--momentum", "1.5"], "--momentum must lie in [0, 1)"),
        (["--widths", "8", "0", "16"], "--widths must be 3 positive integers for speednet"),
        (["--lookahead-decay", "1.0"], "--lookahead-decay must lie in [0, 1)"),
    ],
)
def test_speedrun_preset_checks_its_flags(tiny_data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exited:
        cifar.main(["--preset", "speedrun", "--data-dir", str(tiny_data), "--out",
                    str(tmp_path / "o"), *extra])  # fmt: skip
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines


def test_every_flag_is_a_config_field_with_its_help():
    from sgdjax.training import Config

    parser = cifar.build_parser()
    flags = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(Config):
        assert flags[field.name].help == field.metadata["help"], field.name
        assert flags[field.name].default is None  # unset flags keep the preset's value


def test_resume_past_the_end_is_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    cifar.main(_args(tiny_data, out, "--epochs", "2", "--max-steps", "1"))
    before = (out / "summary.json").read_text()
    with pytest.raises(SystemExit) as exited:
        cifar.main(_args(tiny_data, out, "--epochs", "1", "--max-steps", "1", "--resume"))
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "is of step 2, past this run's last step 1" in error_lines[0]
    assert (out / "summary.json").read_text() == before


def test_subsets_larger_than_the_data_record_what_was_used(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    summary = cifar.main(_args(tiny_data, out, "--epochs", "1", "--max-steps", "1",
                               "--train-subset", "1000", "--test-subset", "7"))  # fmt: skip
    assert summary["data"]["train_examples"] == 80 and summary["data"]["test_examples"] == 7
    saved = json.loads((out / "summary.json").read_text())
    assert saved["data"] == summary["data"]
    assert "train_subset=1000 is more than the 80 images there are" in capsys.readouterr().out


def test_missing_download_is_one_line(tmp_path, capsys, monkeypatch):
    from sgdjax import data

    def offline(data_dir, **options):
        raise data.DataError("CIFAR-10 download needs a network or a local copy (--data-dir)")

    monkeypatch.setattr(data, "load_cifar10", offline)
    with pytest.raises(SystemExit) as exited:
        cifar.main(["--out", str(tmp_path / "o")])
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "needs a network or a local copy" in error_lines[0]
    assert not (tmp_path / "o").exists()


def test_non_finite_run_is_one_line_and_tells_the_truth(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cifar.main(_args(tiny_data, tmp_path / "o", "--epochs", "1", "--learning-rate", "1e30",
                         "--max-bad-steps", "2", "--schedule", "constant"))  # fmt: skip
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "steps in a row had non-finite" in error_lines[0]
    assert "No checkpoint was written" in error_lines[0]


def test_fractional_epochs_end_with_a_partial_epoch(tiny_data, tmp_path):
    out = tmp_path / "run"
    cifar.main(_args(tiny_data, out, "--epochs", "1.5"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["step"]) for row in rows] == [(1, 5), (2, 8)]  # ceil(7.5)


def test_lr_find_suggests_a_rate_and_plots(tiny_data, tmp_path):
    lr_find = load_script("lr_find")
    result = lr_find.main(["--data-dir", str(tiny_data), "--out", str(tmp_path), "--steps", "12",
                           "--batch-size", "16", "--start", "1e-4", "--end", "1.0"])  # fmt: skip
    rates = result["learning_rates"]
    assert rates[0] == pytest.approx(1e-4, rel=1e-4) and all(
        b > a for a, b in zip(rates, rates[1:])
    )
    assert rates[0] <= result["suggested_learning_rate"] <= rates[-1]
    assert (tmp_path / "lr_find.png").stat().st_size > 1000


def test_lr_find_suggestion_is_the_steepest_descent():
    lr_find = load_script("lr_find")
    rates = np.logspace(-4, 0, 9)
    losses = np.asarray([2.3, 2.3, 2.2, 1.6, 1.0, 0.9, 0.95, 2.0, 5.0])  # steepest at 1e-2.5
    assert lr_find.suggest(rates, losses) == pytest.approx(rates[3])


def test_host_devices_split_the_cpu_for_sharded_training(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "split"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "cifar.py"),
         *_args(tiny_data, out, "--epochs", "1", "--max-steps", "2", "--host-devices", "2",
                "--parallel", "sharded")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["device_count"] == 2


def test_no_progress_also_hides_the_download_bar(monkeypatch):
    calls = []
    monkeypatch.setattr("sgdjax.data.load_cifar10", lambda *a, **k: calls.append((a, k)))
    parser = cifar.build_parser()
    for flags, shown in (([], True), (["--no-progress"], False)):
        cifar.load_data(parser.parse_args(flags), parser)
        assert calls.pop() == ((None,), {"progress": shown, "lazy": False})
