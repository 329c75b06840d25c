"""Where a training step's time goes on the CPU: XLA's per-operation trace, grouped.

    python benchmarks/step_profile.py [--model convnet] [--batch-size 128] [--steps 10]
                                      [--top 25] [--out FILE.json]

Runs sgdjax's training step (the one ``train_throughput.py`` times as "sgdjax"),
records ``--steps`` steps with ``jax.profiler`` and sums the duration of each compiled
operation (each thunk of the CPU executable: a fusion, a convolution, a copy). Each
operation is named by what the optimized HLO says it computes (its root instruction,
the convolutions or dots inside, the shape) and by the model layer it came from (the
op_name metadata), then grouped into forward / backward-input / backward-weights of
each layer. Durations are per step; "share" is of the summed operation time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _computations(hlo: str) -> dict[str, list[str]]:
    """Lines of each computation in an HLO module's text, by computation name."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            bodies[name].append(line)
    return bodies


def describe_operations(hlo: str) -> dict[str, dict[str, str]]:
    """For each instruction of the entry computation: its kind, shape and layer."""
    bodies = _computations(hlo)
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.MULTILINE).group(1)
    described = {}
    for line in bodies[entry]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        inner, layers = [_role(opcode, line)], _OP_NAME.findall(line)
        called = _CALLS.search(line)
        if called and called.group(1) in bodies:
            ops = [_INSTRUCTION.match(body) for body in bodies[called.group(1)]]
            heavy = [_role(m.group(3), body) for m, body in zip(ops, bodies[called.group(1)])
                     if m and m.group(3) in ("convolution", "dot")]  # fmt: skip
            inner = heavy or [m.group(3) for m in ops if m][-1:]
            layers += [n for body in bodies[called.group(1)] for n in _OP_NAME.findall(body)]
        described[name] = {
            "opcode": opcode,
            "computes": "+".join(sorted(set(inner))),
            "shape": shape.split("{")[0],
            "layer": _layer(layers),
        }
    return described


def _role(opcode: str, line: str) -> str:
    """A convolution's pass: its window is the kernel (forward or input gradient) or
    the whole image (the kernel's gradient, the batch contracted as features)."""
    window = re.search(r"window=\{size=(\w+)", line)
    if opcode != "convolution" or not window:
        return opcode
    size = window.group(1)
    if "transpose(" in line:
        return f"conv input-grad {size}"
    return f"conv fwd {size}" if "op_name" in line else f"conv kernel-grad {size}"


def _layer(op_names: list[str]) -> str:
    """The model layer and the pass (forward, backward) an operation belongs to."""
    if not op_names:
        return "-"
    counts = collections.Counter()
    for op_name in op_names:
        parts = op_name.split("/")
        modules = [p for p in parts if re.match(r"^[A-Z_][\w]*_\d+$", p) or p.startswith("_")]
        backward = "transpose(" in op_name
        primitive = parts[-1]
        where = "/".join(modules[-2:]) or "(step)"
        counts[f"{'bwd' if backward else 'fwd'} {where} {primitive}"] += 1
    return counts.most_common(1)[0][0]


def build_step(model_name: str, batch_size: int):
    """sgdjax's step on one device, its state and a batch (as ``train_throughput.py``)."""
    import jax
    import jax.numpy as jnp

    import sgdjax
    from sgdjax import training

    kernel_grad = training.choose_kernel_grad(jax.default_backend(), batch_size)
    model = training.create_model(model_name, kernel_grad=kernel_grad)
    tx = sgdjax.sgd(0.05, momentum=0.9, weight_decay=5e-4)
    state = training.TrainState.create(
        model=model, tx=tx, rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3))
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }
    return training.make_train_step(), state, batch


def profile(model_name: str, batch_size: int, steps: int) -> dict:
    """Per-operation milliseconds per step, with the operations' descriptions."""
    import jax

    step, state, batch = build_step(model_name, batch_size)
    described = describe_operations(step.lower(state, batch).compile().as_text())
    for _ in range(3):  # compile and warm up
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        for _ in range(steps):
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics["loss"])
        jax.profiler.stop_trace()
        trace_file = next(Path(folder).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals, wall = collections.Counter(), 0.0
    for event in events:
        if event.get("ph") != "X":
            continue
        if event["name"] in described:
            totals[event["name"]] += event["dur"] / 1000 / steps
        elif event["name"].startswith("ThunkExecutor::Execute (wait"):
            wall += event["dur"] / 1000 / steps
    return {"per_operation_ms": dict(totals), "described": described, "step_wall_ms": wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet", choices=["convnet", "resnet9"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="traced steps")
    parser.add_argument("--top", type=int, default=25, help="operations listed")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0:
        parser.error("need --steps > 0 and --batch-size > 0")
    result = profile(args.model, args.batch_size, args.steps)
    totals, described = result["per_operation_ms"], result["described"]
    summed = sum(totals.values())
    rows = []
    for name, ms in sorted(totals.items(), key=lambda item: -item[1])[: args.top]:
        info = described[name]
        rows.append([name, f"{ms:.2f}", f"{100 * ms / summed:.1f}%", info["computes"],
                     info["shape"], info["layer"]])  # fmt: skip
    print(f"{args.model}, batch {args.batch_size}: operations sum to {summed:.1f} ms per step "
          f"(executable wall {result['step_wall_ms']:.1f} ms)")  # fmt: skip
    print_table(["operation", "ms/step", "share", "computes", "shape", "layer"], rows)
    groups = collections.Counter()
    for name, ms in totals.items():
        groups[described[name]["computes"]] += ms
    print("\nby kind:")
    print_table(
        ["computes", "ms/step", "share"],
        [[kind, f"{ms:.2f}", f"{100 * ms / summed:.1f}%"] for kind, ms in groups.most_common()],
    )
    payload = {"environment": environment(), "model": args.model,
               "batch_size": args.batch_size, "steps": args.steps, **result}  # fmt: skip
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
