"""The rest of ``torch.optim.lr_scheduler``: each schedule against torch over many random
cases and horizons, and against a float64 numpy reference of its docstring rule.

Our schedules are evaluated eagerly on one fixed-length array of counts per family, so
the op-by-op compilations are shared between cases (the jitted and vmapped forms are
checked for every schedule in ``test_schedules.py``).
"""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L
from torch.optim import swa_utils

import sgdjax
from sgdjax import schedules

RTOL = 1e-6  # float32 rounding, no absolute slack
NUM_COUNTS = 400
COUNTS = np.arange(NUM_COUNTS, dtype=np.int32)
NUM_CASES = 12


def _torch_values(make_scheduler, num_steps=NUM_COUNTS, lr=0.1, key="lr", momentum=0.9):
    """torch's ``param_groups[0][key]`` after 0, 1, ..., num_steps - 1 scheduler steps."""
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum)
        scheduler = make_scheduler(optimizer)
        for count in range(num_steps):
            values.append(float(optimizer.param_groups[0][key]))
            if count < num_steps - 1:
                optimizer.step()
                scheduler.step()
    return np.asarray(values, np.float64)


def _ours(schedule, counts=COUNTS):
    values = schedule(jnp.asarray(counts))
    chex.assert_shape(values, counts.shape)
    chex.assert_type(values, jnp.float32)
    return np.asarray(values, np.float64)


def _assert_close(ours, expected, rtol=RTOL, what=""):
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=0.0, err_msg=what)


# --------------------------------------------------------------------------------------
# float64 references, written from the docstrings.
# --------------------------------------------------------------------------------------


def _reference_constant_factor(c, init_value, factor, total_iters):
    return np.where(c < total_iters, init_value * factor, init_value)


def _reference_polynomial(c, init_value, total_iters, power):
    return init_value * ((total_iters - np.minimum(c, total_iters)) / total_iters) ** power


def _reference_cyclic_weight(c, up, down, mode, gamma, scale_fn, scale_mode):
    down = up if down is None else down
    total = up + down
    cycle = c // total + 1
    p = c - (cycle - 1) * total
    h = np.where(p <= up, p / up, (total - p) / max(down, 1))
    if scale_fn is not None:
        arg = cycle if scale_mode == "cycle" else c
        s = np.asarray([scale_fn(int(x)) for x in arg], np.float64)
    elif mode == "triangular":
        s = np.ones_like(h)
    elif mode == "triangular2":
        s = 0.5 ** (cycle - 1.0)
    else:
        s = gamma ** c.astype(np.float64)
    return h * s


def _reference_cyclic(c, base, peak, *args):
    return base + (peak - base) * _reference_cyclic_weight(c, *args)


def _reference_cyclic_momentum(c, base, peak, *args):
    return peak - (peak - base) * _reference_cyclic_weight(c, *args)


def _reference_one_cycle_momentum(c, total_steps, base, peak, pct_start, strategy, three):
    ends = [float(pct_start * total_steps) - 1]
    values = [(peak, base), (base, peak)]
    if three:
        ends.append(float(2 * pct_start * total_steps) - 2)
        values.append((peak, peak))
    ends.append(float(total_steps - 1))
    out = []
    for count in np.minimum(c, total_steps - 1):
        start = 0.0
        for end, (v0, v1) in zip(ends, values):
            if count <= end or end == ends[-1]:
                x = (count - start) / (end - start)
                if strategy == "cos":
                    out.append(v1 + (v0 - v1) * (1 + math.cos(math.pi * x)) / 2)
                else:
                    out.append(v0 + (v1 - v0) * x)
                break
            start = end
    return np.asarray(out)


def _reference_swa_lr(c, init_value, swa_value, anneal_steps, strategy):
    t = np.ones(c.shape) if anneal_steps == 0 else np.minimum(c / anneal_steps, 1.0)
    alpha = (1 - np.cos(np.pi * t)) / 2 if strategy == "cos" else t
    return swa_value * alpha + init_value * (1 - alpha)


