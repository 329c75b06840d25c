"""Flax Linen CNNs for CIFAR-10 (NHWC): the tutorial ConvNet, ResNet-9 and ResNet-18."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sgdjax.training._speednet import SpeedNet

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))  # fmt: skip


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):  # fmt: skip
    """``lax.conv_general_dilated``, with the kernel gradient as shifted matmuls on CPU.

    For a stride-1, undilated, ungrouped NHWC/HWIO convolution on the CPU backend the
    forward pass and the input gradient are XLA's convolutions, and the kernel's
    gradient is written as one matrix product per kernel offset ``(i, j)``:

        dW[i, j] = sum_{n, h, w} x_pad[n, h + i, w + j, :]^T dy[n, h, w, :]

    With many examples a device, XLA's CPU backend runs the convolution it otherwise
    emits for ``dW`` (the batch contracted as features, a window as large as the
    image) up to 2x slower than these matmuls; with few (16 to 64) it is faster
    (docs/speed.md, :func:`choose_kernel_grad`). The value is the same to float32
    summation order. Every other case, and every other backend, is
    ``lax.conv_general_dilated`` unchanged. Pass it as ``nn.Conv``'s
    ``conv_general_dilated`` (the models do when ``kernel_grad="shifted"``).
    """
    simple = (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and dimension_numbers == _NHWC
        and tuple(window_strides) == (1, 1)
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and feature_group_count == 1
        and not kwargs
    )
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs,
        )  # fmt: skip
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    pads = tuple((int(low), int(high)) for low, high in padding)
    return _conv_matmul_kernel_grad(lhs, rhs, pads, precision)


KERNEL_GRADS = ("xla", "shifted")
# Examples per device from which the shifted-matmul kernel gradient is used on the CPU.
# Measured training steps (docs/speed.md, "Convolution formulations tried"): with 16
# and 64 examples a device XLA's gradient is faster (ConvNet 1.22x and 1.12x, ResNet-9
# 1.24x), with 128 on one device the two tie (ConvNet, ResNet-9), with 512 on one
# device the shifted matmuls are faster (ConvNet 1.54x); 256 was not measured.
SHIFTED_MIN_EXAMPLES = 256


def choose_kernel_grad(backend: str, examples_per_device: int) -> str:
    """The convolution kernel gradient for a step: ``"shifted"`` or ``"xla"``.

    The rule: shifted matmuls (:func:`conv_general_dilated`) on the CPU backend when a
    device's share of the (micro-)batch has at least ``SHIFTED_MIN_EXAMPLES``
    examples; XLA's own gradient otherwise (smaller shares, and every other backend).

    Raises:
      ValueError: ``examples_per_device`` is not a positive integer.
    """
    if isinstance(examples_per_device, bool) or not isinstance(examples_per_device, int) \
            or examples_per_device <= 0:  # fmt: skip
        raise ValueError(f"examples_per_device must be a positive integer, got "
                         f"{examples_per_device!r}")  # fmt: skip
    if backend == "cpu" and examples_per_device >= SHIFTED_MIN_EXAMPLES:
        return "shifted"
    return "xla"


def conv_for(kernel_grad: str):
    """The ``conv_general_dilated`` for ``nn.Conv`` that computes ``kernel_grad``."""
    if kernel_grad not in KERNEL_GRADS:
        raise ValueError(f"kernel_grad must be one of {KERNEL_GRADS}, got {kernel_grad!r}")
    return conv_general_dilated if kernel_grad == "shifted" else lax.conv_general_dilated


def _conv_nhwc(x, kernel, pads, precision):
    return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_NHWC,
                                    precision=precision)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_kernel_grad(x, kernel, pads, precision):
    return _conv_nhwc(x, kernel, pads, precision)


def _conv_forward(x, kernel, pads, precision):
    return _conv_nhwc(x, kernel, pads, precision), (x, kernel)


def _conv_backward(pads, precision, residuals, grad):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _conv_nhwc(x, kernel, pads, precision), x)
    (grad_x,) = input_vjp(grad)
    height, width = grad.shape[1:3]
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    rows = grad.reshape(-1, grad.shape[-1])
    grad_kernel = jnp.stack([
        jnp.dot(padded[:, i : i + height, j : j + width, :].reshape(-1, x.shape[-1]).T, rows,
                precision=precision)
        for i in range(kernel.shape[0]) for j in range(kernel.shape[1])
    ]).reshape(kernel.shape)  # fmt: skip
    return grad_x, grad_kernel.astype(kernel.dtype)


_conv_matmul_kernel_grad.defvjp(_conv_forward, _conv_backward)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 on NHWC, written as a reshape and a max.

    Equal to ``nn.max_pool(x, (2, 2), (2, 2))`` (an odd last row or column is dropped,
    as there). Its gradient is a plain masked broadcast, which XLA's CPU backend runs
    much faster than the select-and-scatter it emits for ``nn.max_pool``'s gradient.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class _ConvBN(nn.Module):
    """3x3 convolution (no bias), BatchNorm, ReLU; optionally a 2x2 max-pool before BN."""

    features: int
    pool: bool = False
    strides: int = 1
    relu: bool = True
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    kernel_grad: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(
            self.features,
            (3, 3),
            strides=self.strides,
            padding=1,
            use_bias=False,
            dtype=self.dtype,
            conv_general_dilated=conv_for(self.kernel_grad),
        )(x)
        if self.pool:
            x = max_pool_2x2(x)
        x = _batch_norm(train, self.dtype, self.bn_axis_name)(x)
        return nn.relu(x) if self.relu else x


def _batch_norm(train: bool, dtype: Any, axis_name: str | None) -> nn.BatchNorm:
    # torch's BatchNorm2d defaults: momentum 0.1 (flax: 1 - 0.1), eps 1e-5.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        axis_name=axis_name if train else None,
    )


class ConvNet(nn.Module):
    """The tutorial CNN: two conv-BN-ReLU-pool stages and a dense classifier.

    conv3x3(32) - BN - ReLU - maxpool2 - conv3x3(64) - BN - ReLU - maxpool2 - dense(10).

    Attributes:
      num_classes: outputs of the classifier.
      widths: channels of the two convolutions.
      dtype: compute dtype (parameters stay float32).
      bn_axis_name: a mapped axis to average BatchNorm statistics over (``pmap``).
      kernel_grad: how the convolutions' kernel gradients are computed, ``"xla"`` or
        ``"shifted"`` (:func:`choose_kernel_grad`); the values agree to float32 order.
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    kernel_grad: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        for features in self.widths:
            x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                        conv_general_dilated=conv_for(self.kernel_grad))(x)  # fmt: skip
            x = _batch_norm(train, self.dtype, self.bn_axis_name)(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class _Residual(nn.Module):
    features: int
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    kernel_grad: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        options = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                       kernel_grad=self.kernel_grad)  # fmt: skip
        y = _ConvBN(self.features, **options)(x, train=train)
        y = _ConvBN(self.features, **options)(y, train=train)
        return x + y


