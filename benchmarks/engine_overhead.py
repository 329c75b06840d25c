"""Host overhead: the training engine against the host-fed loop it replaced, same run.

    python benchmarks/engine_overhead.py --steps 60 --repeats 5 --out runs/engine_overhead.json
                                         [--steps-per-program K ...]

Both train the tutorial preset's ConvNet (flips only, as the replaced loop did, not the
preset's translations; Nesterov SGD, one-cycle) on the same synthetic CIFAR-sized uint8
data: at the preset's widths (32, 64) and batch (64), then
narrow (4, 8) at batch 64 and at batch 16, where a step's compute is smallest and the
host's work per step (batch gathering and transfer, dispatch, waiting for the metrics)
weighs most.

"host loop" is the per-step pattern of the loop the engine replaced (kept here, and
only here, for this comparison): numpy batches gathered on the host, moved to the
device, one jitted step, then the metrics and the skip counter read back as numpy
before the next step. "engine" is ``sgdjax.training.Engine``: the data on the device,
gathering, flips and normalization inside the compiled program, the metrics read once
per chunk, one chunk late, as many steps per program as ``steps_per_program``
decides (one on CPUs); ``--steps-per-program K`` adds "engine K/program", the same
with ``steps_per_call=K``. Rounds alternate the contenders in a shuffled order; the
table gives the median images/s over rounds (compile time excluded for all).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import numpy as np
from _common import environment, print_table, round_orders, summarize, write_json

# (name, ConvNet widths, batch size): the preset, then where the host's share grows
VARIANTS = (
    ("preset (32, 64), batch 64", (32, 64), 64),
    ("narrow (4, 8), batch 64", (4, 8), 64),
    ("narrow (4, 8), batch 16", (4, 8), 16),
)


def _dataset(count: int, seed: int = 0):
    from sgdjax import data

    rng = np.random.default_rng(seed)
    return data.Dataset(
        rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, count).astype(np.int32),
        rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, 256).astype(np.int32),
        tuple(str(i) for i in range(10)),
    )


def host_loop_runner(config, dataset, steps: int):
    """The replaced loop's per-step pattern, ``steps`` steps per call."""
    import jax
    import jax.numpy as jnp

    from sgdjax import data, training

    tx, schedule = training.make_optimizer(config, steps)
    kernel_grad = training.choose_kernel_grad(jax.default_backend(), config.batch_size)
    model = training.create_model(config.model, widths=config.widths,
                                  kernel_grad=kernel_grad)  # as the engine picks  # fmt: skip
    state = training.TrainState.create(
        model=model, tx=tx, rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3))
    )
    flips = functools.partial(data.augment, padding=config.crop_padding)
    parallel = training.make_parallel_train_step(
        "none", augment_fn=flips, learning_rate_fn=schedule
    )
    holder = {"state": parallel.place_state(state), "epoch": 0}

    def run():
        holder["epoch"] += 1
        batches = data.batches(dataset.train_images, dataset.train_labels, config.batch_size,
                               seed=0, epoch=holder["epoch"])  # fmt: skip
        for index, batch in enumerate(batches):
            if index >= steps:
                break
            holder["state"], metrics = parallel.step(holder["state"], parallel.place_batch(batch))
            jax.tree.map(lambda x: np.ravel(np.asarray(x))[0], metrics)  # waits
            int(np.ravel(np.asarray(holder["state"].opt_state.consecutive_skipped))[0])

    return run


def engine_runner(config, dataset, steps: int):
    """The engine's epoch loop over ``steps`` steps per call (compiled when built)."""
    from sgdjax import training

    engine = training.Engine(dataclasses.replace(config, max_steps=steps), dataset,
                             log=lambda line: None)  # fmt: skip
    state = engine._initial_state(0)
    holder = {"placed": engine.placement.place_state(state), "epoch": 0}
    rng = training._engine._kept(state.rng)

    def run():
        holder["epoch"] = holder["epoch"] % len(engine.plan.epoch_steps) + 1
        holder["placed"], _ = engine.train_epoch(holder["placed"], rng, holder["epoch"],
                                                 lambda steps, totals: None)  # fmt: skip

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--images", type=int, default=8192, help="synthetic training images")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a few steps (a smoke test)")
    parser.add_argument("--steps-per-program", nargs="+", type=int, default=[], metavar="K",
                        help="add the engine with K steps per compiled program")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.images = 4, 1, 512
    if args.steps <= 0 or args.repeats <= 0 or args.images < 64 * args.steps:
        parser.error("need --steps > 0, --repeats > 0 and --images >= 64 * --steps")
    if any(k <= 0 for k in args.steps_per_program):
        parser.error(f"--steps-per-program must be positive, got {args.steps_per_program}")

    from sgdjax import training

    dataset = _dataset(args.images)
    results, rows = {}, []
    for variant, widths, batch_size in VARIANTS:
        # Flips only, no translations: the augmentation the host loop implements.
        config = dataclasses.replace(training.PRESETS["tutorial"], widths=widths,
                                     batch_size=batch_size, translate=0, tta="none",
                                     tensorboard=False)  # fmt: skip
        runners = {"host loop": host_loop_runner(config, dataset, args.steps),
                   "engine": engine_runner(config, dataset, args.steps)}  # fmt: skip
        for k in args.steps_per_program:
            chunked = dataclasses.replace(config, steps_per_call=k)
            runners[f"engine {k}/program"] = engine_runner(chunked, dataset, args.steps)
        for run in runners.values():  # compile and warm up
            run()
            run()
        seconds = {name: [] for name in runners}
        for order in round_orders(list(runners), args.repeats):
            for name in order:
                start = time.perf_counter()
                runners[name]()
                seconds[name].append(time.perf_counter() - start)
        images = args.steps * config.batch_size
        stats = {name: summarize(values) for name, values in seconds.items()}
        rate = {name: images / stats[name]["median"] for name in runners}
        results[variant] = {"batch_size": batch_size, "seconds": stats,
                            "images_per_second": rate}  # fmt: skip
        engines = [name for name in runners if name != "host loop"]
        rows.append([variant, f"{rate['host loop']:.0f}"] + [
            f"{rate[name]:.0f} ({rate[name] / rate['host loop']:.2f}x)" for name in engines
        ])  # fmt: skip
    print_table(["ConvNet", "host loop img/s"]
                + [f"{name} img/s (/ host loop)" for name in engines], rows)  # fmt: skip
    payload = {"environment": environment(), "steps": args.steps, "repeats": args.repeats,
               "results": results}  # fmt: skip
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