def _reference_multiplicative(c, init_value, factor_fn, total_steps):
    table = init_value * np.cumprod([1.0] + [factor_fn(k) for k in range(1, total_steps + 1)])
    return table[np.minimum(c, total_steps)]


# --------------------------------------------------------------------------------------
# Random cases, each with its sgdjax schedule, torch scheduler and reference.
# --------------------------------------------------------------------------------------


def _log_uniform(rng, low, high):
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _constant_factor_cases(rng):
    for _ in range(NUM_CASES):
        init, factor = _log_uniform(rng, 1e-4, 1.0), float(rng.uniform(0.01, 1.0))
        total = int(rng.integers(1, 60))
        yield (
            schedules.constant_factor(init, factor=factor, total_iters=total),
            lambda o, f=factor, t=total: L.ConstantLR(o, factor=f, total_iters=t),
            init,
            _reference_constant_factor(COUNTS, init, factor, total),
        )


def _polynomial_cases(rng):
    powers = [1.0, 2.0, 0.5, 0.0, *rng.uniform(0.0, 3.0, NUM_CASES - 4)]
    for power in powers:
        init, total = _log_uniform(rng, 1e-4, 1.0), int(rng.integers(1, 350))
        yield (
            schedules.polynomial(init, total_iters=total, power=float(power)),
            lambda o, t=total, p=float(power): L.PolynomialLR(o, total_iters=t, power=p),
            init,
            _reference_polynomial(COUNTS, init, total, power),
        )


SCALE_FNS = [
    (lambda x: 1.0 / (1.0 + 0.1 * x), "cycle"),
    (lambda x: 1.0 / (1.0 + 0.01 * x), "iterations"),
    (lambda x: 0.8**x, "cycle"),
    (lambda x: (x % 3 + 1) / 3, "iterations"),
]


