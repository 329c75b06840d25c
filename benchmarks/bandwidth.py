"""The update step's floor: this machine's copy bandwidth and the bytes one update moves.

    python benchmarks/bandwidth.py [--mib 256] [--repeats 15] [--quick] [--out FILE.json]

Copy bandwidth, counted as bytes read plus bytes written per second, median of
``--repeats`` interleaved runs of three copies of a ``--mib`` MiB float32 array:
``np.copyto`` into a preallocated array, a jitted XLA ``x * a`` written in place (the
input donated) and one written to a fresh buffer. The floor of one update on the
ResNet-18 tree of ``update_overhead.py`` is the bytes it must move divided by the
in-place XLA bandwidth: the global norm reads the gradients once, and one loop reads
gradients, params and buffer and writes params and buffer (6 passes over a
param-sized array). The sgdjax chain makes 9 passes (norm 1; new buffer: 3 reads, 1
write; new params: 3 reads, 1 write) and torch's ``clip_grad_norm_`` + fused SGD 8
(norm 1; scaling the gradients in place 2; the fused step 5). Printed beside the
measured sgdjax, optax and torch fused times of the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    environment,
    interleaved_timings,
    load_average,
    print_table,
    summarize,
    write_json,
)
from update_overhead import make_runner, resnet18_shapes  # noqa: E402

PASSES = {"floor (one fused loop)": 6, "sgdjax chain": 9, "torch fused": 8}
UPDATES = ("sgdjax", "optax", "torch-fused")


def copy_runners(values: int):
    """The three copies of ``values`` float32 values, each a callable that blocks."""
    import jax
    import jax.numpy as jnp

    source = np.random.default_rng(0).random(values, dtype=np.float32)
    target = np.empty_like(source)
    scale = jnp.float32(1.0)
    in_place = jax.jit(lambda x, a: x * a, donate_argnums=0)
    fresh = jax.jit(lambda x, a: x * a)
    box = {"x": jnp.asarray(source)}
    kept = jnp.asarray(source)

    def numpy_copy():
        np.copyto(target, source)

    def xla_in_place():
        box["x"] = in_place(box["x"], scale)
        box["x"].block_until_ready()

    def xla_fresh():
        fresh(kept, scale).block_until_ready()

    return {"numpy copyto": numpy_copy, "XLA x*a in place": xla_in_place,
            "XLA x*a, fresh buffer": xla_fresh}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the copied array")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small array and tree (smoke)")
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args(argv)
    shapes = resnet18_shapes()
    if args.quick:
        args.mib, args.repeats = 4, 3
        shapes = [tuple(max(1, d // 8) for d in s) for s in shapes[:20]]
    if args.mib <= 0 or args.repeats <= 0:
        parser.error("need --mib > 0 and --repeats > 0")

    values = args.mib * 2**20 // 4
    load = load_average()
    copies = {name: summarize(t) for name, t in
              interleaved_timings(copy_runners(values), repeats=args.repeats).items()}  # fmt: skip
    moved = 2 * values * 4  # read once, written once
    bandwidth = {name: moved / s["median"] for name, s in copies.items()}
    print(f"copy of {args.mib} MiB, {args.repeats} interleaved repeats, load average {load}")
    print_table(
        ["copy", "median ms", "IQR ms", "GB/s (read + write)"],
        [[name, f"{s['median'] * 1e3:.2f}", f"{s['q1'] * 1e3:.2f}-{s['q3'] * 1e3:.2f}",
          f"{bandwidth[name] / 1e9:.1f}"] for name, s in copies.items()],
    )  # fmt: skip

    size = sum(int(np.prod(s)) for s in shapes)
    updates = {name: make_runner(name, shapes)[0] for name in UPDATES}
    measured = {name: summarize(t) for name, t in
                interleaved_timings(updates, repeats=args.repeats).items()}  # fmt: skip
    rate = bandwidth["XLA x*a in place"]
    floors = {name: passes * size * 4 / rate for name, passes in PASSES.items()}
    print(f"\nResNet-18 tree: {len(shapes)} leaves, {size:,} float32 values "
          f"({size * 4 / 1e6:.1f} MB a pass); bandwidth {rate / 1e9:.1f} GB/s "
          f"(XLA in place); load average {load} -> {load_average()}")  # fmt: skip
    rows = [[f"{name}: {passes} passes", f"{passes * size * 4 / 1e6:.0f}",
             f"{floors[name] * 1e3:.2f}", "-", "-"] for name, passes in PASSES.items()]  # fmt: skip
    base = floors["floor (one fused loop)"]
    rows += [[f"measured {name}", "-", "-", f"{s['median'] * 1e3:.2f}",
              f"{s['median'] / base:.2f}"] for name, s in measured.items()]  # fmt: skip
    print_table(["", "MB moved", "ms at bandwidth", "median ms", "x floor"], rows)
    write_json(args.out, {"environment": environment(), "mib": args.mib,
                          "repeats": args.repeats, "copies": copies,
                          "bandwidth_bytes_per_second": bandwidth, "parameters": size,
                          "passes": PASSES, "floor_seconds": floors, "updates": measured,
                          "load_average": [load, load_average()]})  # fmt: skip
    return floors, measured


if __name__ == "__main__":
    main()
