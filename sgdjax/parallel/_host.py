"""Splitting a multi-core CPU into several JAX devices."""

from __future__ import annotations

import jax


def use_cpu_devices(count: int) -> None:
    """Makes the CPU appear as ``count`` JAX devices (call before any JAX computation).

    One XLA CPU device runs a training step on few threads; with several devices and
    the batch sharded over them (``make_parallel_train_step("sharded")``), XLA runs
    the shards' programs side by side on the cores. The numbers are those of one
    device on the whole batch.

    Args:
      count: a positive number of devices.

    Raises:
      ValueError: ``count`` is not a positive integer.
      RuntimeError: JAX has already started its backends in this process.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        raise RuntimeError(
            "the CPU device count must be set before JAX's first computation in this process"
        ) from None