def _cyclic_arguments(rng, index):
    up = int(rng.integers(1, 40))
    down = None if rng.uniform() < 0.3 else int(rng.integers(0 if index % 4 == 0 else 1, 40))
    mode = ["triangular", "triangular2", "exp_range"][index % 3]
    gamma = float(rng.uniform(0.98, 1.0)) if index % 5 else 1.002
    scale_fn, scale_mode = (None, str(rng.choice(["cycle", "iterations"])))
    if index % 4 == 3:
        scale_fn, scale_mode = SCALE_FNS[(index // 4) % len(SCALE_FNS)]
    return up, down, mode, gamma, scale_fn, scale_mode


def _torch_cyclic(base, peak, up, down, mode, gamma, scale_fn, scale_mode, **momenta):
    def make(optimizer):
        return L.CyclicLR(
            optimizer,
            base_lr=base,
            max_lr=peak,
            step_size_up=up,
            step_size_down=down,
            mode=mode,
            gamma=gamma,
            scale_fn=scale_fn,
            scale_mode=scale_mode,
            **momenta,
        )

    return make


def _cyclic_cases(rng):
    for index in range(2 * NUM_CASES):
        base = _log_uniform(rng, 1e-4, 0.1)
        peak = base + float(rng.uniform(0.0, 1.0)) if index % 6 else base / 3  # peak < base
        args = _cyclic_arguments(rng, index)
        yield (
            schedules.cyclic(base, peak, *args),
            _torch_cyclic(base, peak, *args, cycle_momentum=False),
            0.1,
            _reference_cyclic(COUNTS, base, peak, *args),
        )


def _lambda_cases(rng):
    fns = [lambda c: 1.0 / (1.0 + 0.05 * c), lambda c: (c % 7) / 7 + 0.1, lambda c: 1.0 + 0.0 * c]
    for fn in fns:
        init = _log_uniform(rng, 1e-4, 1.0)
        yield (
            schedules.lambda_factor(init, fn),
            lambda o, f=fn: L.LambdaLR(o, f),
            init,
            init * np.asarray([fn(int(c)) for c in COUNTS], np.float64),
        )


def _multiplicative_cases(rng):
    fns = [lambda k: 0.99, lambda k: 1 - 0.5 / (k + 10), lambda k: 1.01 if k % 2 else 0.98]
    for index, fn in enumerate(fns):
        # torch goes on multiplying past total_steps, where ours holds: the first case
        # tabulates the whole horizon, the others hold for the last counts.
        init = _log_uniform(rng, 1e-4, 1.0)
        total = NUM_COUNTS if index == 0 else int(rng.integers(1, NUM_COUNTS))
        held = np.minimum(COUNTS, total)
        yield (
            schedules.multiplicative(init, fn, total_steps=total),
            lambda o, f=fn, t=total: L.MultiplicativeLR(o, lambda k: f(k) if k <= t else 1.0),
            init,
            _reference_multiplicative(held, init, fn, total),
        )


def _swa_lr_cases(rng):
    for index in range(NUM_CASES):
        init, swa = _log_uniform(rng, 1e-3, 1.0), _log_uniform(rng, 1e-4, 1.0)
        steps = 0 if index == 0 else int(rng.integers(1, 120))
        strategy = ["cos", "linear"][index % 2]
        yield (
            schedules.swa_lr(init, swa, anneal_steps=steps, anneal_strategy=strategy),
            lambda o, s=swa, a=steps, k=strategy: swa_utils.SWALR(
                o, swa_lr=s, anneal_epochs=a, anneal_strategy=k
            ),
            init,
            _reference_swa_lr(COUNTS, init, swa, steps, strategy),
        )


def _chained_pieces(rng, init):
    """(our schedule, torch factory, float64 reference) for one random chainable piece."""
    kind = int(rng.integers(0, 4))
    if kind == 0:
        factor, total = float(rng.uniform(0.1, 1.0)), int(rng.integers(1, 100))
        return (
            schedules.constant_factor(init, factor, total),
            lambda o: L.ConstantLR(o, factor=factor, total_iters=total),
            _reference_constant_factor(COUNTS, init, factor, total),
        )
    if kind == 1:
        total, power = int(rng.integers(300, 600)), float(rng.uniform(0.5, 2.0))
        return (
            schedules.polynomial(init, total, power),
            lambda o: L.PolynomialLR(o, total_iters=total, power=power),
            _reference_polynomial(COUNTS, init, total, power),
        )
    if kind == 2:
        gamma = float(rng.uniform(0.99, 1.0))
        return (
            schedules.exponential_decay(init, gamma),
            lambda o: L.ExponentialLR(o, gamma=gamma),
            init * gamma ** COUNTS.astype(np.float64),
        )
    start = float(rng.uniform(0.1, 1.0))
    total = int(rng.integers(1, 200))
    return (
        schedules.linear(init, start_factor=start, total_iters=total),
        lambda o: L.LinearLR(o, start_factor=start, total_iters=total),
        init * (start + (1 - start) * np.minimum(COUNTS, total) / total),
    )


def _chained_cases(rng):
    for index in range(NUM_CASES):
        init = _log_uniform(rng, 1e-3, 1.0)
        pieces = [_chained_pieces(rng, init) for _ in range(2 + index % 2)]
        yield (
            schedules.chained(init, [ours for ours, _, _ in pieces]),
            lambda o, ps=pieces: L.ChainedScheduler([make(o) for _, make, _ in ps]),
            init,
            init * np.prod([reference / init for _, _, reference in pieces], axis=0),
        )


FAMILIES = {
    "constant_factor": _constant_factor_cases,
    "polynomial": _polynomial_cases,
    "cyclic": _cyclic_cases,
    "lambda_factor": _lambda_cases,
    "multiplicative": _multiplicative_cases,
    "swa_lr": _swa_lr_cases,
    "chained": _chained_cases,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_learning_rate_schedules_match_torch_and_the_float64_rule(family):
    rng = np.random.default_rng(sorted(FAMILIES).index(family))
    # powers of float32 inputs in float32 (pow, a user's factor_fn) cost a few roundings
    rtol = {"polynomial": 4e-6, "lambda_factor": 2e-6, "chained": 3e-6}.get(family, RTOL)
    for index, (ours, make, lr, reference) in enumerate(FAMILIES[family](rng)):
        values = _ours(ours)
        _assert_close(values, _torch_values(make, lr=lr), rtol, f"{family} case {index} vs torch")
        _assert_close(values, reference, rtol, f"{family} case {index} vs float64 rule")


def test_cyclic_momentum_matches_torch_and_the_float64_rule():
    rng = np.random.default_rng(10)
    for index in range(2 * NUM_CASES):
        base, peak = sorted(rng.uniform(0.5, 0.99, 2))
        args = _cyclic_arguments(rng, index)
        ours = _ours(schedules.cyclic_momentum(*args[:2], base, peak, *args[2:]))
        make = _torch_cyclic(0.01, 0.1, *args, base_momentum=base, max_momentum=peak)
        _assert_close(ours, _torch_values(make, key="momentum"), what=f"case {index} vs torch")
        reference = _reference_cyclic_momentum(COUNTS, base, peak, *args)
        _assert_close(ours, reference, what=f"case {index} vs float64 rule")


def test_one_cycle_momentum_matches_torch_and_the_float64_rule():
    rng = np.random.default_rng(11)
    done = 0
    while done < 2 * NUM_CASES:
        total = int(rng.integers(10, NUM_COUNTS + 1))
        pct, three = float(rng.uniform(0.05, 0.6)), bool(rng.integers(0, 2))
        strategy = ["cos", "linear"][done % 2]
        base, peak = sorted(rng.uniform(0.5, 0.99, 2))
        try:
            ours = schedules.one_cycle_momentum(total, base, peak, pct, strategy, three)
        except ValueError:  # an empty phase (torch divides by zero or skips it)
            continue

        def make(optimizer, total=total, pct=pct, strategy=strategy, three=three, b=base, p=peak):
            return L.OneCycleLR(optimizer, max_lr=0.1, total_steps=total, pct_start=pct,
                                anneal_strategy=strategy, three_phase=three,
                                base_momentum=b, max_momentum=p)  # fmt: skip

        values = _ours(ours)  # the fixed counts: one set of compilations for all cases
        theirs = _torch_values(make, num_steps=total, key="momentum")
        _assert_close(values[:total], theirs, what=f"case {done} vs torch")
        reference = _reference_one_cycle_momentum(COUNTS, total, base, peak, pct, strategy, three)
        _assert_close(values, reference, what=f"case {done} vs float64 rule")
        # after the cycle the momentum holds its final value
        _assert_close(values[total - 1 :], peak)
        done += 1


def test_new_schedules_golden_values():
    # ConstantLR(factor=1/3, total_iters=5) on lr 0.3: 0.1 for counts 0..4, then 0.3.
    _assert_close(_ours(schedules.constant_factor(0.3))[:7], [0.1] * 5 + [0.3] * 2)
    # PolynomialLR(total_iters=5, power=1): 1 - c / 5.
    _assert_close(_ours(schedules.polynomial(1.0))[:5], [1.0, 0.8, 0.6, 0.4, 0.2])
    # CyclicLR(0.1, 0.5, step_size_up=2, step_size_down=4): up by 0.2, down by 0.1.
    cyclic = schedules.cyclic(0.1, 0.5, step_size_up=2, step_size_down=4)
    _assert_close(_ours(cyclic)[:8], [0.1, 0.3, 0.5, 0.4, 0.3, 0.2, 0.1, 0.3])
    # exp_range scales by gamma ** c: at c = 2 (the peak) 0.1 + 0.4 * 0.5 ** 2 = 0.2.
    exp_range = schedules.cyclic(0.1, 0.5, step_size_up=2, mode="exp_range", gamma=0.5)
    _assert_close(_ours(exp_range)[[2]], [0.2])
    # OneCycleLR momentum, T = 10, pct 0.3: phase end 2, 0.95 -> 0.85 -> 0.95; at c = 1
    # cos: 0.85 + 0.1 * (1 + cos(pi / 2)) / 2 = 0.9.
    momentum = schedules.one_cycle_momentum(10)
    _assert_close(_ours(momentum)[[0, 1, 2, 9]], [0.95, 0.9, 0.85, 0.95])
    # SWALR(swa_lr=0.1, anneal_epochs=4, cos) from 1.0: at c = 2, alpha = 1/2 -> 0.55.
    _assert_close(_ours(schedules.swa_lr(1.0, 0.1, 4))[[0, 2, 4, 9]],
                  [1.0, 0.55, 0.1, 0.1])  # fmt: skip


# --------------------------------------------------------------------------------------
# reduce_on_plateau
# --------------------------------------------------------------------------------------


def _plateau_metrics(rng, num_epochs):
    """A noisy descent with flat stretches, repeated values and occasional jumps."""
    metrics, value = [], float(rng.uniform(0.5, 2.0))
    while len(metrics) < num_epochs:
        kind = rng.integers(0, 3)
        run = int(rng.integers(1, 8))
        if kind == 0:  # improving
            steps = value * rng.uniform(0.0, 0.1, run)
            metrics.extend(value - np.cumsum(steps))
            value = metrics[-1]
        elif kind == 1:  # a plateau of exactly repeated values
            metrics.extend([value] * run)
        else:  # noise around the current value
            metrics.extend(value * (1 + rng.normal(0, 0.02, run)))
    return np.asarray(metrics[:num_epochs], np.float32)


def _reference_plateau(metrics, init_value, mode, factor, patience, threshold,
                       threshold_mode, cooldown, min_value, eps):  # fmt: skip
    """The docstring's rule in float64, one metric per epoch."""
    lr, best, bad, cooldown_left = init_value, math.inf if mode == "min" else -math.inf, 0, 0
    rates = []
    for m in metrics.astype(np.float64):
        sign = 1 if mode == "max" else -1
        bar = best * (1 + sign * threshold) if threshold_mode == "rel" else best + sign * threshold
        better = m > bar if mode == "max" else m < bar
        best, bad = (m, 0) if better else (best, bad + 1)
        if cooldown_left > 0:
            cooldown_left, bad = cooldown_left - 1, 0
        if bad > patience:
            new = max(lr * factor, min_value)
            if lr - new > eps:
                lr = new
            cooldown_left, bad = cooldown, 0
        rates.append(lr)
    return np.asarray(rates)


def test_reduce_on_plateau_matches_torch_and_the_float64_rule():
    rng = np.random.default_rng(12)
    reductions = 0
    for index in range(24):
        config = dict(
            mode=["min", "max"][index % 2],
            factor=float(rng.choice([0.1, 0.5, rng.uniform(0.0, 0.99)])),
            patience=int(rng.integers(0, 6)),
            threshold=float(rng.choice([0.0, 1e-4, 1e-2])),
            threshold_mode=["rel", "abs"][(index // 2) % 2],
            cooldown=int(rng.integers(0, 4)),
            min_value=float(rng.choice([0.0, 1e-3, 0.02])),
            eps=float(rng.choice([1e-8, 0.0, 1e-3])),
        )
        init = _log_uniform(rng, 1e-2, 1.0)
        metrics = _plateau_metrics(rng, 60)
        if config["mode"] == "max":
            metrics = -metrics
        plateau = schedules.reduce_on_plateau(init, **config)
        state, ours = plateau.init(), []
        for metric in metrics:
            state = plateau.update(state, metric)
            ours.append(float(plateau.value(state)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=init)
            torch_config = dict(config, min_lr=config["min_value"])
            del torch_config["min_value"]
            scheduler = L.ReduceLROnPlateau(optimizer, **torch_config)
            theirs = []
            for metric in metrics:
                scheduler.step(float(metric))
                theirs.append(optimizer.param_groups[0]["lr"])
        # a few float32 roundings per reduction
        _assert_close(ours, theirs, 5e-6, f"case {index}: {config} vs torch")
        _assert_close(ours, _reference_plateau(metrics, init, **config), 5e-6, f"case {index}")
        reductions += len(set(theirs)) - 1
        if config["min_value"] > 0 and theirs[-1] == config["min_value"]:
            reductions += 100  # the floor was reached at least once
    assert reductions > 100 + 24, "the cases must reduce the rate and reach min_value"


def test_reduce_on_plateau_update_is_jittable_and_scans():
    plateau = schedules.reduce_on_plateau(0.5, patience=1, cooldown=1, factor=0.5)
    metrics = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5], jnp.float32)

    def run(state, metric):
        state = plateau.update(state, metric)
        return state, plateau.value(state)

    _, rates = jax.jit(lambda s, m: jax.lax.scan(run, s, m))(plateau.init(), metrics)
    # epoch 1 sets best; 2, 3 bad -> reduce at 3 (0.25), cooldown 1 hides epoch 4;
    # epoch 5 bad (1), 6 better, 7 bad (1), 8 bad (2) -> reduce (0.125).
    _assert_close(np.asarray(rates), [0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.125])
    state = jax.eval_shape(plateau.init)
    assert state.num_bad_epochs.dtype == jnp.int32 and state.learning_rate.dtype == jnp.float32


def test_reduce_on_plateau_drives_sgd_like_torch():
    """SGD(momentum=0.9) with ReduceLROnPlateau stepped once per epoch of 5 steps."""
    rng = np.random.default_rng(13)
    grads = rng.normal(size=(40, 6)).astype(np.float32)
    epoch_losses = np.asarray([1.0, 0.9, 0.9, 0.95, 0.9, 0.91, 0.9, 0.9], np.float32)
    weight = torch.zeros(6, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    scheduler = L.ReduceLROnPlateau(optimizer, patience=1, factor=0.5)
    plateau = schedules.reduce_on_plateau(0.1, patience=1, factor=0.5)
    tx = sgdjax.inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9)
    params = jnp.zeros(6)
    opt_state, plateau_state = tx.init(params), plateau.init()
    update = jax.jit(tx.update)
    for epoch, loss in enumerate(epoch_losses):
        for step in range(5):
            g = grads[5 * epoch + step]
            weight.grad = torch.from_numpy(g.copy())
            optimizer.step()
            updates, opt_state = update(jnp.asarray(g), opt_state, params)
            params = sgdjax.apply_updates(params, updates)
            np.testing.assert_allclose(params, weight.detach().numpy(), rtol=1e-5, atol=1e-6)
        scheduler.step(float(loss))
        plateau_state = plateau.update(plateau_state, loss)
        opt_state.hyperparams["learning_rate"] = plateau.value(plateau_state)
    assert optimizer.param_groups[0]["lr"] < 0.1 / 3  # at least two reductions happened
    np.testing.assert_allclose(plateau.value(plateau_state), optimizer.param_groups[0]["lr"])


# --------------------------------------------------------------------------------------
# Scheduled momentum in sgd / momentum.
# --------------------------------------------------------------------------------------


def _mixed_params(rng):
    shapes = {"w": (4, 3), "b": (3,), "s": (), "k": (2, 2, 2)}
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def _torch_sgd_with_scheduler(params0, grads, make_optimizer, make_scheduler):
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params0.items()}
    optimizer = make_optimizer(list(tensors.values()))
    scheduler = make_scheduler(optimizer)
    history = []
    for g in grads:
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(g[name].copy())
        optimizer.step()
        scheduler.step()
        history.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return history


MOMENTUM_CASES = {
    # OneCycleLR with its defaults: the recipe of the issue (cycle_momentum=True).
    "one_cycle_nesterov_weight_decay": (
        lambda: sgdjax.sgd(
            schedules.one_cycle(0.1, 30),
            momentum=schedules.one_cycle_momentum(30),
            nesterov=True,
            weight_decay=1e-4,
        ),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=30),
    ),
    "one_cycle_three_phase_dampened": (
        lambda: sgdjax.sgd(
            schedules.one_cycle(0.05, 30, three_phase=True, anneal_strategy="linear"),
            momentum=schedules.one_cycle_momentum(
                30, 0.7, 0.9, three_phase=True, anneal_strategy="linear"
            ),
            dampening=0.3,
        ),  # fmt: skip
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3),
        lambda o: L.OneCycleLR(
            o,
            max_lr=0.05,
            total_steps=30,
            three_phase=True,
            anneal_strategy="linear",
            base_momentum=0.7,
            max_momentum=0.9,
        ),
    ),  # fmt: skip
    "cyclic_triangular2": (
        lambda: sgdjax.sgd(
            schedules.cyclic(0.01, 0.1, step_size_up=3, step_size_down=5, mode="triangular2"),
            momentum=schedules.cyclic_momentum(3, 5, mode="triangular2"),
            nesterov=True,
        ),
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, nesterov=True),
        lambda o: L.CyclicLR(o, 0.01, 0.1, step_size_up=3, step_size_down=5, mode="triangular2"),
    ),
}


