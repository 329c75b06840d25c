"""Device meshes and shardings for data-parallel training, including ZeRO stage 1."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(num_devices: int | None = None, *, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (all when ``None``).

    The devices are ordered by process, so under several processes each process's
    share of a batch is one block of rows; there ``num_devices`` must be a multiple
    of the process count and each process contributes ``num_devices / processes``.

    Args:
      num_devices: how many devices to use (global); at most ``jax.device_count()``.
      axis_name: the mesh axis the batch is split over.

    Returns:
      A ``jax.sharding.Mesh`` with one axis named ``axis_name``.

    Example:
      >>> import sgdjax.parallel as par
      >>> mesh = par.data_mesh(1)
      >>> mesh.shape["data"]
      1
    """
    available = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
    if num_devices is None:
        num_devices = len(available)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices <= 0:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    if num_devices > len(available):
        raise ValueError(
            f"num_devices={num_devices} but only {len(available)} "
            f"{available[0].platform} device(s) exist"
        )
    processes = jax.process_count()
    if processes == 1:
        return Mesh(np.asarray(available[:num_devices]), (axis_name,))
    if num_devices % processes:
        raise ValueError(
            f"num_devices={num_devices} must be a multiple of the {processes} processes"
        )
    each = num_devices // processes
    chosen = [
        device
        for process in range(processes)
        for device in [d for d in available if d.process_index == process][:each]
    ]
    return Mesh(np.asarray(chosen), (axis_name,))


def check_divisible(batch_size: int, num_devices: int) -> None:
    """Raises a ``ValueError`` unless the global batch splits evenly over the devices."""
    if batch_size % num_devices != 0:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the device count "
            f"{num_devices}; use a multiple of {num_devices}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, *, axis_name: str = DATA_AXIS) -> NamedSharding:
    """A sharding that splits the leading (batch) axis over ``axis_name``."""
    return NamedSharding(mesh, PartitionSpec(axis_name))


def shard_batch(batch: Any, mesh: Mesh, *, axis_name: str = DATA_AXIS) -> Any:
    """Places a host batch on the mesh, split along its leading axis.

    Raises:
      ValueError: if the batch size is not divisible by the number of devices.
    """
    size = mesh.shape[axis_name]
    for leaf in jax.tree.leaves(batch):
        check_divisible(int(np.shape(leaf)[0]), size)
    return jax.device_put(batch, batch_sharding(mesh, axis_name=axis_name))


def zero_sharding(tree: Any, mesh: Mesh, *, axis_name: str = DATA_AXIS) -> Any:
    """ZeRO stage 1 shardings: each leaf split over ``axis_name`` where it divides evenly.

    A leaf is partitioned along its first axis whose length is a multiple of the
    number of devices, so each device holds ``1/N`` of it; leaves with no such axis
    (scalars such as step counts, odd shapes) are replicated. Applied to optimizer
    state (momentum buffers), per-device optimizer memory falls as ``1/N`` while
    the parameters stay replicated; XLA gathers what the update needs.

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape``).
      mesh: the device mesh.
      axis_name: the mesh axis to partition over.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``tree``.
    """
    size = mesh.shape[axis_name]

    def leaf_sharding(leaf):
        shape = np.shape(leaf)
        for axis, length in enumerate(shape):
            if length >= size and length % size == 0:
                spec = [None] * len(shape)
                spec[axis] = axis_name
                return NamedSharding(mesh, PartitionSpec(*spec))
        return replicated(mesh)

    return jax.tree.map(leaf_sharding, tree)


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes of ``tree``'s arrays held on each device id (shards counted where they live)."""
    totals: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return totals
