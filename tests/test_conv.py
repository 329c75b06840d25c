"""The CPU convolution with the kernel gradient as shifted matmuls, against XLA's, and
the rule that picks one of the two for a step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from sgdjax import training
from sgdjax.training import _models

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference_kernel_grad(x, grad, kernel_shape, pads):
    """dW[i, j, c, d] = sum_{n,h,w} x_pad[n, h+i, w+j, c] dy[n, h, w, d], in float64 numpy."""
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    grad = np.asarray(grad, np.float64)
    height, width = grad.shape[1:3]
    out = np.zeros(kernel_shape)
    for i in range(kernel_shape[0]):
        for j in range(kernel_shape[1]):
            window = padded[:, i : i + height, j : j + width, :]
            out[i, j] = np.einsum("nhwc,nhwd->cd", window, grad)
    return out


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), "SAME", ((0, 2), (1, 0))])
def test_gradients_equal_xla_and_a_float64_reference(padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 9, 7, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
    dimension_numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC)

    def loss(conv, x, kernel):
        y = conv(x, kernel, (1, 1), padding, dimension_numbers=dimension_numbers)
        return jnp.sum(jnp.sin(y))

    ours = jax.jit(jax.value_and_grad(lambda *a: loss(_models.conv_general_dilated, *a),
                                      argnums=(0, 1)))(x, kernel)  # fmt: skip
    xla = jax.value_and_grad(lambda *a: loss(lax.conv_general_dilated, *a), argnums=(0, 1))(
        x, kernel
    )
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-6)
    np.testing.assert_array_equal(ours[1][0], xla[1][0])  # the input gradient is XLA's
    np.testing.assert_allclose(ours[1][1], xla[1][1], rtol=2e-5, atol=2e-5)
    pads = padding
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (1, 1), padding)
    y = lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=dimension_numbers)
    reference = _reference_kernel_grad(x, jnp.cos(y), kernel.shape, pads)
    np.testing.assert_allclose(ours[1][1], reference, rtol=2e-5, atol=2e-5)


def test_other_convolutions_are_xla_unchanged():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 4, 6)), jnp.float32)
    dimension_numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC)
    for strides in ((2, 2), (1, 1)):
        ours = _models.conv_general_dilated(x, kernel, strides, "SAME",
                                            dimension_numbers=dimension_numbers)  # fmt: skip
        xla = lax.conv_general_dilated(x, kernel, strides, "SAME",
                                       dimension_numbers=dimension_numbers)  # fmt: skip
        np.testing.assert_allclose(ours, xla, rtol=1e-6)


@pytest.mark.parametrize("name", ["convnet", "resnet9"])
def test_a_training_step_matches_xla_convolutions(name):
    widths = (4, 8) if name == "convnet" else None
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    grads = {}
    for kernel_grad in training.KERNEL_GRADS:
        model = training.create_model(name, widths=widths, kernel_grad=kernel_grad)
        assert model.kernel_grad == kernel_grad
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])  # fmt: skip
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])

        lowered = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
        # XLA's kernel gradient is a convolution per layer more than the shifted form's
        grads[kernel_grad] = (jax.jit(jax.grad(loss))(variables["params"]),
                              lowered.count("stablehlo.convolution"))  # fmt: skip
    (ours, shifted_convs), (xla, xla_convs) = grads["shifted"], grads["xla"]
    assert shifted_convs < xla_convs
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale


def test_the_rule_picks_shifted_matmuls_for_large_cpu_shares_only():
    threshold = _models.SHIFTED_MIN_EXAMPLES
    assert training.choose_kernel_grad("cpu", threshold) == "shifted"
    assert training.choose_kernel_grad("cpu", 4 * threshold) == "shifted"
    assert training.choose_kernel_grad("cpu", threshold - 1) == "xla"
    assert training.choose_kernel_grad("cpu", 16) == "xla"  # the default split's share
    for backend in ("gpu", "tpu"):
        assert training.choose_kernel_grad(backend, 4 * threshold) == "xla"
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="examples_per_device"):
            training.choose_kernel_grad("cpu", bad)


def test_kernel_grad_is_validated_and_ignored_where_a_model_has_none():
    with pytest.raises(ValueError, match="kernel_grad must be one of"):
        training.create_model("convnet", kernel_grad="winograd")
    assert training.create_model("resnet18", kernel_grad="shifted").kernel_grad == "shifted"
    assert training.create_model("convnet").kernel_grad == "xla"
    speednet = training.create_model("speednet", kernel_grad="shifted")
    assert not hasattr(speednet, "kernel_grad")
    for kernel_grad, conv in (("shifted", _models.conv_general_dilated),
                              ("xla", lax.conv_general_dilated)):  # fmt: skip
        linen = training.create_model("convnet", widths=(4, 8), kernel_grad=kernel_grad)
        face = training.nnx_convnet_like(linen)
        twin = nnx.merge(face.graphdef, face._variables)
        assert twin.Conv_0.conv_general_dilated is conv
    with pytest.raises(ValueError, match="kernel_grad must be one of"):
        training.NNXConvNet(widths=(4,), kernel_grad="nope", rngs=nnx.Rngs(0))