@pytest.mark.parametrize("name", sorted(MOMENTUM_CASES))
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_scheduled_momentum_matches_torch_every_step(name, jit):
    make_ours, make_optimizer, make_scheduler = MOMENTUM_CASES[name]
    rng = np.random.default_rng(14)
    params0 = _mixed_params(rng)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params0)
             for _ in range(30)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = _torch_sgd_with_scheduler(params0, grads, make_optimizer, make_scheduler)
    tx = make_ours()
    params = jax.tree.map(jnp.asarray, params0)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for step, (g, theirs) in enumerate(zip(grads, history)):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
        params = sgdjax.apply_updates(params, updates)
        chex.assert_trees_all_close(params, theirs, rtol=1e-5, atol=1e-6,
                                    custom_message=f"step {step}")  # fmt: skip


def test_scheduled_momentum_is_the_value_before_each_update():
    # b_1 = g; b_2 = mu(1) b_1 + g with mu(c) = 0.5, 0.55, 0.6: u_2 = 0.55 + 1 = 1.55.
    tx = sgdjax.momentum(schedules.linear(0.6, start_factor=0.5 / 0.6, total_iters=2))
    state = tx.init(jnp.zeros(()))
    _, state = tx.update(jnp.ones(()), state)
    updates, state = tx.update(jnp.ones(()), state)
    _assert_close(np.asarray(updates), 1.55)
    shapes = jax.ShapeDtypeStruct((3,), jnp.float32)
    chex.assert_trees_all_equal_structs(jax.eval_shape(tx.init, shapes), tx.init(jnp.zeros(3)))


