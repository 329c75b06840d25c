"""Training images/s on 1, 2, 4 and 8 devices for each data-parallel mode.

    python benchmarks/scaling.py [--model convnet] [--batch-size 256] [--steps 20]
                                 [--devices 1 2 4 8] [--out FILE.json] [--quick]

On a CPU-only machine the devices are simulated (XLA's host platform split into
N devices, set before JAX starts), so the table shows the overhead of each mode's
collectives, not a speed-up: the same cores do all the work. On GPUs and TPUs the
real devices are used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _setup_devices(count: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet", choices=["convnet", "resnet9", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+",
                        default=["none", "pmap", "sharded", "shard_map", "zero"])  # fmt: skip
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.devices = 16, 2, [1, 2]
    _setup_devices(max(args.devices))

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import environment, print_table, summarize, write_json

    import sgdjax
    from sgdjax import training
    from sgdjax.parallel import DATA_AXIS

    available = jax.device_count()
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
        }
        for _ in range(4)
    ]
    rows, runs = [], []
    for mode in args.modes:
        for count in args.devices:
            if count > available or (mode == "none" and count != 1):
                continue
            if args.batch_size % count:
                continue
            kernel_grad = training.choose_kernel_grad(jax.default_backend(),
                                                      args.batch_size // count)  # fmt: skip
            model = training.create_model(
                args.model, kernel_grad=kernel_grad,
                bn_axis_name=DATA_AXIS if training.needs_bn_axis(mode) else None,
            )  # fmt: skip
            state = training.TrainState.create(
                model=model,
                tx=sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                rng=jax.random.key(0),
                sample_input=jnp.zeros((1, 32, 32, 3)),
            )
            step = training.make_parallel_train_step(mode, num_devices=count)
            placed = step.place_state(state)
            start = time.perf_counter()
            placed, metrics = step.step(placed, step.place_batch(batches[0]))
            jax.block_until_ready(metrics)
            first = time.perf_counter() - start
            for index in range(2):  # warm-up
                placed, metrics = step.step(placed, step.place_batch(batches[index]))
            jax.block_until_ready(metrics)
            seconds = []
            for index in range(args.steps):
                batch = step.place_batch(batches[index % len(batches)])
                start = time.perf_counter()
                placed, metrics = step.step(placed, batch)
                jax.block_until_ready(metrics)
                seconds.append(time.perf_counter() - start)
            stats = summarize(seconds)
            rate = args.batch_size / stats["median"]
            rows.append([mode, count, f"{rate:.0f}",
                         f"{args.batch_size / stats['q3']:.0f}-{args.batch_size / stats['q1']:.0f}",
                         f"{first:.1f}"])  # fmt: skip
            runs.append({"mode": mode, "devices": count, "images_per_second": rate,
                         "seconds": stats, "first_step_seconds": first})  # fmt: skip
    print(f"\n{args.model}, global batch {args.batch_size}, {args.steps} timed steps, "
          f"{jax.default_backend()} devices")  # fmt: skip
    print_table(["mode", "devices", "images/s", "IQR images/s", "first step s"], rows)
    write_json(args.out, {"environment": environment(), "model": args.model,
                          "batch_size": args.batch_size, "runs": runs})  # fmt: skip
    return runs


if __name__ == "__main__":
    main()
