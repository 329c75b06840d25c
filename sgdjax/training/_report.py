"""What a run records besides its state: the environment, curves and diagnostics plots."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from sgdjax.parallel import applied_arrangement


@functools.cache
def code_commit() -> str | None:
    """The git commit of the code that runs: read once, at the first call (the engine
    calls it when it is built), so a run that outlives a later commit still names its
    own; ``None`` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent, timeout=5,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def environment() -> dict[str, Any]:
    """Hardware, package versions, the git commit and the CPU arrangement (the host
    devices chosen by ``sgdjax.parallel.arrange_cpu``, ``None`` where it was not
    called), for the run's summary."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "sgdjax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = code_commit()
    devices = jax.devices()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_arrangement": applied_arrangement(),
        "commit": commit,
    }


def save_figure(figure, axes, path: Path, *, legend_size: float | None = None) -> None:
    """Grid and legend on every axis, then ``figure`` written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training and test loss and accuracy per epoch, into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    tested = [row for row in history if row.get("test_accuracy") is not None]
    test_epochs = [row["epoch"] for row in tested]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    loss_axis.plot(test_epochs, [row["test_loss"] for row in tested], "o-", label="test")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy_axis.plot(epochs, [row["train_accuracy"] for row in history], "o-", label="train")
    accuracy_axis.plot(test_epochs, [row["test_accuracy"] for row in tested], "o-", label="test")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    save_figure(figure, (loss_axis, accuracy_axis), path)


def plot_diagnostics(history: list[dict[str, Any]], path: Path) -> None:
    """Global and per-layer optimizer diagnostics per epoch, into ``path``."""
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
    save_figure(figure, axes, path, legend_size=6)
