"""Several processes: start-up, global arrays from local data, and agreement checks.

A run over several processes (hosts, or several processes on one host) calls
:func:`initialize_distributed` first. Afterwards ``jax.devices()`` lists the devices
of every process and a ``Mesh`` over them spans the processes; each process can
only read and write its own (addressable) devices. The helpers here place data and
state on such a mesh without cross-host transfers and check that the processes
agree before any work:

- :func:`process_rows`: the rows of a global batch this process supplies.
- :func:`global_batch`: process-local rows -> one global array sharded over the mesh.
- :func:`place_global`: a host tree (the same on every process, e.g. a freshly
  initialised train state, typed PRNG keys included) -> global arrays with the
  given shardings; each process fills only its own devices.
- :func:`gather_to_host`: global arrays -> numpy on every process.
- :func:`check_same_config`, :func:`check_shared_directory`, :func:`any_process`:
  collective checks that raise the same one-line error on every process.

Every helper also works, as a plain local operation, in a single process.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENVIRONMENT = {
    "coordinator_address": "SGDJAX_COORDINATOR",
    "num_processes": "SGDJAX_NUM_PROCESSES",
    "process_id": "SGDJAX_PROCESS_ID",
}


class ProcessMismatchError(RuntimeError):
    """The processes of one run disagree (config, output folder): raised on every process."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process run; returns False (and does nothing) for a single process.

    Arguments left as ``None`` are read from ``SGDJAX_COORDINATOR`` (``host:port`` of
    process 0), ``SGDJAX_NUM_PROCESSES`` and ``SGDJAX_PROCESS_ID``. When none are set
    anywhere, nothing is initialised unless a cluster JAX detects by itself is found
    (Slurm, TPU pods, Open MPI): then ``jax.distributed.initialize()`` is called with
    no arguments and JAX reads the cluster's own variables. On CPUs the processes
    talk through gloo, JAX's default CPU collectives.

    Args:
      coordinator_address: ``host:port`` where process 0 listens.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 <= process_id < num_processes``.

    Returns:
      True when this process is part of a multi-process run.

    Raises:
      ValueError: only some of the three are given, or they are out of range.

    Example:
      >>> import sgdjax.parallel as par
      >>> par.initialize_distributed(num_processes=1, process_id=0, coordinator_address="x:1")
      False
    """
    given: dict[str, Any] = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    for name, variable in ENVIRONMENT.items():
        if given[name] is None and os.environ.get(variable):
            given[name] = os.environ[variable]
    for name in ("num_processes", "process_id"):
        if given[name] is not None:
            try:
                given[name] = int(given[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {given[name]!r}") from None
    if given["num_processes"] is not None and given["num_processes"] <= 0:
        raise ValueError(f"num_processes must be positive, got {given['num_processes']}")
    explicit = any(value is not None for value in given.values())
    cluster = any(
        key in os.environ
        for key in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")
    )
    if not explicit and not cluster:
        return False
    if explicit and None in given.values():
        missing = [ENVIRONMENT[name] for name, value in given.items() if value is None]
        raise ValueError(
            f"a multi-host run needs all of coordinator, process count and id; missing {missing}"
        )
    if explicit and not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(
            f"process_id must lie in [0, {given['num_processes']}), got {given['process_id']}"
        )
    if explicit and given["num_processes"] == 1:
        return False
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, plots and summaries."""
    return jax.process_index() == 0


def process_rows(sharding: NamedSharding, global_size: int) -> slice:
    """The rows ``[start, stop)`` of a global batch that this process supplies.

    Args:
      sharding: how the global batch is split (its leading axis over the mesh).
      global_size: the global batch size.

    Returns:
      A ``slice`` of the global batch: this process's share, in the order
      :func:`global_batch` expects it. One process gets ``slice(0, global_size)``.

    Raises:
      ValueError: this process's devices do not hold one contiguous block of rows
        (a mesh whose device order interleaves the processes).
    """
    indices = sharding.addressable_devices_indices_map((global_size,))
    blocks = sorted(
        {
            (index[0].start or 0, global_size if index[0].stop is None else index[0].stop)
            for index in indices.values()
        }
    )
    start, stop = blocks[0][0], blocks[0][1]
    for block_start, block_stop in blocks[1:]:
        if block_start > stop:
            raise ValueError(
                f"process {jax.process_index()} holds rows {blocks} of the batch, not one "
                "contiguous block; order the mesh's devices by process"
            )
        stop = max(stop, block_stop)
    return slice(start, stop)


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """One global array per leaf from the rows this process supplies.

    Each process passes its share (the rows given by
    :func:`process_rows`); the result is the global batch sharded by ``sharding``,
    assembled without any transfer between processes.

    Args:
      local_batch: a pytree of host arrays, this process's rows.
      sharding: the global batch's sharding (leading axis over the data axis).

    Returns:
      The pytree of global ``jax.Array``.
    """
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
        local_batch,
    )


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_data_sharding(sharding: NamedSharding, leaf: Any) -> NamedSharding:
    """The sharding of a key array's raw data: the key's, with the trailing axes unsplit."""
    spec = tuple(sharding.spec) + (None,) * (np.ndim(leaf) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def place_global(tree: Any, shardings: Any) -> Any:
    """Places a host tree, identical on every process, as global arrays.

    Each process fills only its addressable devices from its own copy, so nothing
    crosses between hosts. Typed PRNG keys are placed through their raw data
    (``jax.random.key_data``) and wrapped again (``jax.random.wrap_key_data``),
    which ``jax.device_put`` cannot do on a mesh that spans processes.

    Args:
      tree: a pytree of arrays (numpy, single-device ``jax.Array``, typed keys);
        flax dataclasses such as ``TrainState`` work, their static fields are kept.
      shardings: one ``NamedSharding`` for every leaf (a tree prefix is not enough),
        or a single ``NamedSharding`` for all leaves.

    Returns:
      ``tree`` with every leaf a global ``jax.Array``.
    """
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def place(leaf, sharding):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # global already
            return leaf if leaf.sharding == sharding else jax.device_put(leaf, sharding)
        if _is_key(leaf):
            raw = np.asarray(jax.random.key_data(leaf))
            data = jax.make_array_from_callback(
                raw.shape, _key_data_sharding(sharding, raw), lambda index: raw[index]
            )
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree, shardings)


