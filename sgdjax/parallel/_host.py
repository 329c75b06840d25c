"""Splitting a multi-core CPU into several JAX devices, and deciding when to.

One XLA CPU device runs a training step's operations on few threads at a time; with
the CPU split into several devices and the batch sharded over them (the ``"sharded"``
data-parallel mode) XLA runs the shards' programs side by side. The numbers are those
of one device on the whole batch (to float32 summation order).

:func:`choose_cpu_arrangement` is the rule (a pure function of the backend, the core
count, the batch and the flags given); :func:`split_cpu` applies its device count
before JAX starts its backends, :func:`arrange_cpu` then decides the run's mode and
device count with the data's sizes and records it (:func:`applied_arrangement`).
"""

from __future__ import annotations

import dataclasses
import os

import jax

# Host devices per CPU core and the fewest examples each device must get. On a 2-core
# x86-64 CPU (docs/speed.md, "The automatic CPU arrangement") the ConvNet trained
# fastest on 8 devices at batch 128 (of 1, 2, 4, 8 and 16), level on 8 and 16 at batch
# 256 and fastest on 16 at batch 512 (1.3x over 8), with XLA's kernel gradient at
# these shares (sgdjax.training.choose_kernel_grad). The 16-example floor is a choice
# at first (it keeps small smoke-test batches on one device); at batch 128 it also
# keeps the faster 8 devices over 16.
DEVICES_PER_CORE = 8
MIN_EXAMPLES_PER_DEVICE = 16


@dataclasses.dataclass(frozen=True)
class CpuArrangement:
    """How a run uses the CPU.

    Attributes:
      host_devices: JAX devices to split the CPU into (1: not split).
      parallel: the data-parallel mode to train with (``None``: the config's own).
      reason: one line saying why, for the log and the run's summary.
    """

    host_devices: int
    parallel: str | None
    reason: str

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON)."""
        return dataclasses.asdict(self)


def choose_cpu_arrangement(
    *,
    backend: str,
    cores: int,
    batch_size: int,
    divides: tuple[int, ...] = (),
    explicit: tuple[str, ...] = (),
    processes: int = 1,
    started: bool = False,
) -> CpuArrangement:
    """The CPU arrangement for a run: how many host devices and which parallel mode.

    The rule, in order: flags that set devices or a parallel mode (``explicit``, their
    names) win and nothing is changed; several processes, a backend other than the
    CPU, or JAX already started (``started``: the device count can no longer be set)
    keep one device. Otherwise the count is the largest ``n <= DEVICES_PER_CORE *
    cores`` that divides ``batch_size`` and every size in ``divides`` (the training
    rows and the evaluation batch, which are split over the devices too) and leaves
    each device at least ``MIN_EXAMPLES_PER_DEVICE`` examples; ``n > 1`` trains in the
    ``"sharded"`` mode, ``n == 1`` on one device.

    Args:
      backend: JAX's default backend (``"cpu"``, ``"gpu"``, ``"tpu"``).
      cores: CPU cores of the machine.
      batch_size: examples per (micro-)batch, the one split over the devices.
      divides: other sizes the device count must divide.
      explicit: names of the flags given that choose devices or a mode.
      processes: processes of the run.
      started: whether JAX has already started its backends in this process.

    Returns:
      The :class:`CpuArrangement`.

    Raises:
      ValueError: ``cores`` or ``batch_size`` is not a positive integer.
    """
    for name, value in (("cores", cores), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if explicit:
        return CpuArrangement(1, None, f"as given ({', '.join(explicit)})")
    if processes > 1:
        return CpuArrangement(1, None, f"{processes} processes: one device each, not split")
    if backend != "cpu":
        return CpuArrangement(1, None, f"{backend} backend: the CPU is not split")
    if started:
        return CpuArrangement(
            1, None, "JAX had already started in this process: one CPU device, not split"
        )
    target = DEVICES_PER_CORE * cores
    count = next(
        n
        for n in range(target, 0, -1)
        if n == 1
        or (
            batch_size % n == 0
            and batch_size // n >= MIN_EXAMPLES_PER_DEVICE
            and all(size % n == 0 for size in divides)
        )
    )
    if count == 1:
        return CpuArrangement(
            1, None,
            f"batch {batch_size} does not split into {MIN_EXAMPLES_PER_DEVICE}+ examples a "
            f"device over 2 or more devices dividing {(batch_size, *divides)}: one CPU device",
        )  # fmt: skip
    return CpuArrangement(
        count, "sharded",
        f"{cores} cores x {DEVICES_PER_CORE}: {count} host devices, batch {batch_size} sharded "
        f"({batch_size // count} per device)",
    )  # fmt: skip


_SPLIT: dict = {}  # what split_cpu found and did in this process
_APPLIED: list[CpuArrangement] = []


def split_cpu(*, batch_size: int, explicit: tuple[str, ...] = (), processes: int = 1) -> int:
    """Splits the CPU as :func:`choose_cpu_arrangement` says for ``batch_size``.

    Call before JAX's first computation (later, nothing is split). Only the CPU client
    sees the count, so it is harmless where an accelerator is the default backend. A
    host device count already in ``XLA_FLAGS`` counts as given. Sizes that must also
    divide (the data sets') are checked later by :func:`arrange_cpu`, which can only
    lower the count. Returns the devices the CPU was split into (1: not split).
    """
    started = _backends_started()
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        explicit = (*explicit, "XLA_FLAGS's host device count")
    planned = choose_cpu_arrangement(
        backend="cpu", cores=os.cpu_count() or 1, batch_size=batch_size,
        explicit=explicit, processes=processes, started=started,
    )  # fmt: skip
    if planned.host_devices > 1:
        use_cpu_devices(planned.host_devices)
    _SPLIT.update(started=started, explicit=explicit, devices=planned.host_devices)
    return planned.host_devices


def arrange_cpu(
    *,
    batch_size: int,
    divides: tuple[int, ...] = (),
    explicit: tuple[str, ...] = (),
    processes: int = 1,
) -> CpuArrangement:
    """The arrangement to train with, after :func:`split_cpu` (recorded for the summary).

    The rule (:func:`choose_cpu_arrangement`) on the backend JAX started, with every
    size the device count must divide; its count is at most the split's, and a run
    uses that many of the host devices. Without an earlier :func:`split_cpu` in this
    process it keeps one device.
    """
    chosen = choose_cpu_arrangement(
        backend=jax.default_backend(), cores=os.cpu_count() or 1, batch_size=batch_size,
        divides=divides, explicit=_SPLIT.get("explicit", explicit),
        processes=processes, started=_SPLIT.get("started", True),
    )  # fmt: skip
    _APPLIED[:] = [chosen]
    return chosen


def applied_arrangement() -> dict | None:
    """The arrangement :func:`arrange_cpu` chose in this process, as a dict (or None)."""
    return _APPLIED[0].as_dict() if _APPLIED else None


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public query that does not start them

    return bool(getattr(xla_bridge, "_backends", None))


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