class ResNet9(nn.Module):
    """David Page's DAWNBench ResNet-9 for CIFAR-10.

    prep conv(64); layer1 conv(128)+pool + residual(2 x conv(128)); layer2 conv(256)+pool;
    layer3 conv(512)+pool + residual(2 x conv(512)); global max-pool; dense(10) x 0.125.

    Attributes:
      num_classes: outputs of the classifier.
      dtype: compute dtype (parameters stay float32).
      bn_axis_name: a mapped axis to average BatchNorm statistics over (``pmap``).
      kernel_grad: ``"xla"`` or ``"shifted"``, as for :class:`ConvNet`.
    """

    num_classes: int = 10
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    kernel_grad: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        options = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                       kernel_grad=self.kernel_grad)  # fmt: skip
        x = x.astype(self.dtype)
        x = _ConvBN(64, **options)(x, train=train)
        x = _ConvBN(128, pool=True, **options)(x, train=train)
        x = _Residual(128, **options)(x, train=train)
        x = _ConvBN(256, pool=True, **options)(x, train=train)
        x = _ConvBN(512, pool=True, **options)(x, train=train)
        x = _Residual(512, **options)(x, train=train)
        x = jnp.max(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype)(x)
        return (x * 0.125).astype(jnp.float32)


class _BasicBlock(nn.Module):
    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    kernel_grad: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        options = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                       kernel_grad=self.kernel_grad)  # fmt: skip
        y = _ConvBN(self.features, strides=self.strides, **options)(x, train=train)
        y = _ConvBN(self.features, relu=False, **options)(y, train=train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(
                self.features, (1, 1), strides=self.strides, use_bias=False, dtype=self.dtype
            )(x)
            x = _batch_norm(train, self.dtype, self.bn_axis_name)(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: 3x3 stem, no stem pooling, blocks [2, 2, 2, 2].

    Attributes:
      num_classes: outputs of the classifier.
      stage_sizes: blocks per stage.
      dtype: compute dtype (parameters stay float32).
      bn_axis_name: a mapped axis to average BatchNorm statistics over (``pmap``).
      kernel_grad: ``"xla"`` or ``"shifted"``, as for :class:`ConvNet`.
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    kernel_grad: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        options = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                       kernel_grad=self.kernel_grad)  # fmt: skip
        x = _ConvBN(64, **options)(x.astype(self.dtype), train=train)
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(64 * 2**stage, strides=strides, **options)(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


MODELS = {"convnet": ConvNet, "resnet9": ResNet9, "resnet18": ResNet18, "speednet": SpeedNet}


def create_model(name: str, *, widths: Sequence[int] | None = None,
                 kernel_grad: str | None = None, **kwargs) -> nn.Module:  # fmt: skip
    """The model called ``name`` (one of ``MODELS``), with its attributes set.

    ``widths`` (channels per stage) applies to ``convnet`` and ``speednet``;
    ``kernel_grad`` (``"xla"`` or ``"shifted"``, see :func:`choose_kernel_grad`) to the
    models with that attribute (``speednet``'s convolutions are XLA's: it is ignored
    there); ``None`` keeps the model's default.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if widths is not None:
        kwargs["widths"] = tuple(widths)
    if kernel_grad is not None:
        conv_for(kernel_grad)  # validates it
        if "kernel_grad" in MODELS[name].__dataclass_fields__:
            kwargs["kernel_grad"] = kernel_grad
    return MODELS[name](**kwargs)
