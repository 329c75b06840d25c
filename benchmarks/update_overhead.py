"""Time per optimizer update: sgdjax vs optax vs torch on two parameter trees.

    python benchmarks/update_overhead.py [--quick] [--out results/update_overhead.json]

The chain in every library: clip by global norm (1.0), coupled weight decay (5e-4),
Nesterov momentum (0.9), learning rate (0.1); the ``*-skip`` rows wrap it in the
library's skip-non-finite-steps wrapper (``sgdjax.skip_non_finite``,
``optax.apply_if_finite``), the ``*-flat`` and ``sgdjax-leaf`` rows force the layout.
Trees: (a) ResNet-18 (CIFAR variant, about 11.2M parameters in 62 leaves), (b) 500
small leaves. JAX updates are jitted
with params and optimizer state donated; timings are interleaved in rounds of
shuffled order and reported as median and interquartile range. Peak memory: each
configuration also runs in its own subprocess and reports the peak resident memory
it adds (Linux).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

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

# ---------------------------------------------------------------- parameter trees


def resnet18_shapes() -> list[tuple[int, ...]]:
    """HWIO conv kernels, BatchNorm scale and bias, dense: 62 leaves, 11,173,962 values.

    stem conv 3x3x3x64 + BN (3 leaves); 8 basic blocks of 2 conv + 2 BN (6 leaves
    each, 48); 3 projection shortcuts of conv 1x1 + BN (9); dense 512x10 + bias (2).
    """
    shapes = [(3, 3, 3, 64), (64,), (64,)]
    inputs = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            shapes += [(3, 3, inputs, width), (width,), (width,)]
            shapes += [(3, 3, width, width), (width,), (width,)]
            if block == 0 and stage > 0:
                shapes += [(1, 1, inputs, width), (width,), (width,)]
            inputs = width
    shapes += [(512, 10), (10,)]
    return shapes


def small_shapes(count: int = 500, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` small leaves: vectors and matrices of 4 to 64 rows and columns."""
    rng = np.random.default_rng(seed)
    shapes = []
    for index in range(count):
        if index % 3 == 0:
            shapes.append((int(rng.integers(4, 257)),))
        else:
            shapes.append((int(rng.integers(4, 65)), int(rng.integers(4, 65))))
    return shapes


TREES = {"resnet18": resnet18_shapes, "small500": small_shapes}

# ---------------------------------------------------------------- the updates


def make_transform(library: str):
    """The benchmark's chain in ``library``'s form.

    ``sgdjax``: ``sgdjax.chain`` as a user writes it (the layout chosen at init);
    ``sgdjax-flat`` and ``sgdjax-leaf``: that chain with its layout forced to flat
    buffers (``sgdjax.flatten``) or to one buffer per leaf (the same pieces under
    the per-leaf branch of the automatic layout); ``*-skip``: wrapped in
    ``sgdjax.skip_non_finite`` / ``optax.apply_if_finite``.
    """
    import optax

    import sgdjax
    from sgdjax import _flatten

    if library in ("sgdjax", "sgdjax-flat", "sgdjax-skip"):
        tx = sgdjax.chain(
            sgdjax.clip_by_global_norm(1.0),
            sgdjax.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        )
        if library == "sgdjax-flat":
            return sgdjax.flatten(tx)
        if library == "sgdjax-skip":
            return sgdjax.skip_non_finite(tx)
        return tx
    if library == "sgdjax-leaf":
        return _flatten.recompute_temporaries(
            optax.chain(
                sgdjax.clip_by_global_norm(1.0),
                sgdjax.add_decayed_weights(5e-4),
                sgdjax.momentum(0.9, nesterov=True),
                sgdjax.scale_by_learning_rate(0.1),
            )
        )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(5e-4),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )
    if library == "optax-flat":
        return optax.flatten(tx)
    if library == "optax-skip":
        return optax.apply_if_finite(tx, max_consecutive_errors=2**30)
    return tx


