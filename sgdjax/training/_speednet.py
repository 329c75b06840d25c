"""The speed-run network: a frozen whitening convolution and three small conv blocks.

Our Flax take on the network of the fastest published single-GPU CIFAR-10 recipes
(airbench94, K. Jordan 2024): about 2M parameters, a 2x2 whitening convolution
computed from the training data and kept fixed, GELU, BatchNorm with a frozen scale,
identity-initialised convolutions and a scaled linear head.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WHITEN_PATCH = 2


def _patches(xp, images):
    """Every 2x2 patch of NHWC ``images`` as a row ``(dy, dx, c)``; ``xp`` is numpy or jnp."""
    n, height, width, channels = images.shape
    k = WHITEN_PATCH
    windows = [
        images[:, dy : height - k + 1 + dy, dx : width - k + 1 + dx, :]
        for dy in range(k)
        for dx in range(k)
    ]
    return xp.stack(windows, axis=3).reshape(-1, k * k * channels)


def patch_covariance(images: jax.Array) -> jax.Array:
    """``P^T P / n`` over every 2x2 patch ``p`` (flattened as ``(dy, dx, c)``) of NHWC floats."""
    patches = _patches(jnp, images).astype(jnp.float32)
    return jnp.matmul(patches.T, patches, precision="highest") / patches.shape[0]


def kernel_from_covariance(covariance: np.ndarray, *, eps: float = 5e-4) -> np.ndarray:
    """The whitening kernel for a 12x12 patch covariance (see :func:`whitening_kernel`)."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    covariance = np.asarray(covariance, np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # Largest eigenvalue first, as airbench94 orders them: when the first block is
    # narrower than 24 channels, its identity-initialised filters see the strongest ones.
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = eigenvectors.T / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)[:, None]
    filters = np.concatenate([filters, -filters], axis=0)  # (24, 12)
    k = WHITEN_PATCH
    kernel = filters.reshape(-1, k, k, covariance.shape[0] // (k * k)).transpose(1, 2, 3, 0)
    return kernel.astype(np.float32)  # HWIO


def whitening_kernel(images: np.ndarray, *, eps: float = 5e-4) -> np.ndarray:
    """A 2x2 convolution kernel that whitens the images' 2x2 patches.

    With ``P`` the ``(n, 12)`` matrix of every 2x2x3 patch of ``images`` (already
    normalized floats, NHWC) and ``C = P^T P / n = V diag(l) V^T``, the filters are
    the rows of ``V^T / sqrt(l + eps)`` (largest eigenvalue first) and their negatives,
    so the 24 outputs of a patch ``p`` are ``+-(v_i . p) / sqrt(l_i + eps)``: unit
    variance, uncorrelated.

    Args:
      images: ``(N, H, W, 3)`` float array (a few thousand images suffice).
      eps: added to the eigenvalues.

    Returns:
      ``(2, 2, 3, 24)`` float32 kernel (HWIO).
    """
    images = np.asarray(images, np.float64)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    patches = _patches(np, images)
    return kernel_from_covariance(patches.T @ patches / len(patches), eps=eps)


def _pool(x: jax.Array, size: int) -> jax.Array:
    """``size x size`` max pooling with stride ``size`` (floor), as a reshape and a max."""
    n, h, w, c = x.shape
    h, w = h // size * size, w // size * size
    x = x[:, :h, :w, :]
    return x.reshape(n, h // size, size, w // size, size, c).max(axis=(2, 4))


# torch's default for conv and linear weights, kaiming_uniform_(a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dirac_init(base=None):
    """``base`` init (default: torch's ``U(+-1/sqrt(fan_in))``) with the first
    ``min(in, out)`` filters set to the identity."""
    base = torch_default_init if base is None else base

    def init(key, shape, dtype=jnp.float32):
        kernel = base(key, shape, dtype)
        kh, kw, cin, cout = shape
        identity = min(cin, cout)
        kernel = kernel.at[:, :, :, :identity].set(0.0)
        eye = jnp.eye(cin, identity, dtype=dtype)
        return kernel.at[kh // 2, kw // 2, :, :identity].set(eye)

    return init


class _Block(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    features: int
    bn_momentum: float
    dtype: jnp.dtype
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool):
        def bn(name):
            # torch's momentum m updates running = (1 - m) running + m batch; flax's
            # momentum is the weight on the old value. Scale frozen at 1.
            return nn.BatchNorm(
                use_running_average=not train, momentum=1.0 - self.bn_momentum, epsilon=1e-12,
                use_scale=False, dtype=self.dtype, name=name,
                axis_name=self.bn_axis_name if train else None,
            )  # fmt: skip

        def conv(name):
            return nn.Conv(
                self.features, (3, 3), padding="SAME", use_bias=False,
                kernel_init=dirac_init(), dtype=self.dtype, name=name,
            )  # fmt: skip

        x = _pool(conv("conv1")(x), 2)
        x = nn.gelu(bn("norm1")(x), approximate=False)
        x = conv("conv2")(x)
        return nn.gelu(bn("norm2")(x), approximate=False)


class SpeedNet(nn.Module):
    """3 blocks -> global max-pool -> linear / 9 (airbench94's body; whiten it with
    :class:`Whitened`, as the ``speedrun`` preset does).

    Attributes:
      widths: channels of the three blocks.
      num_classes: outputs.
      bn_momentum: torch-style BatchNorm momentum (weight of the new batch); 0.4 is
        airbench94's ``batchnorm_momentum=0.6``, which it hands torch as ``1 - 0.6``.
      scaling_factor: multiplies the logits.
      dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
      bn_axis_name: a mapped axis to average BatchNorm statistics over (``pmap``).
    """

    widths: Sequence[int] = (64, 256, 256)
    num_classes: int = 10
    bn_momentum: float = 0.4
    scaling_factor: float = 1.0 / 9.0
    dtype: jnp.dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = x.astype(self.dtype)
        for index, width in enumerate(self.widths):
            x = _Block(width, self.bn_momentum, self.dtype, self.bn_axis_name,
                       name=f"block{index + 1}")(x, train=train)  # fmt: skip
        x = jnp.max(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes, use_bias=False, kernel_init=torch_default_init,
            dtype=self.dtype, name="head",
        )(x)  # fmt: skip
        return (x * self.scaling_factor).astype(jnp.float32)


class Whitened(nn.Module):
    """whiten(2x2 conv, VALID, 24 filters) -> GELU -> ``net``: any model, whitened.

    The whitening kernel is set from the training data after ``init`` (see
    :func:`whitening_kernel`; the engine does it when ``Config.whiten`` is set) and
    kept fixed by the optimizer's ``frozen`` group; its bias trains. The output is one
    pixel smaller than the input (31 x 31 for CIFAR).

    Attributes:
      net: the model behind the whitening layer, called as ``net(x, train=...)``.
      dtype: compute dtype of the whitening convolution.
    """

    net: nn.Module
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Conv(
            2 * WHITEN_PATCH * WHITEN_PATCH * 3, (WHITEN_PATCH, WHITEN_PATCH), padding="VALID",
            dtype=self.dtype, name="whiten",
        )(x.astype(self.dtype))  # fmt: skip
        return self.net(nn.gelu(x, approximate=False), train=train)
