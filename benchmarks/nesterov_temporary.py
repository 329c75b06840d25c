"""The update step on the ResNet-18 tree: the sgdjax chain against arrangements moving fewer bytes.

    python benchmarks/nesterov_temporary.py [--repeats 20] [--steps 10] [--quick] [--out FILE.json]

The chain is sgdjax's clip by global norm (1.0) + ``sgd(0.1, momentum=0.9,
nesterov=True, weight_decay=5e-4)`` followed by ``apply_updates``, jitted with params
and state donated. With Nesterov momentum ``g' = c g + lambda theta`` feeds both the
new buffer ``b = mu b + g'`` and the step ``theta - eta (g' + mu b)``. Contenders:

* ``chain``: ``sgdjax.chain`` as it is (two loops per leaf: new buffer, new params).
* ``chain, grads donated``: the same with the gradients donated too.
* ``chunked loop``: the same operations on the same operands, in one loop per leaf
  over chunks of at most ``--chunk`` values (``lax.fori_loop`` with in-place
  ``dynamic_update_slice``): each chunk's new buffer is written first and read back
  for the step, so each chunk of ``g'`` lives in cache and the params and buffer are
  read and written once. (Computing the step from the old buffer instead makes the
  params' update read the buffer that the buffer's update overwrites in place, and
  XLA then copies both whole leaves in every iteration.)
* ``leaf by leaf``: the chain's two loops per leaf (new buffer; new params, the
  step's values recomputed behind ``lax.optimization_barrier`` as the chain does),
  with each leaf's inputs held behind a barrier until the previous leaf's params are
  written, so a leaf's second loop runs while its operands are still in cache.
* ``reassociated``: ``b = (mu b + c g) + lambda theta`` and
  ``theta - eta ((c g + lambda theta) + mu b)``, which share no subexpression (its
  float32 rounding differs from torch's order).
* ``torch fused``: ``clip_grad_norm_`` + ``torch.optim.SGD(fused=True)``.

Before timing, each JAX form runs ``--steps`` steps from the same start and the
largest absolute difference of its params and buffer from the chain's is printed
(0 means bitwise equal).
"""

from __future__ import annotations

import argparse
import math
import os
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
from update_overhead import make_transform, resnet18_shapes, torch_runner  # noqa: E402

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, MAX_NORM = 0.1, 0.9, 5e-4, 1.0


