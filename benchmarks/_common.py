"""Shared benchmark plumbing: environment record, robust timing statistics, output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np


def environment() -> dict[str, Any]:
    """CPU model, core count and package versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "optax", "flax", "torch", "sgdjax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import jax

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes of a list of timings (seconds)."""
    values = np.asarray(seconds)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(values.min()),
        "max": float(values.max()),
        "repeats": len(values),
    }


def ratio_summary(seconds: list[float], base: list[float]) -> dict[str, float]:
    """Quartiles of the per-round ratios ``seconds[i] / base[i]`` of two interleaved lists.

    Both contenders ran in the same round, so the load of that moment divides out of
    each ratio: its spread says more than the two IQRs side by side.
    """
    ratios = np.asarray(seconds) / np.asarray(base)
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3)}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def round_orders(names: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """A shuffled order of ``names`` for each round.

    A fixed order lets one contender always follow the same other one, which skews
    it: PyTorch's OpenMP threads, for one, keep spinning for a while after each call
    and slow whatever runs next. Shuffling spreads such effects over all contenders.
    """
    rng = np.random.default_rng(seed)
    return [[names[i] for i in rng.permutation(len(names))] for _ in range(rounds)]


def interleaved_timings(
    runners: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Times each runner ``repeats`` times in rounds of shuffled order (see ``round_orders``).

    Each runner must block until its work is done.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for order in round_orders(list(runners), repeats):
        for name in order:
            start = time.perf_counter()
            runners[name]()
            timings[name].append(time.perf_counter() - start)
    return timings


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if index == 0:
            print("  ".join("-" * w for w in widths))
