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
    """

    mode: str
    num_devices: int
    mesh: Any = None
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
        if self.mode == "pmap":  # device 0's copy (x[0] alone would span the devices)
            first_device = addressable_devices(self.mesh)[0]
            return jax.tree.map(lambda x: jax.device_put(x[0], first_device), placed)
        return placed

    def first(self, outputs: Any) -> Any:
        """A program's (device-averaged) outputs, without pmap's device axis."""
        return jax.tree.map(lambda x: x[0], outputs) if self.mode == "pmap" else outputs

    # ------------------------------------------------------------ data
    def check(self, array: Any, kind: str) -> None:
        """Raises a ``ValueError`` unless ``array``'s split axis divides over the devices."""
        axis = _split_axis(kind)
        if axis is not None:
            check_divisible(int(np.shape(array)[axis]), self.num_devices)

    def place(self, array: Any, kind: str) -> Any:
        """Places one program argument of ``kind`` (see :data:`ARG_KINDS`)."""
        self.check(array, kind)
        if self.mode == "none":
            return jax.device_put(array) if kind == "replicated" else array
        if self.mode == "pmap":
            devices = self._local_count
            if kind == "replicated":
                return self._pmap_copy(np.broadcast_to(array, (devices, *np.shape(array))))
            array = self._own_rows(array, kind)
            if kind == "batch":
                return np.reshape(array, (devices, -1, *np.shape(array)[1:]))
            if kind == "steps_batch":
                steps, size = np.shape(array)[:2]
                split = np.reshape(array, (steps, devices, size // devices, *np.shape(array)[2:]))
                return np.swapaxes(split, 0, 1)
            return array
        if jax.process_count() > 1:  # every process holds the array; each fills its devices
            return place_global(np.asarray(array), self._sharding(kind))
        return jax.device_put(array, self._sharding(kind))

    @property
    def _local_count(self) -> int:
        """Devices of the mesh in this process: pmap's leading axis here."""
        return len(addressable_devices(self.mesh))

    def _own_rows(self, array: Any, kind: str) -> Any:
        """This process's block of a batch's rows (all of them in one process)."""
        axis = _split_axis(kind)
        if axis is None or jax.process_count() == 1:
            return array
        rows = process_rows(batch_sharding(self.mesh), int(np.shape(array)[axis]))
        return np.asarray(array)[(slice(None),) * axis + (rows,)]

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


def make_placement(mode: str, num_devices: int | None = None) -> Placement:
    """The :class:`Placement` of ``mode`` over ``num_devices`` devices (all by default).

    Raises:
      ValueError: an unknown mode, or more devices than exist.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return Placement(mode, 1)
    mesh = data_mesh(num_devices)
    return Placement(mode, mesh.shape[DATA_AXIS], mesh)


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
