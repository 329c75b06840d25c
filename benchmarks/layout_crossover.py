"""Where flat buffers beat one buffer per leaf: the layout rule against a sweep of trees.

    python benchmarks/layout_crossover.py [--repeats 15] [--quick] [--out FILE.json]

The update is ``update_overhead.py``'s chain (clip by global norm, coupled decay,
Nesterov momentum, learning rate), jitted and donated, on trees between the 500
small leaves and the ResNet-18 tree, in two series:

* fixed total size (``--total`` values), the leaf count varied;
* fixed leaf size (``--leaf-size`` values), the leaf count varied.

Contenders per tree, interleaved in shuffled rounds: sgdjax with one buffer per leaf
(``sgdjax-leaf``), sgdjax on flat buffers (``sgdjax-flat``) and optax. The table gives
the medians, the per-round ratio flat / per leaf with its IQR, the layout the rule in
``sgdjax._flatten.prefers_flat_layout`` picks for the tree (what ``sgdjax.chain`` does
without being asked) and whether that is the faster of the two measured.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    environment,
    interleaved_timings,
    load_average,
    print_table,
    ratio_summary,
    summarize,
    write_json,
)
from update_overhead import jax_runner  # noqa: E402

CONTENDERS = ("sgdjax-leaf", "sgdjax-flat", "optax")


def leaf_shape(size: int) -> tuple[int, ...]:
    """A matrix of 64 columns when ``size`` allows, else a vector."""
    return (size // 64, 64) if size % 64 == 0 and size >= 64 else (size,)


def sweep(total: int, leaf_size: int, counts: list[int]) -> list[tuple[str, list[tuple]]]:
    """``(series, shapes)`` for each tree of the two series."""
    trees = []
    for count in counts:
        trees.append((f"total {total:,}", [leaf_shape(total // count)] * count))
    for count in counts:
        trees.append((f"leaf {leaf_size:,}", [leaf_shape(leaf_size)] * count))
    return trees


def rule_picks_flat(shapes) -> bool:
    import jax

    from sgdjax import _flatten

    return _flatten.prefers_flat_layout([jax.ShapeDtypeStruct(s, "float32") for s in shapes])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--total", type=int, default=2**21, help="values in the fixed-size series")
    parser.add_argument("--leaf-size", type=int, default=1024, help="values per leaf (series 2)")
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 16, 64, 256, 512])
    parser.add_argument("--quick", action="store_true", help="tiny trees, few repeats (smoke)")
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.total, args.leaf_size, args.counts = 3, 4096, 64, [4, 32]
    if min(args.counts) <= 0 or args.total < max(args.counts) or args.leaf_size <= 0:
        parser.error("need --counts > 0, --total >= the largest count and --leaf-size > 0")

    rows, results = [], []
    for series, shapes in sweep(args.total, args.leaf_size, args.counts):
        runners = {name: jax_runner(name, shapes)[0] for name in CONTENDERS}
        load = load_average()
        timings = interleaved_timings(runners, repeats=args.repeats)
        stats = {name: summarize(seconds) for name, seconds in timings.items()}
        ratio = ratio_summary(timings["sgdjax-flat"], timings["sgdjax-leaf"])
        picks_flat = rule_picks_flat(shapes)
        flat_faster = ratio["median"] < 1.0
        size = sum(math.prod(s) for s in shapes)
        entry = {"series": series, "leaves": len(shapes), "mean_leaf_size": size // len(shapes),
                 "seconds": stats, "flat_over_leaf": ratio, "rule_picks_flat": picks_flat,
                 "load_average": load}  # fmt: skip
        results.append(entry)
        rows.append([
            series, len(shapes), f"{size // len(shapes):,}",
            *(f"{stats[name]['median'] * 1e3:.3f}" for name in CONTENDERS),
            f"{ratio['median']:.2f} ({ratio['q1']:.2f}-{ratio['q3']:.2f})",
            "flat" if picks_flat else "per leaf",
            "yes" if picks_flat == flat_faster else "NO",
        ])  # fmt: skip
        print(f"{series}, {len(shapes)} leaves: done (load average {load})", flush=True)
    print(f"\n{args.repeats} interleaved repeats per tree; median ms")
    print_table(
        ["series", "leaves", "mean size", "per leaf", "flat", "optax", "flat/per leaf (IQR)",
         "rule picks", "rule picks the faster"], rows,
    )  # fmt: skip
    write_json(args.out, {"environment": environment(), "repeats": args.repeats,
                          "trees": results})  # fmt: skip
    return results


if __name__ == "__main__":
    main()