@pytest.mark.parametrize(
    "momentum",
    [
        schedules.constant(1.0),
        schedules.linear(1.0),  # climbs to 1.0
        schedules.cyclic(0.5, 1.2, step_size_up=3),
        schedules.join([schedules.constant(0.9), schedules.constant(1.5)], [4]),
    ],
)
def test_a_momentum_schedule_outside_zero_one_is_rejected(momentum):
    with pytest.raises(ValueError, match=r"momentum must take values in \[0, 1\)"):
        sgdjax.sgd(0.1, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        sgdjax.momentum(momentum)


def test_momentum_schedules_of_ours_inside_zero_one_are_accepted():
    for momentum in (
        schedules.one_cycle_momentum(10),
        schedules.cyclic_momentum(),
        schedules.warmup(schedules.constant(0.9), 5),
        schedules.cosine_annealing(0.9, 10, eta_min=0.5),
        lambda count: 0.9 + 0.0 * count,  # not ours: not checked
    ):
        sgdjax.sgd(0.1, momentum=momentum, nesterov=True)


BAD = [
    (lambda: schedules.constant_factor(0.1, factor=0.0), "factor", "0.0"),
    (lambda: schedules.constant_factor(0.1, factor=1.5), "factor", "1.5"),
    (lambda: schedules.constant_factor(0.1, total_iters=0), "total_iters", "0"),
    (lambda: schedules.polynomial(0.1, total_iters=0), "total_iters", "0"),
    (lambda: schedules.polynomial(0.1, power=-1.0), "power", "-1.0"),
    (lambda: schedules.cyclic(-0.1, 0.1), "base_value", "-0.1"),
    (lambda: schedules.cyclic(0.1, math.nan), "max_value", "nan"),
    (lambda: schedules.cyclic(0.1, 1.0, step_size_up=0), "step_size_up", "0"),
    (lambda: schedules.cyclic(0.1, 1.0, step_size_down=-1), "step_size_down", "-1"),
    (lambda: schedules.cyclic(0.1, 1.0, mode="cosine"), "mode", "'cosine'"),
    (lambda: schedules.cyclic(0.1, 1.0, gamma=0.0), "gamma", "0.0"),
    (lambda: schedules.cyclic(0.1, 1.0, scale_fn=3.0), "scale_fn", "3.0"),
    (lambda: schedules.cyclic(0.1, 1.0, scale_mode="epoch"), "scale_mode", "'epoch'"),
    (lambda: schedules.cyclic_momentum(base_momentum=1.0), "base_momentum", "1.0"),
    (lambda: schedules.cyclic_momentum(max_momentum=-0.1), "max_momentum", "-0.1"),
    (lambda: schedules.one_cycle_momentum(0), "total_steps", "0"),
    (lambda: schedules.one_cycle_momentum(10, max_momentum=1.0), "max_momentum", "1.0"),
    (lambda: schedules.one_cycle_momentum(10, pct_start=1.0), "pct_start", "1.0"),
    (lambda: schedules.one_cycle_momentum(3), "total_steps", "3"),
    (lambda: schedules.one_cycle_momentum(10, anneal_strategy="exp"), "anneal_strategy", "exp"),
    (lambda: schedules.lambda_factor(0.1, 0.5), "factor_fn", "0.5"),
    (lambda: schedules.multiplicative(0.1, lambda k: -1.0, 3), "factor_fn(1)", "-1.0"),
    (lambda: schedules.multiplicative(0.1, lambda k: 1e300, 3), "factor_fn", "overflow"),
    (lambda: schedules.multiplicative(0.1, lambda k: 0.5, 0), "total_steps", "0"),
    (lambda: schedules.chained(0.1, []), "schedules", "[]"),
    (lambda: schedules.chained(0.1, [0.5]), "schedules[0]", "0.5"),
    (lambda: schedules.swa_lr(0.1, -0.1), "swa_value", "-0.1"),
    (lambda: schedules.swa_lr(0.1, 0.1, anneal_steps=-1), "anneal_steps", "-1"),
    (lambda: schedules.swa_lr(0.1, 0.1, anneal_strategy="exp"), "anneal_strategy", "exp"),
    (lambda: schedules.reduce_on_plateau(0.1, mode="up"), "mode", "'up'"),
    (lambda: schedules.reduce_on_plateau(0.1, factor=1.0), "factor", "1.0"),
    (lambda: schedules.reduce_on_plateau(0.1, patience=-1), "patience", "-1"),
    (lambda: schedules.reduce_on_plateau(0.1, threshold=-1e-4), "threshold", "-0.0001"),
    (lambda: schedules.reduce_on_plateau(0.1, threshold_mode="x"), "threshold_mode", "'x'"),
    (lambda: schedules.reduce_on_plateau(0.1, cooldown=1.5), "cooldown", "1.5"),
    (lambda: schedules.reduce_on_plateau(0.1, min_value=-1.0), "min_value", "-1.0"),
    (lambda: schedules.reduce_on_plateau(0.1, eps=math.inf), "eps", "inf"),
]


@pytest.mark.parametrize("make, argument, value", BAD, ids=[f"{a}={v}" for _, a, v in BAD])
def test_bad_arguments_name_argument_and_value(make, argument, value):
    with pytest.raises(ValueError) as raised:
        make()
    message = str(raised.value)
    assert argument in message and value in message, message


def test_chained_with_a_cosine_to_zero_matches_torch_up_to_t_max():
    """CosineAnnealingLR(eta_min=0) steps multiply the rate too, until T_max."""
    ours = schedules.chained(
        0.1, [schedules.cosine_annealing(0.1, 200), schedules.exponential_decay(0.1, 0.99)]
    )
    theirs = _torch_values(
        lambda o: L.ChainedScheduler([L.CosineAnnealingLR(o, T_max=200), L.ExponentialLR(o, 0.99)]),
        num_steps=200,
    )
    _assert_close(_ours(ours)[:200], theirs, rtol=3e-6)
