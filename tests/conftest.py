"""Test configuration: eight fake CPU devices and strict JAX numerics."""

import os

# Must be set before JAX initialises its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402
from helpers import write_image_folder  # noqa: E402


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny CIFAR-layout folder: 10 classes of random 32x32 PNGs, 8 train and 4 test each."""
    root = tmp_path_factory.mktemp("cifar")
    write_image_folder(root)
    return root
