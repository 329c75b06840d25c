"""Data parallelism in one place: pmap, jit with shardings, shard_map and ZeRO stage 1.

Every mode runs the same pure program, written once with an optional mapped axis
(``body(state, *args, axis_name, constrain) -> (state, outputs)``); only where the
arrays live and how gradients are averaged differ:

- ``"none"``: one device.
- ``"pmap"``: state replicated per device, batch split on a leading device axis,
  gradients, BatchNorm statistics and metrics averaged with ``lax.pmean``.
- ``"sharded"``: ``jax.jit`` over a ``Mesh``; batch sharded over ``data``, state
  replicated; XLA inserts the collectives (the path JAX recommends).
- ``"shard_map"``: the program written per device under ``jax.shard_map``, with
  explicit ``pmean`` as in ``pmap`` but on global arrays.
- ``"zero"``: as ``"sharded"``, with the optimizer state partitioned over ``data``
  (ZeRO stage 1), so optimizer memory per device falls as ``1/N``.

For ``"pmap"`` and ``"shard_map"`` the model must average its BatchNorm statistics
over the mapped axis: create it with ``bn_axis_name=DATA_AXIS``. In every mode one
step on a global batch equals one single-device step on that batch.

The training engine compiles its chunk programs (several steps each) through
:meth:`Placement.compile`; :func:`make_parallel_train_step` gives the single step.

**Where the data set lives** is decided in :func:`make_placement`: with a data axis
of more than one device (``pmap``, ``sharded``, ``shard_map``, ``zero``) the uint8
training set is split over the devices along its rows (kind ``"batch"``, each device
``1/N`` of it) and the stacked test set along its batch axis (``"steps_batch"``);
with one device it is replicated. :meth:`Placement.take` gathers a batch from either
layout to the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sgdjax.parallel import (
    DATA_AXIS,
    addressable_devices,
    batch_sharding,
    check_divisible,
    data_mesh,
    place_global,
    process_rows,
    replicated,
    zero_sharding,
)
from sgdjax.training._state import TrainState
from sgdjax.training._step import make_train_step

MODES = ("none", "pmap", "sharded", "shard_map", "zero")
# How a program argument is laid out: a full copy everywhere, split along axis 0 (a
# batch) or axis 1 (stacked batches: steps x batch), or a small scalar.
ARG_KINDS = ("replicated", "batch", "steps_batch", "scalar")


def needs_bn_axis(mode: str) -> bool:
    """Whether models for ``mode`` must be created with ``bn_axis_name=DATA_AXIS``."""
    return mode in ("pmap", "shard_map")


def _identity(tree):
    return tree


def _split_axis(kind: str) -> int | None:
    return {"batch": 0, "steps_batch": 1}.get(kind)


@dataclasses.dataclass
class Placement:
    """Where one parallel mode keeps the state and the data, and how it compiles programs.

    Attributes:
      mode: one of :data:`MODES`.
      num_devices: devices the batch is split over.
      mesh: the device mesh (``None`` for ``"none"``).
      shard_data: whether data sets are split over the devices (see
        :meth:`data_kind`) instead of replicated.
    """

    mode: str
    num_devices: int
    mesh: Any = None
    shard_data: bool = False
    _state_shardings: Any = None

    # ------------------------------------------------------------ state
    def place_state(self, state: TrainState) -> Any:
        """Moves a single-device :class:`TrainState` where this mode's programs want it."""
        if self.mode == "none":
            return state
        if self.mode == "pmap":  # one copy per local device (collectives span processes)
            stacked = jax.tree.map(
                lambda x: jnp.broadcast_to(x, (self._local_count, *jnp.shape(x))), state
            )
            return self._pmap_copy(stacked)
        everywhere = replicated(self.mesh)
        shardings = jax.tree.map(lambda _: everywhere, state)
        if self.mode == "zero":
            shardings = shardings.replace(opt_state=zero_sharding(state.opt_state, self.mesh))
        self._state_shardings = shardings
        if jax.process_count() > 1:  # each process fills its own devices (typed keys too)
            return place_global(state, shardings)
        return jax.device_put(state, shardings)

    def gather_state(self, placed: Any) -> TrainState:
        """A placed state as one ordinary :class:`TrainState`."""
        return self.first(placed)

    def first(self, outputs: Any) -> Any:
        """A program's (device-averaged) outputs, without pmap's device axis: pmap's
        copy on this process's first device, read from that device alone (``x[0]``
        would be a program over every process's devices)."""
        if self.mode != "pmap":
            return outputs
        first_device = addressable_devices(self.mesh)[0]

        def local_copy(x):
            shard = next(s for s in x.addressable_shards if s.device == first_device)
            return shard.data.reshape(x.shape[1:])

        return jax.tree.map(local_copy, outputs)

    # ------------------------------------------------------------ data
    def check(self, array: Any, kind: str) -> None:
        """Raises a ``ValueError`` unless ``array``'s split axis divides over the devices."""
        axis = _split_axis(kind)
        if axis is not None:
            check_divisible(int(np.shape(array)[axis]), self.num_devices)

    def data_kind(self, stacked: bool = False) -> str:
        """The kind a data set is placed as: its rows split over the devices when
        :attr:`shard_data` (``"batch"``; a test set stacked ``(batches, size, ...)``:
        ``"steps_batch"``), else ``"replicated"``."""
        if not self.shard_data:
            return "replicated"
        return "steps_batch" if stacked else "batch"

    def own_rows(self, kind: str, length: int) -> slice:
        """The block of ``length`` rows along ``kind``'s split axis that this process's
        devices hold (all of them in one process, or for an unsplit kind)."""
        if _split_axis(kind) is None or self.mode == "none" or jax.process_count() == 1:
            return slice(0, length)
        return process_rows(batch_sharding(self.mesh), length)

    def place(self, array: Any, kind: str) -> Any:
        """Places one program argument of ``kind`` (see :data:`ARG_KINDS`), given whole."""
        self.check(array, kind)
        if self.mode == "none":
            return jax.device_put(array) if kind == "replicated" else array
        if self.mode == "pmap":
            if kind == "replicated":
                devices = self._local_count
                return self._pmap_copy(np.broadcast_to(array, (devices, *np.shape(array))))
            axis = _split_axis(kind)
            rows = self.own_rows(kind, int(np.shape(array)[axis])) if axis is not None else None
            own = array if rows is None else np.asarray(array)[(slice(None),) * axis + (rows,)]
            return self._pmap_split(own, kind)
        if jax.process_count() > 1:  # every process holds the array; each fills its devices
            return place_global(np.asarray(array), self._sharding(kind))
        return jax.device_put(array, self._sharding(kind))

    def place_local(self, local: Any, kind: str, length: int) -> Any:
        """Places an argument of ``kind`` from this process's rows alone.

        ``local`` holds the rows :meth:`own_rows` names of an array whose split axis
        has ``length`` rows in all; nothing crosses between processes
        (``jax.make_array_from_process_local_data``). In one process it is :meth:`place`.
        """
        axis = _split_axis(kind)
        if axis is None or self.mode == "none" or jax.process_count() == 1:
            return self.place(local, kind)
        check_divisible(length, self.num_devices)
        if self.mode == "pmap":
            return self._pmap_split(np.asarray(local), kind)
        shape = list(np.shape(local))
        shape[axis] = length
        return jax.make_array_from_process_local_data(
            self._sharding(kind), np.asarray(local), tuple(shape)
        )

    def _pmap_split(self, own: Any, kind: str) -> Any:
        """This process's rows on its devices, with pmap's leading device axis."""
        devices = self._local_count
        if kind == "batch":
            return self._pmap_copy(np.reshape(own, (devices, -1, *np.shape(own)[1:])))
        if kind == "steps_batch":
            steps, size = np.shape(own)[:2]
            split = np.reshape(own, (steps, devices, size // devices, *np.shape(own)[2:]))
            return self._pmap_copy(np.swapaxes(split, 0, 1))
        return own

    def take(self, images: Any, labels: Any, indices: Any, axis_name: str | None):
        """One device's share of the batch of examples ``indices``, inside a program.

        ``indices`` are a whole batch's example numbers (the same on every device);
        ``images`` and ``labels`` the data set as placed by :meth:`data_kind`. Returns
        ``(images, labels, indices)`` of this device's share (the whole batch with
        ``axis_name=None``). Replicated data: a local gather. Split data: each device
        gathers the batch's examples it holds (zeros elsewhere) and one reduce-scatter
        over the devices (``psum_scatter``) hands every device its share, exactly, as
        the other devices contribute zeros.
        """
        if not self.shard_data:
            if axis_name is not None:
                indices = _own_share(indices, axis_name)
            return images[indices], labels[indices], indices
        if axis_name is not None:
            return _take_from_shards(images, labels, indices, axis_name)
        split = PartitionSpec(DATA_AXIS)
        gather = jax.shard_map(
            functools.partial(_take_from_shards, axis_name=DATA_AXIS),
            mesh=self.mesh,
            in_specs=(split, split, PartitionSpec()),
            out_specs=(split, split, split),
            check_vma=False,
        )
        return gather(images, labels, indices)

    @property
    def _local_count(self) -> int:
        """Devices of the mesh in this process: pmap's leading axis here."""
        return len(addressable_devices(self.mesh))

    def _sharding(self, kind: str) -> NamedSharding:
        axis = _split_axis(kind)
        if axis is None:
            return replicated(self.mesh)
        return NamedSharding(self.mesh, PartitionSpec(*([None] * axis), DATA_AXIS))

    @functools.cached_property
    def _pmap_copy(self) -> Callable:
        # An identity pmap gives copies the placement the programs' outputs have, so the
        # second call does not compile again.
        return jax.pmap(_identity, devices=list(self.mesh.devices))

    # ------------------------------------------------------------ programs
    def compile(self, body: Callable, kinds: Sequence[str], *, donate: bool = True) -> Callable:
        """``program(placed_state, *args) -> (placed_state, outputs)`` for this mode.

        ``body(state, *args, axis_name, constrain)`` is written for one device's share:
        ``axis_name`` is the mapped axis (``None`` when the program sees global arrays)
        and ``constrain(batch)`` marks a batch to be split over the devices. Its outputs
        must be the same on every device (averaged over ``axis_name``). Call
        :meth:`place_state` before compiling for ``"sharded"`` and ``"zero"``.
        """
        for kind in kinds:
            if kind not in ARG_KINDS:
                raise ValueError(f"kind must be one of {ARG_KINDS}, got {kind!r}")
        donated = (0,) if donate else ()
        if self.mode == "none":
            return jax.jit(
                functools.partial(body, axis_name=None, constrain=_identity),
                donate_argnums=donated,
            )
        if self.mode == "pmap":
            return jax.pmap(
                functools.partial(body, axis_name=DATA_AXIS, constrain=_identity),
                axis_name=DATA_AXIS,
                in_axes=(0, *[None if kind == "scalar" else 0 for kind in kinds]),
                devices=list(self.mesh.devices),
                donate_argnums=donated,
            )
        specs = [self._sharding(kind).spec for kind in kinds]
        if self.mode == "shard_map":
            mapped = jax.shard_map(
                functools.partial(body, axis_name=DATA_AXIS, constrain=_identity),
                mesh=self.mesh,
                in_specs=(PartitionSpec(), *specs),
                out_specs=(PartitionSpec(), PartitionSpec()),
                check_vma=False,
            )
            return jax.jit(mapped, donate_argnums=donated)
        if self._state_shardings is None:
            raise RuntimeError("place the state with place_state before compiling")
        split = batch_sharding(self.mesh)
        return jax.jit(
            functools.partial(
                body,
                axis_name=None,
                constrain=lambda tree: jax.lax.with_sharding_constraint(tree, split),
            ),
            in_shardings=(self._state_shardings, *[self._sharding(kind) for kind in kinds]),
            out_shardings=(self._state_shardings, replicated(self.mesh)),
            donate_argnums=donated,
        )


def make_placement(
    mode: str, num_devices: int | None = None, *, shard_data: bool | None = None
) -> Placement:
    """The :class:`Placement` of ``mode`` over ``num_devices`` devices (all by default).

    ``shard_data`` (default: the rule, decided here alone) splits data sets over the
    devices whenever the data axis has more than one device; ``False`` replicates
    them (kept for measurements; the numbers are the same).

    Raises:
      ValueError: an unknown mode, more devices than exist, or ``shard_data`` with
        one device.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        if shard_data:
            raise ValueError("shard_data needs a data axis of more than one device")
        return Placement(mode, 1)
    mesh = data_mesh(num_devices)
    count = mesh.shape[DATA_AXIS]
    if shard_data is None:
        shard_data = count > 1
    return Placement(mode, count, mesh, shard_data=bool(shard_data))


def _own_share(indices: jax.Array, axis_name: str) -> jax.Array:
    """This device's block of a batch's leading axis, inside a mapped program."""
    local = indices.shape[0] // jax.lax.psum(1, axis_name)
    return jax.lax.dynamic_slice_in_dim(indices, jax.lax.axis_index(axis_name) * local, local)


def _take_from_shards(images, labels, indices, axis_name):
    """:meth:`Placement.take` on rows split over ``axis_name`` (one device's view).

    Device ``d`` holds rows ``[d R, (d + 1) R)``; with ``local = indices - d R`` it
    takes ``rows_i = images[local_i]`` where ``0 <= local_i < R`` and ``0`` elsewhere,
    so the sum over the devices of ``rows`` is the batch; ``psum_scatter`` returns to
    each device its block of that sum.
    """
    count = images.shape[0]
    local = indices - jax.lax.axis_index(axis_name) * count
    mine = jnp.logical_and(local >= 0, local < count)
    safe = jnp.clip(local, 0, count - 1)
    rows = jnp.where(mine.reshape(-1, *[1] * (images.ndim - 1)), images[safe], 0)
    got = jnp.where(mine, labels[safe], 0)
    rows, got = jax.lax.psum_scatter(
        (rows.astype(images.dtype), got.astype(labels.dtype)), axis_name,
        scatter_dimension=0, tiled=True,
    )  # fmt: skip
    return rows, got, _own_share(indices, axis_name)


@dataclasses.dataclass
class ParallelStep:
    """A train step for one parallel mode, with the functions that place its inputs.

    Attributes:
      mode: one of :data:`MODES`.
      num_devices: devices the batch is split over.
      step: ``(placed_state, placed_batch) -> (placed_state, metrics)``, donated.
      place_state: moves a single-device :class:`TrainState` where ``step`` wants it.
      place_batch: moves a host batch ``{"image", "label"}`` where ``step`` wants it.
      gather_state: returns a placed state as one ordinary :class:`TrainState`.
    """

    mode: str
    num_devices: int
    step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
    place_state: Callable[[TrainState], Any]
    place_batch: Callable[[dict[str, Any]], Any]
    gather_state: Callable[[Any], TrainState]


def make_parallel_train_step(
    mode: str,
    *,
    num_devices: int | None = None,
    **step_options: Any,
) -> ParallelStep:
    """Builds the train step for ``mode`` over ``num_devices`` devices (all by default).

    Args:
      mode: one of ``"none"``, ``"pmap"``, ``"sharded"``, ``"shard_map"``, ``"zero"``.
      num_devices: devices to split the batch over; at most ``jax.device_count()``.
      **step_options: passed to :func:`make_train_step` (augmentation, accumulation,
        label smoothing, learning-rate metric, SAM, EMA).

    Returns:
      A :class:`ParallelStep`.

    Raises:
      ValueError: an unknown mode, or more devices than exist.
    """
    placement = make_placement(mode, num_devices)
    steps = {
        None: make_train_step(jit=False, **step_options),
        DATA_AXIS: make_train_step(axis_name=DATA_AXIS, jit=False, **step_options),
    }

    def body(state, batch, *, axis_name, constrain):
        return steps[axis_name](state, constrain(batch))

    compiled: dict[str, Callable] = {}

    def step(state, batch):
        if "step" not in compiled:
            compiled["step"] = placement.compile(body, ("batch",))
        return compiled["step"](state, batch)

    def place_batch(batch):
        return jax.tree.map(lambda x: placement.place(x, "batch"), batch)

    return ParallelStep(
        mode, placement.num_devices, step, placement.place_state, place_batch,
        placement.gather_state,
    )  # fmt: skip
