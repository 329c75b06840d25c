"""Multi-host start-up: ``jax.distributed.initialize`` from arguments or the environment."""

from __future__ import annotations

import os

import jax

ENVIRONMENT = {
    "coordinator_address": "SGDJAX_COORDINATOR",
    "num_processes": "SGDJAX_NUM_PROCESSES",
    "process_id": "SGDJAX_PROCESS_ID",
}


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-host run; returns False (and does nothing) for a single process.

    Arguments left as ``None`` are read from ``SGDJAX_COORDINATOR`` (``host:port`` of
    process 0), ``SGDJAX_NUM_PROCESSES`` and ``SGDJAX_PROCESS_ID``. When none are set
    anywhere, nothing is initialised unless a cluster JAX detects by itself is found
    (Slurm, TPU pods, Open MPI): then ``jax.distributed.initialize()`` is called with
    no arguments and JAX reads the cluster's own variables.

    Returns:
      True when this process is part of a multi-process run.
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    for name, variable in ENVIRONMENT.items():
        if given[name] is None and os.environ.get(variable):
            given[name] = os.environ[variable]
    if given["num_processes"] is not None:
        given["num_processes"] = int(given["num_processes"])
        if given["num_processes"] <= 0:
            raise ValueError(f"num_processes must be positive, got {given['num_processes']}")
    if given["process_id"] is not None:
        given["process_id"] = int(given["process_id"])
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
    if explicit and given["num_processes"] == 1:
        return False
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    return jax.process_count() > 1
