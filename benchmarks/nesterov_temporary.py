"""What the Nesterov update's temporary costs: the sgdjax chain vs the same rule reassociated.

    python benchmarks/nesterov_temporary.py [--repeats 20] [--quick] [--out FILE.json]

The chain is sgdjax's clip by global norm + ``sgd(momentum=0.9, nesterov=True,
weight_decay=5e-4)`` on the ResNet-18 parameter tree of ``update_overhead.py``. With
Nesterov momentum, ``g' = c g + lambda theta`` feeds both the new buffer
``b = mu b + g'`` and the step ``theta - eta (g' + mu b)``, so XLA writes ``g'`` to a
temporary. "reassociated" computes the same rule as ``b = (mu b + c g) + lambda theta``
and ``theta - eta ((c g + lambda theta) + mu b)``, which share no subexpression, so
no temporary is written (its float32 rounding differs from torch's order). Run it
once as it is and once with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
set high to see how much of the cost is fresh pages for the temporary.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved_timings, print_table, summarize, write_json  # noqa: E402
from update_overhead import jax_runner, resnet18_shapes  # noqa: E402

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def reassociated_runner(shapes, seed: int = 0):
    """The chain's rule written without a shared subexpression, jitted and donated."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [jnp.asarray(rng.normal(size=s) * 1e-3, jnp.float32) for s in shapes]
    buffers = [jnp.zeros_like(p) for p in params]

    def update(params, buffers, grads):
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads))
        scale = jnp.minimum(1.0, 1.0 / norm)
        new_buffers = [
            (MOMENTUM * b + scale * g) + WEIGHT_DECAY * p for p, b, g in zip(params, buffers, grads)
        ]
        new_params = [
            p - LEARNING_RATE * ((scale * g + WEIGHT_DECAY * p) + MOMENTUM * b)
            for p, g, b in zip(params, grads, new_buffers)
        ]
        return new_params, new_buffers

    step = jax.jit(update, donate_argnums=(0, 1))
    box = {"params": params, "buffers": buffers}

    def run():
        box["params"], box["buffers"] = step(box["params"], box["buffers"], grads)
        jax.block_until_ready(box["params"])

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small tree, few repeats (smoke)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    shapes = resnet18_shapes()
    repeats = args.repeats
    if args.quick:
        shapes, repeats = [tuple(max(1, d // 8) for d in s) for s in shapes[:20]], 3
    runners = {
        "sgdjax chain": jax_runner("sgdjax", shapes)[0],
        "reassociated": reassociated_runner(shapes),
    }
    timings = interleaved_timings(runners, repeats=repeats)
    stats = {name: summarize(seconds) for name, seconds in timings.items()}
    base = stats["sgdjax chain"]["median"]
    rows = [
        [name, f"{s['median'] * 1e3:.2f}", f"{s['q1'] * 1e3:.2f}-{s['q3'] * 1e3:.2f}",
         f"{s['median'] / base:.2f}"]
        for name, s in stats.items()
    ]  # fmt: skip
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    malloc = {key: os.environ.get(key) for key in names}
    print(f"{len(shapes)} leaves, {sum(int(np.prod(s)) for s in shapes):,} parameters, "
          f"{repeats} interleaved repeats, malloc settings {malloc} (median ms)")  # fmt: skip
    print_table(["update", "median ms", "IQR ms", "x chain"], rows)
    write_json(args.out, {"environment": environment(), "malloc": malloc, "results": stats})
    return stats


if __name__ == "__main__":
    main()
