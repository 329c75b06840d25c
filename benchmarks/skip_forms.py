"""Forms of the skip-non-finite guard on the ResNet-18 tree, against the unguarded chain.

    python benchmarks/skip_forms.py [--repeats 15] [--quick] [--out FILE.json]

The chain is ``update_overhead.py``'s sgdjax chain (clip by global norm, coupled
decay, Nesterov, learning rate), one donated, jitted update with ``apply_updates``.
Each guarded form computes ``u', s' = inner(g, s)`` and ``finite``, then gives
``(u', s')`` if finite and ``(0, s)`` otherwise:

* ``chain``: no guard.
* ``skip_non_finite``: ``sgdjax.skip_non_finite`` as it is (``jnp.where`` selects).
* ``cond select``: the selection of updates and state by one ``lax.cond``.
* ``cond state``: updates by ``jnp.where``, the state by ``lax.cond``.
* ``sum(x * 0) test``: the finiteness test as ``isfinite(sum(x * 0))`` per tree.
* ``twice``: the inner update evaluated once for the test and once, from inputs
  behind an ``optimization_barrier``, for the selected outputs.
* ``gradient only``: only the gradient tested (not the update; other semantics,
  for scale).

The table gives the median milliseconds (IQR) over interleaved, shuffled rounds,
the per-round ratio to ``chain``, each compiled program's temporary bytes, and
whether the form gives the chain's update bitwise on a finite gradient and a zero
update with the state kept on a NaN one ("skips"; for ``chain``, only the former).
"""

from __future__ import annotations

import argparse
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
from update_overhead import jax_runner, make_transform, resnet18_shapes  # noqa: E402


def _finite_by_sum(tree):
    import jax
    import jax.numpy as jnp

    return jnp.isfinite(sum(jnp.sum(leaf * 0) for leaf in jax.tree.leaves(tree)))


def _guarded(form: str):
    """The chain wrapped in the guard form ``form`` (state: ``SkipNonFiniteState``)."""
    import jax
    import jax.numpy as jnp
    import optax

    import sgdjax
    from sgdjax import _skip

    chain = make_transform("sgdjax")
    if form == "chain":
        return chain
    if form == "skip_non_finite":
        return sgdjax.skip_non_finite(chain)
    inner = optax.with_extra_args_support(chain)

    def select(finite, updates, new, old):
        zeros = jax.tree.map(jnp.zeros_like, updates)
        if form == "cond select":
            return jax.lax.cond(finite, lambda: (updates, new), lambda: (zeros, old))
        updates = jax.tree.map(lambda u, z: jnp.where(finite, u, z), updates, zeros)
        if form == "cond state":
            return updates, jax.lax.cond(finite, lambda: new, lambda: old)
        return updates, jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    def update_fn(grads, state, params=None, **extra_args):
        old = state.inner_state
        updates, new = inner.update(grads, old, params, **extra_args)
        if form == "gradient only":
            finite = _skip.all_finite(grads)
        elif form == "sum(x * 0) test":
            finite = jnp.logical_and(_finite_by_sum(grads), _finite_by_sum(updates))
        else:
            finite = jnp.logical_and(_skip.all_finite(grads), _skip.all_finite(updates))
        if form == "twice":
            grads, old, params, finite = jax.lax.optimization_barrier((grads, old, params, finite))
            updates, new = inner.update(grads, old, params, **extra_args)
        updates, new = select(finite, updates, new, old)
        return updates, state._replace(inner_state=new, last_finite=finite)

    return optax.GradientTransformationExtraArgs(sgdjax.skip_non_finite(chain).init, update_fn)


def _behaves(form: str, shapes) -> bool:
    """Whether ``form`` gives the chain's update on a finite gradient and skips a NaN one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    tx, chain = _guarded(form), make_transform("sgdjax")
    params = [jnp.ones(s) for s in shapes]
    grads = [jnp.full(s, 1e-3) for s in shapes]
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    expected, _ = jax.jit(chain.update)(grads, chain.init(params), params)
    same = all(np.array_equal(a, b) for a, b in zip(updates, expected, strict=True))
    if form == "chain":
        return same
    bad = [g.at[(0,) * g.ndim].set(jnp.nan) for g in grads]
    skipped, after = jax.jit(tx.update)(bad, state, params)
    kept = jax.tree.all(jax.tree.map(np.array_equal, after.inner_state, state.inner_state))
    return same and kept and all(not np.any(u) for u in skipped)


FORMS = ("chain", "skip_non_finite", "cond select", "cond state", "sum(x * 0) test", "twice",
         "gradient only")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="a small tree, few rounds")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats <= 0:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    shapes = resnet18_shapes()
    if args.quick:
        shapes, args.repeats = [(64, 64)] * 4, 2
    load_before = load_average()
    runners, info = {}, {}
    for form in FORMS:
        runners[form], info[form] = jax_runner(form, shapes, tx=_guarded(form))
    timings = interleaved_timings(runners, repeats=args.repeats)
    results, rows = {}, []
    for form in FORMS:
        stats = summarize(timings[form])
        ratio = ratio_summary(timings[form], timings["chain"])
        behaves = _behaves(form, shapes)
        results[form] = {"seconds": stats, "ratio_to_chain": ratio, "behaves": behaves,
                         **info[form]}  # fmt: skip
        rows.append([form, f"{1e3 * stats['median']:.2f} ({1e3 * stats['q1']:.2f}-"
                     f"{1e3 * stats['q3']:.2f})", f"{ratio['median']:.2f}x",
                     f"{info[form].get('temp_bytes', 0) / 2**20:.1f}", behaves])  # fmt: skip
    print_table(["guard form", "median ms (IQR)", "/ chain", "temp MiB", "skips"], rows)
    payload = {"environment": environment(), "repeats": args.repeats, "results": results,
               "load_average": [load_before, load_average()]}  # fmt: skip
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