def _inputs(shapes, seed: int = 0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [jnp.asarray(rng.normal(size=s) * 1e-3, jnp.float32) for s in shapes]
    return params, grads


def chain_step(donate_grads: bool = False):
    """``(params, buffers, grads) -> (params, buffers)`` of the sgdjax chain, jitted."""
    import jax

    import sgdjax

    tx = make_transform("sgdjax-leaf")  # the per-leaf layout sgdjax.chain picks here

    def update(params, buffers, grads):
        state = _with_buffers(tx.init(params), buffers)
        updates, state = tx.update(grads, state, params)
        return sgdjax.apply_updates(params, updates), _buffers(state)

    return jax.jit(update, donate_argnums=(0, 1, 2) if donate_grads else (0, 1))


def _buffers(state):
    import optax

    return optax.tree_utils.tree_get(state, "momentum_buffer")


def _with_buffers(state, buffers):
    import optax

    return optax.tree_utils.tree_set(state, momentum_buffer=buffers)


def _chunk(size: int, limit: int) -> int:
    """The largest divisor of ``size`` that is at most ``limit``."""
    if size <= limit:
        return size
    best = 1
    for d in range(1, math.isqrt(size) + 1):
        if size % d == 0:
            for c in (d, size // d):
                if best < c <= limit:
                    best = c
    return best


def _decayed(g, p, norm):
    """The clipped, decayed gradient ``g'``, in the chain's order and dtypes."""
    import jax.numpy as jnp

    clipped = (g / norm * MAX_NORM).astype(g.dtype)
    return jnp.where(norm < MAX_NORM, g, clipped) + WEIGHT_DECAY * p


def chunked_step(limit: int):
    """The chain's operations in one loop per leaf over chunks, params and buffer in place."""
    import jax
    import jax.numpy as jnp

    from sgdjax._clipping import global_norm

    def leaf_values(g, p, b, norm, new_b=None):
        # The chain's operations, in its order and dtypes (clip, decay, momentum, rate).
        u = _decayed(g, p, norm)
        if new_b is None:
            new_b = MOMENTUM * b + u
        step = (u + MOMENTUM * new_b) * -jnp.asarray(LEARNING_RATE)
        return p + step, new_b

    def leaf_update(p, b, g, norm):
        shape, size = p.shape, p.size
        p, b, g = (jnp.reshape(x, (-1,)) for x in (p, b, g))
        chunk = _chunk(size, limit)

        def body(i, carry):
            p, b = carry
            start = i * chunk
            piece = [jax.lax.dynamic_slice_in_dim(x, start, chunk) for x in (g, p, b)]
            new_b = leaf_values(*piece, norm)[1]
            b = jax.lax.dynamic_update_slice_in_dim(b, new_b, start, 0)
            # The step reads the new buffer back from b, so no fusion reads b's old
            # values while another overwrites them (which would make XLA copy b).
            new_p = leaf_values(*piece, norm, new_b=jax.lax.dynamic_slice_in_dim(b, start, chunk))
            return jax.lax.dynamic_update_slice_in_dim(p, new_p[0], start, 0), b

        new_p, new_b = jax.lax.fori_loop(0, size // chunk, body, (p, b))
        return jnp.reshape(new_p, shape), jnp.reshape(new_b, shape)

    def update(params, buffers, grads):
        norm = global_norm(grads)
        pairs = [leaf_update(p, b, g, norm) for p, b, g in zip(params, buffers, grads)]
        return [pair[0] for pair in pairs], [pair[1] for pair in pairs]

    return jax.jit(update, donate_argnums=(0, 1))


def leaf_by_leaf_step():
    """The chain's two loops per leaf, run one leaf after another (same rounding)."""
    import jax
    import jax.numpy as jnp

    from sgdjax._clipping import global_norm

    def update(params, buffers, grads):
        norm = global_norm(grads)
        new_params, new_buffers, previous = [], [], None
        for p, b, g in zip(params, buffers, grads):
            if previous is not None:  # wait for the previous leaf's params
                (p, b, g), _ = jax.lax.optimization_barrier(((p, b, g), previous))
            new_b = MOMENTUM * b + _decayed(g, p, norm)
            p, g, barred_b = jax.lax.optimization_barrier((p, g, new_b))
            step = (_decayed(g, p, norm) + MOMENTUM * barred_b) * -jnp.asarray(LEARNING_RATE)
            previous = p + step
            new_params.append(previous)
            new_buffers.append(new_b)
        return new_params, new_buffers

    return jax.jit(update, donate_argnums=(0, 1))


def reassociated_step():
    """The chain's rule written without a shared subexpression (other rounding)."""
    import jax
    import jax.numpy as jnp

    def update(params, buffers, grads):
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads))
        scale = jnp.minimum(1.0, MAX_NORM / norm)
        new_buffers = [
            (MOMENTUM * b + scale * g) + WEIGHT_DECAY * p for p, b, g in zip(params, buffers, grads)
        ]
        new_params = [
            p - LEARNING_RATE * ((scale * g + WEIGHT_DECAY * p) + MOMENTUM * b)
            for p, g, b in zip(params, grads, new_buffers)
        ]
        return new_params, new_buffers

    return jax.jit(update, donate_argnums=(0, 1))


def _fresh(shapes, grads_scale: float = 1.0):
    import jax.numpy as jnp

    params, grads = _inputs(shapes)
    buffers = [jnp.zeros_like(p) for p in params]
    return params, buffers, [g * grads_scale for g in grads]


def deviation(step, shapes, steps: int, reference) -> float:
    """Largest |difference| of params and buffers from ``reference`` after ``steps`` steps."""
    import jax.numpy as jnp

    params, buffers, grads = _fresh(shapes)
    for index in range(steps):
        # Alternate small and large gradients, so the clip acts on some steps.
        scaled = [g * (1.0 if index % 2 else 3000.0) for g in grads]
        params, buffers = step(params, buffers, scaled)
    ours = [np.asarray(x) for x in (*params, *buffers)]
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ours, reference))


