"""``train_and_evaluate``: the CIFAR training run behind ``experiments/cifar.py``."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sgdjax
from sgdjax import data
from sgdjax.parallel import DATA_AXIS
from sgdjax.training import _checkpoint
from sgdjax.training._config import Config, make_optimizer
from sgdjax.training._models import create_model
from sgdjax.training._parallel import make_parallel_train_step, needs_bn_axis
from sgdjax.training._state import TrainState
from sgdjax.training._step import evaluate, make_eval_step


class NonFiniteError(RuntimeError):
    """Raised when too many training steps in a row had non-finite gradients."""


def environment() -> dict[str, Any]:
    """Hardware, package versions and the git commit, for the run's summary."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "sgdjax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    devices = jax.devices()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "commit": commit,
    }


def _subset(images, labels, count):
    """A fixed random subset of ``count`` examples (stored data may be sorted by class)."""
    if count is None or count >= len(images):
        return images, labels
    chosen = np.sort(np.random.default_rng(0).permutation(len(images))[:count])
    return images[chosen], labels[chosen]


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    loss_axis.plot(epochs, [row["test_loss"] for row in history], "o-", label="test")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy_axis.plot(epochs, [row["train_accuracy"] for row in history], "o-", label="train")
    accuracy_axis.plot(epochs, [row["test_accuracy"] for row in history], "o-", label="test")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_diagnostics(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    names = ["grad_norm", "update_ratio", "effective_learning_rate", "clipped_fraction"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        axes[0].plot(epochs, [row["diagnostics"][name] for row in history], "o-", label=name)
    axes[0].set(xlabel="epoch", yscale="log", title="global (last step of each epoch)")
    layers = sorted(k for k in history[-1]["diagnostics"] if k.startswith("update_ratio/"))
    for name in layers:
        values = [row["diagnostics"][name] for row in history]
        axes[1].plot(epochs, values, "o-", label=name.split("/", 1)[1])
    axes[1].set(xlabel="epoch", yscale="log", title="update / parameter norm, per layer")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as stream:
        stream.write(json.dumps(row) + "\n")


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    dataset: data.Dataset | None = None,
) -> dict[str, Any]:
    """Trains ``config.model`` on CIFAR-10 and writes logs, plots and checkpoints.

    Writes into ``workdir``: ``metrics.jsonl`` (one line per epoch), ``summary.json``
    (final accuracy, timings with compile time apart, images/s, config, versions,
    hardware), ``curves.png`` and ``checkpoints/`` (orbax; every
    ``config.checkpoint_every`` epochs and at the end).

    Args:
      config: the run's configuration.
      workdir: the output directory (created if needed).
      data_dir: where CIFAR-10 is (see :func:`sgdjax.data.load_cifar10`).
      resume: continue from the newest good checkpoint in ``workdir``.
      progress: show tqdm progress bars.
      dataset: arrays to use instead of loading (tests).

    Returns:
      The summary dict also written to ``summary.json``.
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = dataset if dataset is not None else data.load_cifar10(data_dir)
    train_images, train_labels = _subset(
        dataset.train_images, dataset.train_labels, config.train_subset
    )
    test_images, test_labels = _subset(dataset.test_images, dataset.test_labels, config.test_subset)
    steps_per_epoch = len(train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {len(train_images)} training images"
        )
    if config.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps)

    tx, schedule = make_optimizer(config, steps_per_epoch)
    model = create_model(
        config.model,
        num_classes=len(dataset.class_names),
        dtype=jnp.bfloat16 if config.bf16 else jnp.float32,
        bn_axis_name=DATA_AXIS if needs_bn_axis(config.parallel) else None,
    )
    state = TrainState.create(
        model=model,
        tx=tx,
        rng=jax.random.key(config.seed),
        sample_input=jnp.zeros((1, 32, 32, 3)),
        ema=config.ema_decay is not None,
    )
    parallel_step = make_parallel_train_step(
        config.parallel,
        num_devices=config.num_devices,
        augment_fn=(
            functools.partial(data.augment, padding=config.crop_padding) if config.augment else None
        ),
        learning_rate_fn=schedule,
        label_smoothing=config.label_smoothing,
        accumulate=config.accumulate,
        sam_rho=config.sam_rho,
        ema_decay=config.ema_decay,
    )
    eval_step = make_eval_step(flip_tta=config.flip_tta)
    checkpoints = _checkpoint.Checkpointer(workdir / "checkpoints")

    start_epoch = 0
    metrics_path = workdir / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if resume:
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            state, start_epoch, note, saved_config = restored
            print(note)
            changed = sorted(
                name
                for name, value in dataclasses.asdict(config).items()
                if name in saved_config and saved_config[name] != value and name != "epochs"
            )
            if changed:
                print(f"note: the checkpoint was written with different {', '.join(changed)}")
            if metrics_path.exists():
                history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
                history = [row for row in history if row["epoch"] <= start_epoch]
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    placed = parallel_step.place_state(state)

    compile_seconds = 0.0
    train_seconds = 0.0
    images_seen = 0
    wall_start = time.perf_counter()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        epoch_start = time.perf_counter()
        epoch_step_seconds = 0.0
        losses, accuracies = [], []
        batches = data.batches(
            train_images, train_labels, config.batch_size, seed=config.seed, epoch=epoch
        )
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for index, batch in enumerate(batches):
            if index >= steps_per_epoch:
                break
            tick = time.perf_counter()
            placed, metrics = parallel_step.step(placed, parallel_step.place_batch(batch))
            metrics = jax.tree.map(lambda x: np.ravel(np.asarray(x))[0], metrics)  # waits
            elapsed = time.perf_counter() - tick
            skipped = int(np.ravel(np.asarray(placed.opt_state.consecutive_skipped))[0])
            if compile_seconds == 0.0:
                compile_seconds = elapsed  # the first call traces and compiles
            else:
                epoch_step_seconds += elapsed
                images_seen += config.batch_size
            if skipped >= config.max_bad_steps:
                step_number = int(np.ravel(np.asarray(placed.step))[0])
                raise NonFiniteError(
                    f"{skipped} steps in a row had non-finite gradients (up to step "
                    f"{step_number}); stopping. The last good checkpoint is in "
                    f"{workdir / 'checkpoints'}"
                )
            losses.append(float(metrics["loss"]))
            accuracies.append(float(metrics["accuracy"]))
            bar.set_postfix(
                loss=f"{np.mean(losses[-20:]):.3f}",
                acc=f"{np.mean(accuracies[-20:]):.3f}",
                img_s=f"{config.batch_size / max(elapsed, 1e-9):.0f}",
            )
            bar.update(1)
        bar.close()
        train_seconds += epoch_step_seconds
        state = parallel_step.gather_state(placed)
        eval_batch_size = min(config.eval_batch_size, len(test_images))
        eval_state = state
        if config.optimizer == "schedule_free":  # evaluate the averaged sequence x
            eval_state = state.replace(params=sgdjax.schedule_free_eval_params(state.opt_state))
        if config.ema_decay is not None:  # evaluate the averaged weights and statistics
            eval_state = eval_state.averaged(config.ema_decay)
        test = evaluate(eval_step, eval_state, test_images, test_labels, eval_batch_size)
        measured_steps = len(losses) - (1 if epoch == start_epoch + 1 else 0)
        row = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accuracies)),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "learning_rate": float(metrics["learning_rate"]),
            "skipped_steps": int(state.opt_state.skipped_steps),
            "epoch_seconds": time.perf_counter() - epoch_start,
            "images_per_second": measured_steps * config.batch_size / max(epoch_step_seconds, 1e-9),
        }
        if config.diagnostics:
            row["diagnostics"] = {
                name: float(value)
                for name, value in sgdjax.diagnostics_metrics(state.opt_state).items()
            }
        history.append(row)
        _append_jsonl(metrics_path, row)
        print(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  "
            f"train acc {row['train_accuracy']:.4f}  test loss {row['test_loss']:.4f}  "
            f"test acc {row['test_accuracy']:.4f}  {row['images_per_second']:.0f} img/s"
        )
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            checkpoints.save(epoch, state, dataclasses.asdict(config))

    wall_seconds = time.perf_counter() - wall_start
    _plot_curves(history, workdir / "curves.png")
    if config.diagnostics and history:
        _plot_diagnostics(history, workdir / "diagnostics.png")
    final = history[-1] if history else {}
    summary = {
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "epochs": config.epochs,
        "wall_seconds": wall_seconds,
        "compile_seconds": compile_seconds,
        "train_seconds_excluding_compile": train_seconds,
        "images_per_second": images_seen / max(train_seconds, 1e-9),
        "config": dataclasses.asdict(config),
        "environment": environment(),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    checkpoints.close()
    return summary
