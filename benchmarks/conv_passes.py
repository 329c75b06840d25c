"""A 3x3 convolution's three passes on the CPU, each computed several ways.

    python benchmarks/conv_passes.py [--passes forward input-grad kernel-grad]
                                     [--batch-size 128] [--layers NAME ...]
                                     [--repeats 9] [--out FILE.json]

For the 3x3, stride-1, padding-1 layers of the ConvNet and ResNet-9 at batch
``--batch-size`` (NHWC images, HWIO kernels; ``--layers`` picks some of them), each
pass of the convolution ``y = conv(x, W)``:

- ``forward``: ``y[n, h, w] = sum_{i,j} x_pad[n, h+i, w+j, :] @ W[i, j]``;
- ``input-grad``: ``dx``, the same sum over ``dy`` padded, with ``W`` flipped in
  space and its channels swapped;
- ``kernel-grad``: ``dW[i, j] = sum_{n,h,w} x_pad[n, h+i, w+j, :]^T dy[n, h, w, :]``.

Ways (not every way computes every pass):

- ``xla``: ``lax.conv_general_dilated`` in NHWC/HWIO and its ``jax.vjp``, what XLA
  emits for ``nn.Conv``; the reference of the other ways;
- ``shifted``: one matmul per kernel offset over a shifted window of the padded
  input (the kernel gradient is what ``sgdjax.training``'s models use on CPU,
  ``_models.conv_general_dilated``);
- ``im2col``: the nine shifted windows side by side, one matmul;
- ``nchw``: XLA's kernel gradient of the same convolution in NCHW/OIHW;
- ``winograd``: Winograd's F(2x2, 3x3) (Lavin and Gray, 2016): 4x4 input tiles with
  stride 2, ``B^T d B``, sixteen matmuls against the transformed kernel ``G W G^T``,
  then ``A^T m A`` gives each 2x2 output tile (2.25x fewer multiplies than direct);
- ``bf16``: XLA's convolution with bfloat16 inputs and float32 accumulation and
  output (``preferred_element_type``), for the CPUs with avx512_bf16.

Each way is jitted alone and timed in rounds of shuffled order; the table gives the
median, the interquartile range, the speed-up over ``xla`` and the largest
difference from ``xla``'s result relative to its largest value.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, round_orders, summarize, write_json  # noqa: E402

# (height, width, in channels, out channels) of the ConvNet's and ResNet-9's 3x3 layers
LAYERS = {
    "convnet conv 1": (32, 32, 3, 32),
    "convnet conv 2": (16, 16, 32, 64),
    "resnet9 prep": (32, 32, 3, 64),
    "resnet9 layer1 conv": (32, 32, 64, 128),
    "resnet9 layer1 residual": (16, 16, 128, 128),
    "resnet9 layer2 conv": (16, 16, 128, 256),
    "resnet9 layer3 conv": (8, 8, 256, 512),
    "resnet9 layer3 residual": (4, 4, 512, 512),
}
PASSES = ("forward", "input-grad", "kernel-grad")
PADS = ((1, 1), (1, 1))

# Winograd F(2x2, 3x3): output tile = A^T [(G g G^T) * (B^T d B)] A
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _conv(x, kernel, dtype=None):
    from jax import lax

    return lax.conv_general_dilated(x, kernel, (1, 1), PADS, preferred_element_type=dtype,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip


def _windows(x, height: int, width: int):
    """The nine ``(N, height, width, C)`` windows of ``x`` padded by one, row-major."""
    import jax.numpy as jnp

    padded = jnp.pad(x, ((0, 0), *PADS, (0, 0)))
    return [padded[:, i : i + height, j : j + width, :] for i in range(3) for j in range(3)]


def _flipped(kernel):
    """The kernel whose forward pass over ``dy`` is the input gradient."""
    return kernel[::-1, ::-1].transpose(0, 1, 3, 2)


def _shifted_forward(x, kernel):
    n, height, width, _ = x.shape
    rows = [w.reshape(-1, x.shape[-1]) for w in _windows(x, height, width)]
    taps = kernel.reshape(9, *kernel.shape[2:])
    out = sum(r @ t for r, t in zip(rows, taps, strict=True))
    return out.reshape(n, height, width, kernel.shape[-1])


def _im2col_forward(x, kernel):
    import jax.numpy as jnp

    n, height, width, channels = x.shape
    patches = jnp.concatenate(_windows(x, height, width), axis=-1)
    out = patches.reshape(-1, 9 * channels) @ kernel.reshape(9 * channels, -1)
    return out.reshape(n, height, width, kernel.shape[-1])


def _winograd_forward(x, kernel):
    """F(2x2, 3x3) for even height and width."""
    import jax.numpy as jnp

    n, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), *PADS, (0, 0)))
    # d[a, b, n, t, s, c] = padded[n, 2t + a, 2s + b, c]: the 4x4 tiles, stride 2
    tiles = jnp.stack([
        jnp.stack([padded[:, a : a + height : 2, b : b + width : 2, :] for b in range(4)])
        for a in range(4)
    ])  # fmt: skip
    bt = jnp.asarray(WINOGRAD_BT)
    v = jnp.einsum("ia,jb,abntsc->ijntsc", bt, bt, tiles).reshape(16, -1, x.shape[-1])
    g = jnp.asarray(WINOGRAD_G)
    u = jnp.einsum("ia,jb,abck->ijck", g, g, kernel).reshape(16, *kernel.shape[2:])
    m = jnp.einsum("xrc,xck->xrk", v, u).reshape(4, 4, n, height // 2, width // 2, -1)
    at = jnp.asarray(WINOGRAD_AT)
    y = jnp.einsum("pa,qb,abntsk->ntpsqk", at, at, m)
    return y.reshape(n, height, width, kernel.shape[-1])


def ways(pass_name: str) -> dict:
    """``{way: f(x, kernel, dy)}`` computing ``pass_name``; ``xla`` first."""
    import jax
    import jax.numpy as jnp

    if pass_name == "forward":
        return {
            "xla": lambda x, kernel, dy: _conv(x, kernel),
            "shifted": lambda x, kernel, dy: _shifted_forward(x, kernel),
            "im2col": lambda x, kernel, dy: _im2col_forward(x, kernel),
            "winograd": lambda x, kernel, dy: _winograd_forward(x, kernel),
            "bf16": lambda x, kernel, dy: _conv(x.astype(jnp.bfloat16),
                                                kernel.astype(jnp.bfloat16), jnp.float32),
        }  # fmt: skip
    if pass_name == "input-grad":
        return {
            "xla": lambda x, kernel, dy: jax.vjp(lambda x: _conv(x, kernel), x)[1](dy)[0],
            "shifted": lambda x, kernel, dy: _shifted_forward(dy, _flipped(kernel)),
            "winograd": lambda x, kernel, dy: _winograd_forward(dy, _flipped(kernel)),
        }  # fmt: skip
    if pass_name != "kernel-grad":
        raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")

    def xla(x, kernel, dy):
        return jax.vjp(lambda kernel: _conv(x, kernel), kernel)[1](dy)[0]

    def shifted(x, kernel, dy):
        rows = dy.reshape(-1, dy.shape[-1])
        windows = _windows(x, *dy.shape[1:3])
        products = [w.reshape(-1, x.shape[-1]).T @ rows for w in windows]
        return jnp.stack(products).reshape(kernel.shape)

    def im2col(x, kernel, dy):
        patches = jnp.concatenate(_windows(x, *dy.shape[1:3]), axis=-1)
        product = patches.reshape(-1, 9 * x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
        return product.reshape(kernel.shape)

    def nchw(x, kernel, dy):
        from jax import lax

        x_t, dy_t = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(dy, (0, 3, 1, 2))

        def conv_t(kernel_t):
            return lax.conv_general_dilated(x_t, kernel_t, (1, 1), PADS,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))  # fmt: skip

        kernel_t = jnp.transpose(kernel, (3, 2, 0, 1))
        return jnp.transpose(jax.vjp(conv_t, kernel_t)[1](dy_t)[0], (2, 3, 1, 0))

    return {"xla": xla, "shifted": shifted, "im2col": im2col, "nchw": nchw}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES),
                        help="which passes to time")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128, help="images per convolution")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS),
                        metavar="NAME", help=f"layers to time, of {list(LAYERS)}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="one small layer, 2 rounds")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats <= 0 or args.batch_size <= 0:
        parser.error(f"--repeats and --batch-size must be positive, got {args.repeats}, "
                     f"{args.batch_size}")  # fmt: skip
    import jax
    import jax.numpy as jnp

    layers = {name: LAYERS[name] for name in args.layers}
    n, repeats = args.batch_size, args.repeats
    if args.quick:
        layers, n, repeats = {"tiny": (8, 8, 3, 4)}, 4, 2
    rng = np.random.default_rng(0)
    runners, errors = {}, {}
    for layer, (h, w, c_in, c_out) in layers.items():
        x = jnp.asarray(rng.standard_normal((n, h, w, c_in)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((n, h, w, c_out)), jnp.float32)
        for pass_name in args.passes:
            reference = None
            for way, function in ways(pass_name).items():
                compiled = jax.jit(function)
                value = jax.block_until_ready(compiled(x, kernel, dy))  # compiles
                reference = value if reference is None else reference
                scale = float(jnp.max(jnp.abs(reference)))
                errors[(pass_name, layer, way)] = float(jnp.max(jnp.abs(value - reference))) / scale
                runners[(pass_name, layer, way)] = lambda f=compiled, a=(x, kernel, dy): (
                    jax.block_until_ready(f(*a))
                )
    seconds = {key: [] for key in runners}
    keys = list(runners)
    for order in round_orders([str(i) for i in range(len(keys))], repeats):
        for index in order:
            key = keys[int(index)]
            start = time.perf_counter()
            runners[key]()
            seconds[key].append(time.perf_counter() - start)
    rows, results = [], []
    for pass_name in args.passes:
        for layer in layers:
            base = summarize(seconds[(pass_name, layer, "xla")])["median"]
            for way in ways(pass_name):
                key = (pass_name, layer, way)
                stats = summarize(seconds[key])
                spread = f"{1000 * stats['q1']:.1f}-{1000 * stats['q3']:.1f}"
                rows.append([pass_name, layer, way, f"{1000 * stats['median']:.1f}", spread,
                             f"{base / stats['median']:.2f}x", f"{errors[key]:.1e}"])  # fmt: skip
                results.append({"pass": pass_name, "layer": layer, "way": way,
                                "seconds": stats, "relative_difference": errors[key]})  # fmt: skip
    print_table(["pass", "layer", "way", "median ms", "IQR ms", "speed-up over xla",
                 "rel. diff"], rows)  # fmt: skip
    payload = {"environment": environment(), "repeats": repeats, "batch_size": n, "layers": layers,
               "results": results}  # fmt: skip
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