def _host_value(leaf: Any) -> np.ndarray:
    if not isinstance(leaf, jax.Array):
        return np.asarray(leaf)
    if leaf.is_fully_addressable:
        return np.asarray(leaf)
    if leaf.is_fully_replicated:
        return np.asarray(leaf.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def gather_to_host(tree: Any) -> Any:
    """Every leaf of ``tree`` as a host numpy array on every process.

    Replicated global arrays are read from a local copy; sharded ones (ZeRO) are
    all-gathered, so every process must call this together. Typed PRNG keys come
    back as keys on the default device.
    """

    def fetch(leaf):
        if _is_key(leaf):
            raw = _host_value(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(leaf))
        return _host_value(leaf)

    return jax.tree.map(fetch, tree)


def addressable_devices(mesh: Mesh) -> list[jax.Device]:
    """The devices of ``mesh`` that this process drives, in mesh order.

    ``jax.pmap(..., devices=list(mesh.devices.flat))`` over a mesh that spans
    processes maps, in each process, a leading axis of ``len(addressable_devices(mesh))``
    (the local devices, not the global count); its collectives span all processes.
    """
    return [device for device in mesh.devices.flat if device.process_index == jax.process_index()]


def process_allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's ``payload`` (any length), in process order; collective."""
    if jax.process_count() == 1:
        return [payload]
    lengths = multihost_utils.process_allgather(np.asarray([len(payload)], np.int64))
    longest = int(np.max(lengths))
    buffer = np.zeros([max(longest, 1)], np.uint8)
    buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = multihost_utils.process_allgather(buffer)
    return [bytes(row[: int(n)]) for row, n in zip(np.asarray(gathered), np.ravel(lengths))]


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any of them; collective."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.max(flags))


def config_hash(config: Mapping[str, Any]) -> str:
    """A short SHA-256 of a JSON config (keys sorted), for comparing processes."""
    text = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(config: Mapping[str, Any]) -> None:
    """Raises :class:`ProcessMismatchError` on every process unless all pass equal configs.

    The configs' hashes are all-gathered; when they differ, the configs themselves
    are gathered so the error can list the fields that differ from process 0's.
    Collective: every process must call it. One process: does nothing.
    """
    if jax.process_count() == 1:
        return
    hashes = process_allgather_bytes(config_hash(config).encode())
    if len(set(hashes)) == 1:
        return
    text = json.dumps(dict(config), sort_keys=True, default=str).encode()
    configs = [json.loads(item) for item in process_allgather_bytes(text)]
    differences = []
    for index, other in enumerate(configs[1:], start=1):
        names = sorted(
            name
            for name in set(configs[0]) | set(other)
            if configs[0].get(name, "<absent>") != other.get(name, "<absent>")
        )
        if names:
            shown = ", ".join(
                f"{name}={configs[0].get(name)!r} vs {other.get(name)!r}" for name in names
            )
            differences.append(f"process {index}: {shown}")
    raise ProcessMismatchError(
        "the processes disagree on the config (process 0 against the others): "
        + "; ".join(differences)
    )


def check_shared_directory(directory: str | os.PathLike, *, timeout: float = 30.0) -> None:
    """Raises :class:`ProcessMismatchError` on every process unless ``directory`` is shared.

    Process 0 writes a file with a fresh random name into ``directory``; every other
    process waits up to ``timeout`` seconds to see it with the right content. All
    processes then agree on the outcome, so none is left waiting at a later barrier.
    Orbax checkpoints of several processes need one folder that all of them see.
    Collective: every process must call it. One process: does nothing.
    """
    if jax.process_count() == 1:
        return
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    directory = Path(directory)
    token = secrets.token_hex(8).encode() if is_primary() else b""
    token = process_allgather_bytes(token)[0].decode()
    probe = directory / f".shared-check-{token}"
    if is_primary():
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
        seen = True
    else:
        deadline = time.monotonic() + timeout
        seen = False
        while not seen and time.monotonic() < deadline:
            try:
                seen = probe.read_text() == token
            except OSError:
                time.sleep(0.05)
    unseen = multihost_utils.process_allgather(np.asarray([int(not seen)], np.int32))
    if is_primary():
        probe.unlink(missing_ok=True)
    missing = [index for index, flag in enumerate(np.ravel(unseen)) if flag]
    if missing:
        raise ProcessMismatchError(
            f"--out {directory} is not one shared folder: process(es) {missing} did not see "
            f"process 0's file there within {timeout:g} s; give every process the same "
            "folder on a shared file system"
        )


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name``; one process: returns."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