def runner(step, shapes, *, donate_grads: bool = False):
    """A callable running one step; with donated gradients, a fresh copy of them each time."""
    import jax
    import jax.numpy as jnp

    params, buffers, grads = _fresh(shapes)
    box = {"params": params, "buffers": buffers}

    def run():
        arguments = [jnp.copy(g) for g in grads] if donate_grads else grads
        box["params"], box["buffers"] = step(box["params"], box["buffers"], arguments)
        jax.block_until_ready(box["params"])

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="steps of the equality check")
    parser.add_argument("--chunk", type=int, default=32768, help="largest chunk (values)")
    parser.add_argument("--quick", action="store_true", help="small tree, few repeats (smoke)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    shapes = resnet18_shapes()
    repeats = args.repeats
    if args.quick:
        shapes, repeats, args.steps = [tuple(max(1, d // 8) for d in s) for s in shapes[:20]], 3, 2
        args.chunk = 64
    forms = {
        "chain": chain_step(),
        "chain, grads donated": chain_step(donate_grads=True),
        "chunked loop": chunked_step(args.chunk),
        "leaf by leaf": leaf_by_leaf_step(),
        "reassociated": reassociated_step(),
    }
    # The equality check: every form against the chain, from the same start.
    reference_params, reference_buffers, grads = _fresh(shapes)
    for index in range(args.steps):
        scaled = [g * (1.0 if index % 2 else 3000.0) for g in grads]
        reference_params, reference_buffers = forms["chain"](
            reference_params, reference_buffers, scaled
        )
    reference = [np.asarray(x) for x in (*reference_params, *reference_buffers)]
    deviations = {name: deviation(step, shapes, args.steps, reference)
                  for name, step in forms.items()}  # fmt: skip
    runners = {name: runner(step, shapes, donate_grads="donated" in name)
               for name, step in forms.items()}  # fmt: skip
    runners["torch fused"] = torch_runner("torch-fused", shapes)[0]
    load = load_average()
    timings = interleaved_timings(runners, repeats=repeats)
    stats = {name: summarize(seconds) for name, seconds in timings.items()}
    ratios = {name: ratio_summary(seconds, timings["torch fused"]) for name, seconds in
              timings.items()}  # fmt: skip
    rows = [
        [name, f"{s['median'] * 1e3:.2f}", f"{s['q1'] * 1e3:.2f}-{s['q3'] * 1e3:.2f}",
         f"{ratios[name]['median']:.2f} ({ratios[name]['q1']:.2f}-{ratios[name]['q3']:.2f})",
         "-" if name not in deviations else f"{deviations[name]:.3g}"]
        for name, s in stats.items()
    ]  # fmt: skip
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    malloc = {key: os.environ.get(key) for key in names}
    print(f"{len(shapes)} leaves, {sum(int(np.prod(s)) for s in shapes):,} parameters, "
          f"{repeats} interleaved repeats, load average {load} -> {load_average()}, "
          f"malloc settings {malloc}")  # fmt: skip
    print_table(["update", "median ms", "IQR ms", "x torch fused per round (IQR)",
                 f"max |diff| from chain, {args.steps} steps"], rows)  # fmt: skip
    write_json(args.out, {"environment": environment(), "malloc": malloc, "results": stats,
                          "x_torch_fused": ratios, "max_abs_difference": deviations,
                          "load_average": load})  # fmt: skip
    return stats


if __name__ == "__main__":
    main()
