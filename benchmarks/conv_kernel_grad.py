"""The convolution kernel gradient on the CPU: XLA's, shifted matmuls, im2col, NCHW.

    python benchmarks/conv_kernel_grad.py [--repeats 9] [--out FILE.json]

For the 3x3 layers of the ConvNet and ResNet-9 at batch 128, the gradient of the
kernel ``dW[i, j] = sum_{n,h,w} x_pad[n, h+i, w+j, :]^T dy[n, h, w, :]`` computed four
ways, each jitted alone, timed in rounds of shuffled order:

- ``xla``: ``jax.vjp`` of ``lax.conv_general_dilated`` in NHWC/HWIO (what XLA emits
  for ``nn.Conv``: a convolution with the batch as features, the image as window);
- ``shifted``: one matmul per kernel offset (what ``sgdjax.training``'s models use
  on CPU, ``_models.conv_general_dilated``);
- ``im2col``: the nine shifted copies side by side, one matmul;
- ``nchw``: XLA's gradient of the same convolution in NCHW/OIHW.

The largest difference from ``xla``, relative to its largest value, is printed too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, round_orders, summarize, write_json  # noqa: E402

# (batch, height, width, in channels, out channels) of the ConvNet's and ResNet-9's layers
LAYERS = {
    "convnet conv 1": (128, 32, 32, 3, 32),
    "convnet conv 2": (128, 16, 16, 32, 64),
    "resnet9 layer1 conv": (128, 32, 32, 64, 128),
    "resnet9 layer3 conv": (128, 8, 8, 256, 512),
}


def kernel_grads():
    """The four ways, each ``(x, kernel, dy) -> dW``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    pads = ((1, 1), (1, 1))

    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

    def xla(x, kernel, grad):
        return jax.vjp(lambda kernel: conv(x, kernel), kernel)[1](grad)[0]

    def shifted_windows(x, grad):
        height, width = grad.shape[1:3]
        padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        return [padded[:, i : i + height, j : j + width, :] for i in range(3) for j in range(3)]

    def shifted(x, kernel, grad):
        rows = grad.reshape(-1, grad.shape[-1])
        products = [w.reshape(-1, x.shape[-1]).T @ rows for w in shifted_windows(x, grad)]
        return jnp.stack(products).reshape(kernel.shape)

    def im2col(x, kernel, grad):
        patches = jnp.concatenate(shifted_windows(x, grad), axis=-1)
        product = patches.reshape(-1, 9 * x.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
        return product.reshape(kernel.shape)

    def nchw(x, kernel, grad):
        x_t, grad_t = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(grad, (0, 3, 1, 2))

        def conv_t(kernel_t):
            return lax.conv_general_dilated(x_t, kernel_t, (1, 1), pads,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))  # fmt: skip

        kernel_t = jnp.transpose(kernel, (3, 2, 0, 1))
        return jnp.transpose(jax.vjp(conv_t, kernel_t)[1](grad_t)[0], (2, 3, 1, 0))

    return {"xla": xla, "shifted": shifted, "im2col": im2col, "nchw": nchw}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="one small layer, 2 rounds")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats <= 0:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    import jax
    import jax.numpy as jnp

    layers = {"tiny": (4, 8, 8, 3, 4)} if args.quick else LAYERS
    repeats = 2 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    runners, errors = {}, {}
    for layer, (n, h, w, c_in, c_out) in layers.items():
        x = jnp.asarray(rng.standard_normal((n, h, w, c_in)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)
        grad = jnp.asarray(rng.standard_normal((n, h, w, c_out)), jnp.float32)
        reference = None
        for way, function in kernel_grads().items():
            compiled = jax.jit(function)
            value = jax.block_until_ready(compiled(x, kernel, grad))  # compiles
            reference = value if reference is None else reference
            scale = float(jnp.max(jnp.abs(reference)))
            errors[(layer, way)] = float(jnp.max(jnp.abs(value - reference))) / scale
            runners[(layer, way)] = (lambda f=compiled, a=(x, kernel, grad):
                                     jax.block_until_ready(f(*a)))  # fmt: skip
    seconds = {key: [] for key in runners}
    keys = list(runners)
    for order in round_orders([str(i) for i in range(len(keys))], repeats):
        for index in order:
            key = keys[int(index)]
            start = time.perf_counter()
            runners[key]()
            seconds[key].append(time.perf_counter() - start)
    rows, results = [], []
    for layer in layers:
        base = summarize(seconds[(layer, "xla")])["median"]
        for way in kernel_grads():
            stats = summarize(seconds[(layer, way)])
            spread = f"{1000 * stats['q1']:.1f}-{1000 * stats['q3']:.1f}"
            speed_up, error = base / stats["median"], errors[(layer, way)]
            rows.append([layer, way, f"{1000 * stats['median']:.1f}", spread,
                         f"{speed_up:.2f}x", f"{error:.1e}"])  # fmt: skip
            results.append({"layer": layer, "way": way, "seconds": stats,
                            "relative_difference": errors[(layer, way)]})  # fmt: skip
    print_table(["layer", "way", "ms", "IQR ms", "speed-up over xla", "rel. diff"], rows)
    payload = {"environment": environment(), "repeats": repeats, "results": results}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
