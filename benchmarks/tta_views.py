"""Test-time augmentation on the CPU: the views one after another against side by side.

    python benchmarks/tta_views.py [--host-devices 4] [--batch-size 1000] [--repeats 7]
                                   [--quick] [--out FILE.json]

``sgdjax.training.tta_logits`` runs the views of ``flip`` (2) and ``flip_shift`` (6)
through the network one after another with ``lax.map``. The other way, "side by
side", writes each view as its own call of the network in one program, as the
function did before. Both are timed on the tutorial ConvNet's evaluation batch,
sharded over ``--host-devices`` CPU devices as the default CPU arrangement does,
interleaved; the largest difference of their logits is printed (0: bitwise equal).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    environment,
    interleaved_timings,
    print_table,
    summarize,
    write_json,
)

MODES = ("none", "flip", "flip_shift")


def side_by_side(apply, images, tta):
    """Every view as its own call of ``apply`` in one program (the earlier form)."""
    import jax.numpy as jnp

    def both(x):
        return 0.5 * (apply(x) + apply(x[:, :, ::-1, :]))

    if tta == "none":
        return apply(images)
    if tta == "flip":
        return both(images)
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :-2, :-2, :], padded[:, 2:, 2:, :]
    return 0.5 * both(images) + 0.25 * both(up_left) + 0.25 * both(down_right)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-devices", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small batch, 2 devices (smoke)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.host_devices, args.batch_size, args.repeats = 2, 16, 2
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.host_devices}"
    )
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sgdjax import training

    mesh = Mesh(np.array(jax.devices()), ("data",))
    model = training.create_model("convnet")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32)
    images = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))

    def apply(x):
        return model.apply(variables, x, train=False)

    programs, outputs = {}, {}
    for tta in MODES:
        ways = {
            "one after another": lambda x, t=tta: training.tta_logits(model.apply, variables, x, t)
        }
        if tta != "none":
            ways["side by side"] = lambda x, t=tta: side_by_side(apply, x, t)
        for way, function in ways.items():
            program = jax.jit(function)
            outputs[(tta, way)] = np.asarray(program(images))
            programs[f"{tta}, {way}"] = program

    def runner(program):
        return lambda: program(images).block_until_ready()

    timings = interleaved_timings(
        {name: runner(program) for name, program in programs.items()}, repeats=args.repeats
    )
    stats = {name: summarize(seconds) for name, seconds in timings.items()}
    plain = stats["none, one after another"]["median"]
    differences = {
        tta: float(
            np.max(np.abs(outputs[(tta, "one after another")] - outputs[(tta, "side by side")]))
        )
        for tta in MODES[1:]
    }
    rows = [
        [name, f"{s['median'] * 1e3:.1f}", f"{s['q1'] * 1e3:.1f}-{s['q3'] * 1e3:.1f}",
         f"{s['median'] / plain:.2f}"]
        for name, s in stats.items()
    ]  # fmt: skip
    print(f"ConvNet, {args.batch_size} images sharded over {args.host_devices} host devices, "
          f"{args.repeats} interleaved repeats")  # fmt: skip
    print_table(["views", "median ms", "IQR ms", "x one view"], rows)
    print("max |one after another - side by side|:", differences)
    write_json(args.out, {"environment": environment(), "host_devices": args.host_devices,
                          "batch_size": args.batch_size, "results": stats,
                          "max_abs_difference": differences})  # fmt: skip
    return stats


if __name__ == "__main__":
    main()