def jax_runner(library: str, shapes, seed: int = 0, tx=None):
    """A callable running one donated, jitted update of ``library``'s chain (or ``tx``)."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = make_transform(library) if tx is None else tx

    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [jnp.asarray(rng.normal(size=s) * 1e-3, jnp.float32) for s in shapes]
    state = tx.init(params)

    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(update, donate_argnums=(0, 1))
    compiled = step.lower(params, state, grads).compile()
    memory = compiled.memory_analysis()
    box = {"params": params, "state": state}

    def run():
        box["params"], box["state"] = step(box["params"], box["state"], grads)
        jax.block_until_ready(box["params"])

    info = {"state_leaves": len(jax.tree.leaves(state))}
    if memory is not None:
        info.update(
            argument_bytes=int(memory.argument_size_in_bytes),
            output_bytes=int(memory.output_size_in_bytes),
            temp_bytes=int(memory.temp_size_in_bytes),
        )
    return run, info


def torch_runner(variant: str, shapes, seed: int = 0, device: str = "cpu"):
    """One torch update (clip_grad_norm_ + SGD) on ``device``; on a GPU ``run`` waits
    for the device, so it can be timed like the JAX runners."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [torch.tensor(rng.normal(size=s), dtype=torch.float32, device=device,
                           requires_grad=True) for s in shapes]  # fmt: skip
    for p in params:
        p.grad = torch.tensor(rng.normal(size=tuple(p.shape)) * 1e-3, dtype=torch.float32,
                              device=device)  # fmt: skip
    options = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if variant == "torch-fused":
        options["fused"] = True
    else:
        options["foreach"] = variant == "torch-foreach"
    optimizer = torch.optim.SGD(params, **options)

    def run():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize(device)

    return run, {}


LIBRARIES = ("sgdjax", "sgdjax-flat", "sgdjax-leaf", "sgdjax-skip", "optax", "optax-flat",
             "optax-skip", "torch-loop", "torch-foreach", "torch-fused")  # fmt: skip


def make_runner(library: str, shapes, torch_device: str = "cpu"):
    if library.startswith("torch"):
        return torch_runner(library, shapes, device=torch_device)
    return jax_runner(library, shapes)


def peak_memory(library: str, tree: str, repeats: int) -> float | None:
    """Peak resident memory (MiB) a fresh process adds while it builds and runs one update.

    The peak is reset after the imports (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM), so import-time peaks do not hide the optimizer's own memory.
    """
    folder = str(Path(__file__).resolve().parent)
    code = (
        f"import sys; sys.path.insert(0, {folder!r})\n"
        "import update_overhead as u\n"
        "import jax, torch, optax, sgdjax\n"
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key):\n"
        "            return int(line.split()[1])\n"
        "base = status('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        f"run, _ = u.make_runner({library!r}, u.TREES[{tree!r}]())\n"
        f"[run() for _ in range({repeats})]\n"
        "print((status('VmHWM') - base) / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return float(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small trees (smoke)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--torch-device", default="cpu",
                        help="where torch's tensors live (cuda on a GPU machine; JAX uses its "
                        "default device)")  # fmt: skip
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats

    results = {
        "environment": environment(),
        "repeats": repeats,
        "torch_device": args.torch_device,
        "trees": {},
    }
    for tree in args.trees:
        shapes = TREES[tree]()
        if args.quick:
            shapes = [tuple(max(1, d // 8) for d in s) for s in shapes[:40]]
        runners, infos = {}, {}
        for library in args.libraries:
            try:
                runners[library], infos[library] = make_runner(library, shapes, args.torch_device)
            except (RuntimeError, TypeError, ValueError) as error:
                print(f"{library}: not available ({error})")
        load_before = load_average()
        timings = interleaved_timings(runners, repeats=repeats)
        rows, entry = [], {}
        for library, seconds in timings.items():
            stats = summarize(seconds)
            memory = None
            if not args.quick and not args.no_memory:
                memory = peak_memory(library, tree, repeats=5)
            entry[library] = {"seconds": stats, "compiled_memory": infos[library],
                              "peak_rss_growth_mib": memory}  # fmt: skip
            if "optax" in timings:
                entry[library]["x_optax"] = ratio_summary(seconds, timings["optax"])
        for library, item in entry.items():
            stats = item["seconds"]
            ratio = item.get("x_optax")
            rows.append([
                library,
                f"{stats['median'] * 1e3:.3f}",
                f"{stats['q1'] * 1e3:.3f}-{stats['q3'] * 1e3:.3f}",
                "-" if ratio is None
                else f"{ratio['median']:.2f} ({ratio['q1']:.2f}-{ratio['q3']:.2f})",
                item["compiled_memory"].get("state_leaves", "-"),
                "-" if item["peak_rss_growth_mib"] is None
                else f"{item['peak_rss_growth_mib']:.0f}",
            ])  # fmt: skip
        leaves = len(shapes)
        size = sum(int(np.prod(s)) for s in shapes)
        print(f"\n{tree}: {leaves} leaves, {size:,} parameters, {repeats} interleaved repeats, "
              f"load average {load_before} -> {load_average()}")  # fmt: skip
        print_table(
            ["library", "median ms", "IQR ms", "x optax per round (IQR)", "state leaves",
             "peak MiB"], rows,
        )  # fmt: skip
        results["trees"][tree] = {"leaves": leaves, "parameters": size, "results": entry,
                                  "load_average": [load_before, load_average()]}  # fmt: skip
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
