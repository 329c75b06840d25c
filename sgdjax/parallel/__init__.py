"""Device meshes, shardings (including ZeRO stage 1) and multi-host start-up."""

from sgdjax.parallel._distributed import initialize_distributed
from sgdjax.parallel._host import use_cpu_devices
from sgdjax.parallel._mesh import (
    DATA_AXIS,
    batch_sharding,
    bytes_per_device,
    check_divisible,
    data_mesh,
    replicated,
    shard_batch,
    zero_sharding,
)

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "bytes_per_device",
    "check_divisible",
    "data_mesh",
    "initialize_distributed",
    "replicated",
    "shard_batch",
    "use_cpu_devices",
    "zero_sharding",
]
