"""Data-parallel training steps: pmap, jit with shardings, shard_map and ZeRO stage 1.

Every mode runs the same pure step from :func:`make_train_step`; only where the
arrays live and how gradients are averaged differ:

- ``"none"``: one device.
- ``"pmap"``: state replicated per device, batch split on a leading device axis,
  gradients, BatchNorm statistics and metrics averaged with ``lax.pmean``.
- ``"sharded"``: ``jax.jit`` over a ``Mesh``; batch sharded over ``data``, state
  replicated; XLA inserts the collectives (the path JAX recommends).
- ``"shard_map"``: the step written per device under ``jax.shard_map``, with explicit
  ``pmean`` as in ``pmap`` but on global arrays.
- ``"zero"``: as ``"sharded"``, with the optimizer state partitioned over ``data``
  (ZeRO stage 1), so optimizer memory per device falls as ``1/N``.

For ``"pmap"`` and ``"shard_map"`` the model must average its BatchNorm statistics
over the mapped axis: create it with ``bn_axis_name=DATA_AXIS``. In every mode one
step on a global batch equals one single-device step on that batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sgdjax.parallel import (
    DATA_AXIS,
    batch_sharding,
    check_divisible,
    data_mesh,
    replicated,
    zero_sharding,
)
from sgdjax.training._state import TrainState
from sgdjax.training._step import make_train_step

MODES = ("none", "pmap", "sharded", "shard_map", "zero")


def needs_bn_axis(mode: str) -> bool:
    """Whether models for ``mode`` must be created with ``bn_axis_name=DATA_AXIS``."""
    return mode in ("pmap", "shard_map")


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


def _state_shardings(state: TrainState, mesh, *, zero: bool) -> TrainState:
    everywhere = replicated(mesh)
    shardings = jax.tree.map(lambda _: everywhere, state)
    if zero:
        shardings = shardings.replace(opt_state=zero_sharding(state.opt_state, mesh))
    return shardings


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
        label smoothing, learning-rate metric).

    Returns:
      A :class:`ParallelStep`.

    Raises:
      ValueError: an unknown mode, or more devices than exist.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return ParallelStep(
            mode, 1, make_train_step(**step_options), lambda s: s, lambda b: b, lambda s: s
        )
    mesh = data_mesh(num_devices)
    devices = mesh.shape[DATA_AXIS]

    def checked(batch):
        for leaf in jax.tree.leaves(batch):
            check_divisible(int(jnp.shape(leaf)[0]), devices)
        return batch

    if mode == "pmap":
        local_step = make_train_step(axis_name=DATA_AXIS, jit=False, **step_options)
        step = jax.pmap(
            local_step, axis_name=DATA_AXIS, devices=list(mesh.devices), donate_argnums=(0,)
        )

        def place_batch(batch):
            checked(batch)
            return jax.tree.map(lambda x: x.reshape(devices, -1, *x.shape[1:]), batch)

        # An identity pmap gives the copies the same placement the step's outputs have,
        # so the second step does not compile again.
        copy_to_devices = jax.pmap(lambda tree: tree, devices=list(mesh.devices))

        def place_state(state):
            stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (devices, *x.shape)), state)
            return copy_to_devices(stacked)

        return ParallelStep(
            mode,
            devices,
            step,
            place_state,
            place_batch,
            lambda state: jax.tree.map(lambda x: x[0], state),
        )

    def place_batch(batch):
        return jax.device_put(checked(batch), batch_sharding(mesh))

    if mode == "shard_map":
        local_step = make_train_step(axis_name=DATA_AXIS, jit=False, **step_options)
        mapped = jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False,
        )
        step = jax.jit(mapped, donate_argnums=(0,))
        return ParallelStep(
            mode,
            devices,
            step,
            lambda state: jax.device_put(state, replicated(mesh)),
            place_batch,
            lambda state: state,
        )

    zero = mode == "zero"
    global_step = make_train_step(jit=False, **step_options)
    compiled: dict[str, Callable] = {}

    def place_state(state):
        shardings = _state_shardings(state, mesh, zero=zero)
        if "step" not in compiled:
            compiled["step"] = jax.jit(
                global_step,
                in_shardings=(shardings, batch_sharding(mesh)),
                out_shardings=(shardings, replicated(mesh)),
                donate_argnums=(0,),
            )
        return jax.device_put(state, shardings)

    def step(state, batch):
        if "step" not in compiled:
            raise RuntimeError("place the state with place_state before the first step")
        return compiled["step"](state, batch)

    return ParallelStep(mode, devices, step, place_state, place_batch, lambda state: state)
