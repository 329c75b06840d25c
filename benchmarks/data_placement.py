"""The data set split over the devices against replicated: bytes per device, step time.

    python benchmarks/data_placement.py --data-dir DATA --steps 20 --repeats 5 \
        --out runs/data_placement.json

The training engine (tutorial preset, batch 128) on CIFAR-10 over 4 host devices,
``--parallel MODE`` for each mode given, once with the engine's own placement (the
training and test sets split over the data axis, ``Placement.take`` gathering each
batch with one reduce-scatter) and once with the sets replicated on every device
(``shard_data=False``, the placement before the split). Bytes per device are those
of the placed arrays (``sgdjax.parallel.bytes_per_device``). Each round runs ``--steps``
steps of every contender in a shuffled order; the table gives the median seconds per
step and the median of the per-round ratios (split / replicated), compile time
excluded.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from _common import (
    environment,
    load_average,
    print_table,
    ratio_summary,
    round_orders,
    summarize,
    write_json,
)

DEVICES = 4


def _synthetic(count: int):
    from sgdjax import data

    rng = np.random.default_rng(0)
    return data.Dataset(
        rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, count).astype(np.int32),
        rng.integers(0, 256, (count // 5, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, count // 5).astype(np.int32),
        tuple(str(i) for i in range(10)),
    )


def _engine(mode: str, shard_data: bool, dataset, steps: int):
    """An engine whose programs run ``steps`` steps an epoch; placed and compiled."""
    from sgdjax import training

    config = dataclasses.replace(
        training.PRESETS["tutorial"], parallel=mode, num_devices=DEVICES, batch_size=128,
        max_steps=steps, steps_per_call=1, tensorboard=False,
        translate=0, tta="none",  # the recipe of the figures in docs/parallel.md: flips only
    )  # fmt: skip
    engine = training.Engine(config, dataset, log=lambda line: None)
    if not shard_data:  # the placement before the split, for this comparison only
        engine.placement = dataclasses.replace(engine.placement, shard_data=False)
        engine.eval_placement = dataclasses.replace(engine.eval_placement, shard_data=False)
    engine.prepare()
    return engine


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 (default: synthetic CIFAR-sized data)")
    parser.add_argument("--modes", nargs="+", default=["sharded", "shard_map"])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a few steps (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 2, 1
    if args.steps <= 0 or args.repeats <= 0:
        parser.error("need --steps > 0 and --repeats > 0")

    from sgdjax.parallel import use_cpu_devices

    use_cpu_devices(DEVICES)
    from sgdjax import data, parallel, training

    dataset = (
        _synthetic(2048 if args.quick else 50_000)
        if args.data_dir is None
        else data.load_cifar10(args.data_dir, progress=False)
    )
    engines, held = {}, {}
    for mode in args.modes:
        for shard_data in (True, False):
            name = f"{mode} {'split' if shard_data else 'replicated'}"
            engine = _engine(mode, shard_data, dataset, args.steps)
            engines[name] = engine
            per_device = parallel.bytes_per_device((engine.train_data, engine.test_data))
            held[name] = max(per_device.values())
    states = {}
    for name, engine in engines.items():
        state = engine._initial_state(0)
        states[name] = [engine.placement.place_state(state), training._engine._kept(state.rng)]
        # A warm-up epoch: the first calls of a program are slower.
        states[name][0], _ = engine.train_epoch(states[name][0], states[name][1], 1,
                                                lambda steps, totals: None)  # fmt: skip
    seconds = {name: [] for name in engines}
    loads = [load_average()]
    for order in round_orders(list(engines), args.repeats):
        for name in order:
            placed, rng = states[name]
            tick = time.perf_counter()
            placed, totals = engines[name].train_epoch(placed, rng, 1, lambda steps, t: None)
            seconds[name].append((time.perf_counter() - tick) / totals.steps)
            states[name][0] = placed
        loads.append(load_average())
    rows, results = [], {}
    for name in engines:
        mode, kind = name.split(" ")
        stats = summarize(seconds[name])
        ratio = (
            ratio_summary(seconds[name], seconds[f"{mode} replicated"]) if kind == "split" else None
        )
        results[name] = {"bytes_per_device": held[name], "seconds_per_step": stats,
                         "ratio_to_replicated": ratio}  # fmt: skip
        rows.append([
            name, f"{held[name] / 2**20:.1f}", f"{1e3 * stats['median']:.1f}",
            f"{1e3 * stats['q1']:.1f}-{1e3 * stats['q3']:.1f}",
            "" if ratio is None else f"{ratio['median']:.2f} ({ratio['q1']:.2f}-{ratio['q3']:.2f})",
        ])  # fmt: skip
    print_table(
        ["placement", "MiB per device", "median ms/step", "IQR", "split / replicated"], rows
    )
    report = {
        "results": results,
        "steps": args.steps,
        "repeats": args.repeats,
        "devices": DEVICES,
        "train_examples": len(dataset.train_images),
        "load_average": loads,
        "environment": environment(),
    }
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
