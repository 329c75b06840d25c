"""``sgdjax.schedules`` against ``torch.optim.lr_scheduler``, optax and hand-computed values."""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch.optim import lr_scheduler

from sgdjax import schedules

BASE_LR = 0.1
INT32_MAX = 2**31 - 1
# Our rates are float32; torch's are float64. Every comparison allows float32
# relative rounding only: no absolute slack, so values near zero must match too.
RTOL = 1e-6


def _torch_rates(make_scheduler, num_steps, base_lr=BASE_LR):
    """torch's lr after 0, 1, ..., num_steps - 1 calls of ``scheduler.step()``."""
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
        scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
        for count in range(num_steps):
            rates.append(optimizer.param_groups[0]["lr"])
            if scheduler is not None and count < num_steps - 1:
                optimizer.step()
                scheduler.step()
    return np.asarray(rates, np.float64)


def _our_rates(schedule, num_steps):
    """Our rates at counts 0..num_steps-1, checked to agree in every way of calling.

    jit + vmap over all counts; and at twelve sampled counts, the schedule not jitted
    on their int32 array and jitted on each as an int32 scalar. (The sample keeps one
    shape so that the op-by-op compilations of the unjitted call are mostly shared
    between cases; calls on Python ints are checked for every schedule below.)
    """
    counts = np.arange(num_steps, dtype=np.int32)
    vmapped = jax.jit(jax.vmap(schedule))(counts)
    chex.assert_shape(vmapped, (num_steps,))
    chex.assert_type(vmapped, jnp.float32)
    sample = np.linspace(0, num_steps - 1, 12).astype(np.int32)
    direct = schedule(jnp.asarray(sample))
    chex.assert_type(direct, jnp.float32)
    chex.assert_trees_all_close(direct, vmapped[sample], rtol=RTOL, atol=0.0)
    jitted = jax.jit(schedule)
    for count in sample:
        value = jitted(count)
        chex.assert_shape(value, ())
        chex.assert_trees_all_close(value, vmapped[count], rtol=RTOL, atol=0.0)
    return np.asarray(vmapped)


def _closed_form_at(scheduler, count):
    """torch's ``_get_closed_form_lr`` at ``count`` (what ``step(epoch)`` would set)."""
    scheduler.last_epoch = count
    return scheduler._get_closed_form_lr()[0]


L = lr_scheduler

# name -> (our schedule, torch scheduler factory or None, number of counts, torch lr)
TORCH_CASES = {
    "constant": (schedules.constant(BASE_LR), None, 10, BASE_LR),
    "step": (
        schedules.step_decay(BASE_LR, step_size=7, gamma=0.5),
        lambda opt: L.StepLR(opt, step_size=7, gamma=0.5),
        50,
        BASE_LR,
    ),
    "step_default_gamma": (
        schedules.step_decay(BASE_LR, step_size=3),
        lambda opt: L.StepLR(opt, step_size=3),
        40,
        BASE_LR,
    ),
    "step_every_count": (
        schedules.step_decay(0.5, step_size=1, gamma=0.98),
        lambda opt: L.StepLR(opt, step_size=1, gamma=0.98),
        600,
        0.5,
    ),
    "multistep": (
        schedules.multistep_decay(BASE_LR, milestones=[5, 12, 30], gamma=0.3),
        lambda opt: L.MultiStepLR(opt, milestones=[5, 12, 30], gamma=0.3),
        45,
        BASE_LR,
    ),
    "multistep_default_gamma": (
        schedules.multistep_decay(1.0, milestones=[1, 2, 10]),
        lambda opt: L.MultiStepLR(opt, milestones=[1, 2, 10]),
        15,
        1.0,
    ),
    "multistep_no_milestones": (
        schedules.multistep_decay(BASE_LR, milestones=[]),
        lambda opt: L.MultiStepLR(opt, milestones=[]),
        5,
        BASE_LR,
    ),
    "exponential": (
        schedules.exponential_decay(BASE_LR, gamma=0.95),
        lambda opt: L.ExponentialLR(opt, gamma=0.95),
        80,
        BASE_LR,
    ),
    # A long horizon: float32(gamma) ** c would be off by 1e-5 relative here.
    "exponential_long": (
        schedules.exponential_decay(1.0, gamma=0.9995),
        lambda opt: L.ExponentialLR(opt, gamma=0.9995),
        3000,
        1.0,
    ),
    "exponential_growing": (
        schedules.exponential_decay(1e-3, gamma=1.05),
        lambda opt: L.ExponentialLR(opt, gamma=1.05),
        120,
        1e-3,
    ),
    "cosine_long": (
        schedules.cosine_annealing(BASE_LR, t_max=500, eta_min=1e-4),
        lambda opt: L.CosineAnnealingLR(opt, T_max=500, eta_min=1e-4),
        1501,
        BASE_LR,
    ),
    "linear_default": (
        schedules.linear(BASE_LR),
        lambda opt: L.LinearLR(opt),
        12,
        BASE_LR,
    ),
    "linear_decreasing": (
        schedules.linear(BASE_LR, start_factor=1.0, end_factor=0.1, total_iters=20),
        lambda opt: L.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=20),
        30,
        BASE_LR,
    ),
    "linear_to_zero": (
        schedules.linear(BASE_LR, start_factor=1.0, end_factor=0.0, total_iters=200),
        lambda opt: L.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=200),
        210,
        BASE_LR,
    ),
    "one_cycle_cos": (
        schedules.one_cycle(BASE_LR, total_steps=100),
        lambda opt: L.OneCycleLR(opt, max_lr=BASE_LR, total_steps=100),
        100,
        BASE_LR,
    ),
    "one_cycle_cos_long": (
        schedules.one_cycle(2.0, total_steps=2000, pct_start=0.25),
        lambda opt: L.OneCycleLR(opt, max_lr=2.0, total_steps=2000, pct_start=0.25),
        2000,
        BASE_LR,
    ),
    # 0.29 * 100 = 28.999999999999996 in float64: the peak phase ends just below 28.
    "one_cycle_cos_phase_end_below_integer": (
        schedules.one_cycle(BASE_LR, total_steps=100, pct_start=0.29),
        lambda opt: L.OneCycleLR(opt, max_lr=BASE_LR, total_steps=100, pct_start=0.29),
        100,
        BASE_LR,
    ),
    # 0.3 * 37 - 1 = 10.1: phase ends between counts.
    "one_cycle_linear_fractional_phase_end": (
        schedules.one_cycle(0.5, total_steps=37, anneal_strategy="linear"),
        lambda opt: L.OneCycleLR(opt, max_lr=0.5, total_steps=37, anneal_strategy="linear"),
        37,
        BASE_LR,
    ),
    "one_cycle_linear_three_phase": (
        schedules.one_cycle(
            0.5,
            total_steps=77,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=True,
        ),
        lambda opt: L.OneCycleLR(
            opt,
            max_lr=0.5,
            total_steps=77,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=True,
        ),
        77,
        BASE_LR,
    ),
    "one_cycle_cos_three_phase": (
        schedules.one_cycle(1.0, total_steps=53, pct_start=0.35, three_phase=True),
        lambda opt: L.OneCycleLR(opt, max_lr=1.0, total_steps=53, pct_start=0.35, three_phase=True),
        53,
        BASE_LR,
    ),
    "warm_restarts": (
        schedules.cosine_warm_restarts(BASE_LR, t_0=10, eta_min=1e-3),
        lambda opt: L.CosineAnnealingWarmRestarts(opt, T_0=10, eta_min=1e-3),
        125,
        BASE_LR,
    ),
    "warm_restarts_doubling": (
        schedules.cosine_warm_restarts(BASE_LR, t_0=3, t_mult=2),
        lambda opt: L.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2),
        400,
        BASE_LR,
    ),
    "warm_restarts_tripling": (
        schedules.cosine_warm_restarts(BASE_LR, t_0=2, t_mult=3, eta_min=0.01),
        lambda opt: L.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=3, eta_min=0.01),
        250,
        BASE_LR,
    ),
    # Restarts at 1, 11, 111, 1111: where a float logarithm would misplace a cycle.
    "warm_restarts_tenfold": (
        schedules.cosine_warm_restarts(BASE_LR, t_0=1, t_mult=10),
        lambda opt: L.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=10),
        1200,
        BASE_LR,
    ),
    "join_linear_then_exponential": (
        schedules.join(
            [
                schedules.linear(BASE_LR, start_factor=0.1, total_iters=5),
                schedules.exponential_decay(BASE_LR, gamma=0.9),
            ],
            [5],
        ),
        lambda opt: L.SequentialLR(
            opt,
            [L.LinearLR(opt, start_factor=0.1, total_iters=5), L.ExponentialLR(opt, gamma=0.9)],
            milestones=[5],
        ),
        40,
        BASE_LR,
    ),
    "join_linear_then_cosine": (
        schedules.join(
            [
                schedules.linear(BASE_LR, start_factor=0.25, total_iters=4),
                schedules.cosine_annealing(BASE_LR, t_max=12, eta_min=1e-3),
            ],
            [6],
        ),
        lambda opt: L.SequentialLR(
            opt,
            [
                L.LinearLR(opt, start_factor=0.25, total_iters=4),
                L.CosineAnnealingLR(opt, T_max=12, eta_min=1e-3),
            ],
            milestones=[6],
        ),
        6 + 3 * 24,
        BASE_LR,
    ),
    "join_constant_step_multistep": (
        schedules.join(
            [
                schedules.constant(BASE_LR),
                schedules.step_decay(BASE_LR, step_size=4, gamma=0.5),
                schedules.multistep_decay(BASE_LR, milestones=[3], gamma=0.1),
            ],
            [6, 20],
        ),
        lambda opt: L.SequentialLR(
            opt,
            [
                L.ConstantLR(opt, factor=1.0),
                L.StepLR(opt, step_size=4, gamma=0.5),
                L.MultiStepLR(opt, milestones=[3], gamma=0.1),
            ],
            milestones=[6, 20],
        ),
        35,
        BASE_LR,
    ),
    # Each scheduler restarts from the initial rate, not from where the last one ended.
    "join_step_then_linear_restart": (
        schedules.join(
            [
                schedules.step_decay(BASE_LR, step_size=2, gamma=0.5),
                schedules.linear(BASE_LR, start_factor=0.25, total_iters=4),
            ],
            [9],
        ),
        lambda opt: L.SequentialLR(
            opt,
            [
                L.StepLR(opt, step_size=2, gamma=0.5),
                L.LinearLR(opt, start_factor=0.25, total_iters=4),
            ],
            milestones=[9],
        ),
        20,
        BASE_LR,
    ),
    "join_step_then_warm_restarts": (
        schedules.join(
            [
                schedules.step_decay(BASE_LR, step_size=3, gamma=0.5),
                schedules.cosine_warm_restarts(BASE_LR, t_0=4, t_mult=2, eta_min=1e-3),
            ],
            [7],
        ),
        lambda opt: L.SequentialLR(
            opt,
            [
                L.StepLR(opt, step_size=3, gamma=0.5),
                L.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=1e-3),
            ],
            milestones=[7],
        ),
        7 + 60,
        BASE_LR,
    ),
    # torch quirk: constructing OneCycleLR sets the optimizer's initial lr to
    # max_lr / div_factor = 0.04, and every other scheduler in the SequentialLR
    # starts from that value instead of the optimizer's lr (0.1).
    "join_linear_then_one_cycle_quirk": (
        schedules.join(
            [
                schedules.linear(0.04, start_factor=0.5, total_iters=3),
                schedules.one_cycle(1.0, total_steps=10),
            ],
            [3],
        ),
        lambda opt: L.SequentialLR(
            opt,
            [L.LinearLR(opt, start_factor=0.5, total_iters=3), L.OneCycleLR(opt, 1.0, 10)],
            milestones=[3],
        ),
        13,
        BASE_LR,
    ),
    "join_one_cycle_then_exponential_quirk": (
        schedules.join(
            [schedules.one_cycle(1.0, total_steps=10), schedules.exponential_decay(0.04, 0.5)],
            [10],
        ),
        lambda opt: L.SequentialLR(
            opt,
            [L.OneCycleLR(opt, 1.0, 10), L.ExponentialLR(opt, gamma=0.5)],
            milestones=[10],
        ),
        16,
        BASE_LR,
    ),
    "warmup_then_cosine": (
        schedules.warmup(
            schedules.cosine_annealing(BASE_LR, t_max=30), warmup_steps=5, start_factor=0.2
        ),
        lambda opt: L.SequentialLR(
            opt,
            [L.LinearLR(opt, start_factor=0.2, total_iters=5), L.CosineAnnealingLR(opt, T_max=30)],
            milestones=[5],
        ),
        5 + 90,
        BASE_LR,
    ),
    "warmup_then_exponential": (
        schedules.warmup(schedules.exponential_decay(BASE_LR, gamma=0.9), 3, start_factor=0.5),
        lambda opt: L.SequentialLR(
            opt,
            [L.LinearLR(opt, start_factor=0.5, total_iters=3), L.ExponentialLR(opt, gamma=0.9)],
            milestones=[3],
        ),
        30,
        BASE_LR,
    ),
    "warmup_then_multistep": (
        schedules.warmup(schedules.multistep_decay(BASE_LR, [4, 8]), 10, start_factor=1 / 3),
        lambda opt: L.SequentialLR(
            opt,
            [L.LinearLR(opt, total_iters=10), L.MultiStepLR(opt, milestones=[4, 8])],
            milestones=[10],
        ),
        25,
        BASE_LR,
    ),
    "warmup_then_warm_restarts": (
        schedules.warmup(schedules.cosine_warm_restarts(BASE_LR, t_0=5, t_mult=2), 4, 0.1),
        lambda opt: L.SequentialLR(
            opt,
            [
                L.LinearLR(opt, start_factor=0.1, total_iters=4),
                L.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2),
            ],
            milestones=[4],
        ),
        4 + 75,
        BASE_LR,
    ),
    # Thanks to the OneCycleLR quirk above, torch's LinearLR warms up to the one-cycle
    # schedule's first value, exactly as warmup does.
    "warmup_then_one_cycle": (
        schedules.warmup(schedules.one_cycle(1.0, total_steps=20), 4, start_factor=0.25),
        lambda opt: L.SequentialLR(
            opt,
            [L.LinearLR(opt, start_factor=0.25, total_iters=4), L.OneCycleLR(opt, 1.0, 20)],
            milestones=[4],
        ),
        24,
        BASE_LR,
    ),
}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_matches_torch_scheduler(name):
    schedule, make_scheduler, num_steps, base_lr = TORCH_CASES[name]
    expected = _torch_rates(make_scheduler, num_steps, base_lr)
    np.testing.assert_allclose(_our_rates(schedule, num_steps), expected, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("t_max, eta_min", [(1, 0.0), (10, 0.0), (7, 0.01), (64, 0.002)])
def test_cosine_annealing_against_torch_step_and_closed_form_beyond_t_max(t_max, eta_min):
    num_steps = 3 * 2 * t_max + 1
    ours = _our_rates(schedules.cosine_annealing(BASE_LR, t_max, eta_min=eta_min), num_steps)
    # step(): torch's recursive form. It agrees with the closed form up to float64
    # rounding, within t_max and after it alike.
    recursive = _torch_rates(lambda opt: L.CosineAnnealingLR(opt, t_max, eta_min), num_steps)
    np.testing.assert_allclose(ours[: t_max + 1], recursive[: t_max + 1], rtol=RTOL, atol=0.0)
    np.testing.assert_allclose(ours, recursive, rtol=RTOL, atol=0.0)
    # After t_max, explicitly against torch's _get_closed_form_lr: the cosine continues,
    # back up to the initial value at 2 t_max, down to eta_min at 3 t_max, ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
        scheduler = L.CosineAnnealingLR(optimizer, t_max, eta_min)
        closed = np.asarray([_closed_form_at(scheduler, c) for c in range(num_steps)])
    np.testing.assert_allclose(ours[t_max:], closed[t_max:], rtol=RTOL, atol=0.0)
    for cycle in range(3):
        assert float(ours[2 * cycle * t_max]) == pytest.approx(BASE_LR, rel=RTOL)
        assert float(ours[(2 * cycle + 1) * t_max]) == pytest.approx(eta_min, rel=RTOL)
    assert np.all(np.diff(ours[t_max : 2 * t_max + 1]) > 0)


@pytest.mark.parametrize("anneal_strategy", ["cos", "linear"])
def test_one_cycle_holds_its_final_value_where_torch_extrapolates_or_raises(anneal_strategy):
    total_steps, max_value = 40, 0.5
    schedule = schedules.one_cycle(max_value, total_steps, anneal_strategy=anneal_strategy)
    final = max_value / 25.0 / 1e4
    counts = jnp.asarray([total_steps - 1, total_steps, total_steps + 1, 10**6, INT32_MAX])
    np.testing.assert_allclose(schedule(counts), np.full(5, final), rtol=RTOL, atol=0.0)

    rates = _torch_rates(
        lambda opt: L.OneCycleLR(opt, max_value, total_steps, anneal_strategy=anneal_strategy),
        total_steps + 1,
    )
    assert rates[-2] == pytest.approx(final, rel=1e-12)
    # torch at count total_steps extrapolates the last phase one step past z: the
    # cosine climbs back to its value of two counts before, the line goes on down,
    # here below zero ...
    if anneal_strategy == "cos":
        assert rates[-1] == pytest.approx(rates[-3], rel=1e-9) and rates[-1] > final
    else:
        assert rates[-1] < 0.0
    # ... and one step later raises.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
        scheduler = L.OneCycleLR(optimizer, max_value, total_steps)
        for _ in range(total_steps):
            scheduler.step()
        with pytest.raises(ValueError, match="Tried to step"):
            scheduler.step()


def _warm_restarts_reference(count, init_value, t_0, t_mult, eta_min):
    """Float64 reference: cycle found by integer accumulation, as torch's step() does."""
    if t_mult == 1:
        start, length = count - count % t_0, t_0
    else:
        start, length = 0, t_0
        while count >= start + length:
            start, length = start + length, length * t_mult
    return eta_min + (init_value - eta_min) * (1 + math.cos(math.pi * (count - start) / length)) / 2


@pytest.mark.parametrize("t_0, t_mult", [(1, 2), (3, 2), (1, 3), (7, 5), (1, 10), (5, 1)])
def test_warm_restarts_restart_on_exact_counts_up_to_int32(t_0, t_mult):
    schedule = jax.jit(schedules.cosine_warm_restarts(1.0, t_0=t_0, t_mult=t_mult, eta_min=0.01))
    starts, length = [0], t_0
    while starts[-1] + length <= INT32_MAX and len(starts) < 60:
        starts.append(starts[-1] + length)
        length *= t_mult
    near_restarts = {c for s in starts for c in (s - 1, s, s + 1) if 0 <= c <= INT32_MAX}
    rng = np.random.default_rng(t_0 * 100 + t_mult)
    counts = sorted(near_restarts | set(rng.integers(0, INT32_MAX, 200).tolist()) | {INT32_MAX})
    ours = np.asarray(schedule(jnp.asarray(counts, jnp.int32)))
    expected = [_warm_restarts_reference(c, 1.0, t_0, t_mult, 0.01) for c in counts]
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=0.0)
    restarted = np.asarray(schedule(jnp.asarray(starts, jnp.int32)))
    chex.assert_trees_all_equal(restarted, np.ones(len(starts), np.float32))


def test_torch_warm_restarts_epoch_argument_misplaces_a_restart():
    # The documented torch quirk: step(epoch) finds the cycle with a float logarithm,
    # log10(111 * 9 + 1) = 2.9999999999999996 -> cycle 2, so epoch 111 reads as the end
    # of the 100-step cycle (eta_min) although a new cycle starts there (step() and
    # sgdjax both give the initial value).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
        scheduler = L.CosineAnnealingWarmRestarts(optimizer, T_0=1, T_mult=10, eta_min=0.01)
        scheduler.step(111)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    schedule = schedules.cosine_warm_restarts(BASE_LR, t_0=1, t_mult=10, eta_min=0.01)
    assert float(schedule(111)) == pytest.approx(BASE_LR, rel=RTOL)


def test_golden_values():
    def close(schedule, count, expected):
        value = schedule(count)
        assert float(value) == pytest.approx(expected, rel=RTOL), (count, float(value))

    # StepLR: 0.1 * 0.5 ** (15 // 7) = 0.1 * 0.25 = 0.025
    close(schedules.step_decay(0.1, 7, 0.5), 15, 0.025)
    # MultiStepLR, milestones [3, 5]: count 4 passed one milestone: 2.0 * 0.1 = 0.2
    close(schedules.multistep_decay(2.0, [3, 5]), 4, 0.2)
    # ExponentialLR: 0.8 * 0.5 ** 4 = 0.8 / 16 = 0.05
    close(schedules.exponential_decay(0.8, 0.5), 4, 0.05)
    # Cosine: 0.1 * (1 + cos(pi * 5 / 20)) / 2 = 0.05 * (1 + 0.70710678) = 0.08535534
    close(schedules.cosine_annealing(0.1, 20), 5, 0.0853553390593)
    # Cosine, eta_min 0.02, past t_max: count 30 of t_max 20 is cos(1.5 pi) = 0:
    # 0.02 + (0.1 - 0.02) * (1 + 0) / 2 = 0.06
    close(schedules.cosine_annealing(0.1, 20, eta_min=0.02), 30, 0.06)
    # LinearLR defaults: factor 1/3 + (1 - 1/3) * 2 / 5 = 1/3 + 4/15 = 9/15 = 0.6,
    # times 0.5 = 0.3
    close(schedules.linear(0.5), 2, 0.3)
    # Warm restarts, t_0 = 3, t_mult = 2: cycles start at 0, 3, 9, 21; count 12 is 3
    # steps into the 12-step cycle: (1 + cos(pi / 4)) / 2 = 0.85355339
    close(schedules.cosine_warm_restarts(1.0, t_0=3, t_mult=2), 12, 0.8535533905933)
    # OneCycle, 100 steps: a = 2 / 25 = 0.08; the warm-up ends at the peak at
    # 0.3 * 100 - 1 = 29; count 15 is 0.08 + (2 - 0.08) * (1 - cos(pi * 15 / 29)) / 2
    # = 0.08 + 1.92 * (1 + 0.05413891) / 2 = 0.08 + 1.0119734 = 1.0919734
    close(schedules.one_cycle(2.0, 100), 29, 2.0)
    close(schedules.one_cycle(2.0, 100), 15, 1.0919734)
    # OneCycle linear, 10 steps, pct 0.5: a = 0.04, the peak at 0.5 * 10 - 1 = 4; count 6
    # is 2 of 5 steps down towards z = 4e-6: 1 + (4e-6 - 1) * 2 / 5 = 0.6000016
    close(schedules.one_cycle(1.0, 10, pct_start=0.5, anneal_strategy="linear"), 6, 0.6000016)
    # warmup from 0 over 4 steps to a constant 0.2: count 1 is 0.2 * 1 / 4 = 0.05
    close(schedules.warmup(schedules.constant(0.2), 4), 1, 0.05)


def test_precision_where_naive_float32_formulas_lose_it():
    jit = jax.jit
    counts = jnp.asarray([0, 1, 999, 10_000, 49_999, 100_000], jnp.int32)
    # gamma ** c over a long run (float32(gamma) ** c is off by 8e-4 at c = 50_000).
    np.testing.assert_allclose(
        jit(schedules.exponential_decay(1.0, gamma=0.9999))(counts),
        [0.9999 ** int(c) for c in counts],
        rtol=RTOL,
        atol=0.0,
    )
    np.testing.assert_allclose(
        jit(schedules.step_decay(1.0, step_size=10, gamma=0.999))(counts),
        [0.999 ** (int(c) // 10) for c in counts],
        rtol=RTOL,
        atol=0.0,
    )
    # A cosine near its zero (1 + cos(x) cancels in float32 when x is close to pi).
    t_max = 100_000
    near_end = jnp.asarray([t_max - 1000, t_max - 10, t_max - 1, t_max + 1], jnp.int32)
    expected = [(1 + math.cos(math.pi * int(c) / t_max)) / 2 for c in near_end]
    np.testing.assert_allclose(
        jit(schedules.cosine_annealing(1.0, t_max=t_max))(near_end), expected, rtol=RTOL, atol=0.0
    )
    # A linear ramp down to zero.
    ramp = jit(schedules.linear(1.0, start_factor=1.0, end_factor=0.0, total_iters=t_max))
    np.testing.assert_allclose(
        ramp(near_end[:3]), [(t_max - int(c)) / t_max for c in near_end[:3]], rtol=RTOL, atol=0
    )


@pytest.mark.parametrize(
    "ours, theirs, num_counts",
    [
        (schedules.constant(0.1), optax.constant_schedule(0.1), 10),
        (
            schedules.cosine_annealing(0.1, t_max=40, eta_min=0.001),
            optax.cosine_decay_schedule(0.1, decay_steps=40, alpha=0.01),
            41,  # optax holds eta_min after decay_steps; torch's cosine goes back up.
        ),
        (
            schedules.step_decay(0.1, step_size=5, gamma=0.5),
            optax.exponential_decay(0.1, transition_steps=5, decay_rate=0.5, staircase=True),
            60,
        ),
        (
            schedules.multistep_decay(0.1, milestones=[4, 9], gamma=0.1),
            optax.piecewise_constant_schedule(0.1, {4: 0.1, 9: 0.1}),
            20,
        ),
        (
            schedules.exponential_decay(0.1, gamma=0.9),
            optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.9),
            60,
        ),
        (
            schedules.linear(0.1, start_factor=0.25, end_factor=0.75, total_iters=8),
            optax.linear_schedule(0.025, 0.075, transition_steps=8),
            20,
        ),
        (
            schedules.join(
                [schedules.linear(0.1, 0.5, 1.0, 4), schedules.exponential_decay(0.1, 0.8)], [4]
            ),
            optax.join_schedules(
                [optax.linear_schedule(0.05, 0.1, 4), optax.exponential_decay(0.1, 1, 0.8)], [4]
            ),
            30,
        ),
        (
            schedules.warmup(
                schedules.cosine_annealing(1.0, t_max=90, eta_min=0.01), 10, start_factor=0.1
            ),
            optax.warmup_cosine_decay_schedule(0.1, 1.0, 10, decay_steps=100, end_value=0.01),
            101,
        ),
    ],
)
def test_matches_optax_where_the_rules_agree(ours, theirs, num_counts):
    counts = jnp.arange(num_counts)
    # optax evaluates its formulas directly in float32 (e.g. decay_rate ** (c / k)),
    # so allow a few float32 roundings on its side.
    chex.assert_trees_all_close(
        jax.jit(jax.vmap(ours))(counts),
        jax.jit(jax.vmap(theirs))(counts).astype(jnp.float32),
        rtol=5e-6,
        atol=0.0,
    )


EXAMPLES = {
    "constant": schedules.constant(0.1),
    "step_decay": schedules.step_decay(0.1, 3),
    "multistep_decay": schedules.multistep_decay(0.1, [2, 5]),
    "exponential_decay": schedules.exponential_decay(0.1, 0.9),
    "cosine_annealing": schedules.cosine_annealing(0.1, 10),
    "linear": schedules.linear(0.1),
    "one_cycle": schedules.one_cycle(0.1, 20),
    "cosine_warm_restarts": schedules.cosine_warm_restarts(0.1, 3, t_mult=2),
    "join": schedules.join([schedules.constant(0.1), schedules.step_decay(0.1, 2)], [3]),
    "warmup": schedules.warmup(schedules.cosine_annealing(0.1, 10), 4),
    "constant_factor": schedules.constant_factor(0.1),
    "polynomial": schedules.polynomial(0.1, power=2.0),
    "cyclic": schedules.cyclic(0.01, 0.1, step_size_up=3, mode="exp_range", gamma=0.99),
    "cyclic_momentum": schedules.cyclic_momentum(3, 2, mode="triangular2"),
    "one_cycle_momentum": schedules.one_cycle_momentum(20),
    "lambda_factor": schedules.lambda_factor(0.1, lambda c: 1.0 / (1.0 + c)),
    "multiplicative": schedules.multiplicative(0.1, lambda k: 0.95, 10),
    "chained": schedules.chained(
        0.1, [schedules.constant_factor(0.1), schedules.exponential_decay(0.1, 0.9)]
    ),
    "swa_lr": schedules.swa_lr(0.1, 0.01, anneal_steps=5),
}

# Public names of sgdjax.schedules that are not schedules (functions of the count).
NOT_SCHEDULES = {"Schedule", "ReduceOnPlateau", "ReduceOnPlateauState", "reduce_on_plateau"}


def test_every_schedule_is_in_the_examples():
    assert sorted(EXAMPLES) == sorted(
        name for name in schedules.__all__ if name not in NOT_SCHEDULES
    )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_counts_of_every_form_give_float32_of_the_count_shape(name):
    schedule = EXAMPLES[name]
    counts = np.asarray([[0, 1, 2], [7, 40, INT32_MAX]], np.int32)
    grid = schedule(jnp.asarray(counts))
    chex.assert_shape(grid, (2, 3))
    chex.assert_type(grid, jnp.float32)
    chex.assert_tree_all_finite(grid)
    chex.assert_trees_all_close(jax.jit(schedule)(counts), grid, rtol=RTOL, atol=0.0)
    for row, column in [(0, 0), (1, 0), (1, 2)]:
        count = counts[row, column]
        for value in (schedule(int(count)), schedule(np.int32(count)), schedule(jnp.int32(count))):
            chex.assert_shape(value, ())
            chex.assert_type(value, jnp.float32)
            chex.assert_trees_all_close(value, grid[row, column], rtol=RTOL, atol=0.0)


def test_schedule_drives_an_optax_learning_rate():
    schedule = schedules.warmup(schedules.step_decay(0.5, step_size=2, gamma=0.5), 2, 0.5)
    optimizer = optax.sgd(schedule)
    params = jnp.zeros(3)
    state = optimizer.init(params)
    step = jax.jit(optimizer.update)
    for count in range(6):
        updates, state = step(jnp.ones(3), state, params)
        chex.assert_trees_all_close(updates, -schedule(count) * jnp.ones(3), rtol=RTOL)


def test_schedule_type_alias_is_exported():
    assert "Schedule" in schedules.__all__
    schedule: schedules.Schedule = schedules.constant(0.1)
    assert callable(schedule)


CONSTANT = schedules.constant(0.1)

BAD_ARGUMENTS = [
    (lambda: schedules.constant(-1.0), "value", "-1.0"),
    (lambda: schedules.constant(math.nan), "value", "nan"),
    (lambda: schedules.constant("0.1"), "value", "'0.1'"),
    (lambda: schedules.step_decay(0.1, step_size=0), "step_size", "0"),
    (lambda: schedules.step_decay(0.1, step_size=2.5), "step_size", "2.5"),
    (lambda: schedules.step_decay(0.1, step_size=2, gamma=0.0), "gamma", "0.0"),
    (lambda: schedules.step_decay(0.1, step_size=2, gamma=math.inf), "gamma", "inf"),
    (lambda: schedules.step_decay(-0.1, step_size=2), "init_value", "-0.1"),
    (lambda: schedules.multistep_decay(0.1, milestones=[5, 3]), "milestones", "[5, 3]"),
    (lambda: schedules.multistep_decay(0.1, milestones=[3, 3]), "milestones", "[3, 3]"),
    (lambda: schedules.multistep_decay(0.1, milestones=[0, 3]), "milestones", "[0, 3]"),
    (lambda: schedules.multistep_decay(0.1, milestones=[2, 4.5]), "milestones", "[2, 4.5]"),
    (lambda: schedules.multistep_decay(0.1, milestones=[2], gamma=-1.0), "gamma", "-1.0"),
    (lambda: schedules.multistep_decay(math.inf, milestones=[2]), "init_value", "inf"),
    (lambda: schedules.exponential_decay(0.1, gamma=-0.5), "gamma", "-0.5"),
    (lambda: schedules.exponential_decay(0.1, gamma=0.0), "gamma", "0.0"),
    (lambda: schedules.exponential_decay(-2.0, gamma=0.5), "init_value", "-2.0"),
    (lambda: schedules.cosine_annealing(0.1, t_max=0), "t_max", "0"),
    (lambda: schedules.cosine_annealing(0.1, t_max=-3), "t_max", "-3"),
    (lambda: schedules.cosine_annealing(math.nan, t_max=10), "init_value", "nan"),
    (lambda: schedules.cosine_annealing(0.1, t_max=10, eta_min=-1.0), "eta_min", "-1.0"),
    (lambda: schedules.linear(0.1, start_factor=0.0), "start_factor", "0.0"),
    (lambda: schedules.linear(0.1, start_factor=1.5), "start_factor", "1.5"),
    (lambda: schedules.linear(0.1, end_factor=1.5), "end_factor", "1.5"),
    (lambda: schedules.linear(0.1, end_factor=-0.1), "end_factor", "-0.1"),
    (lambda: schedules.linear(0.1, total_iters=0), "total_iters", "0"),
    (lambda: schedules.linear(-0.1), "init_value", "-0.1"),
    (lambda: schedules.one_cycle(0.1, total_steps=0), "total_steps", "0"),
    (lambda: schedules.one_cycle(-0.1, total_steps=10), "max_value", "-0.1"),
    (lambda: schedules.one_cycle(math.inf, total_steps=10), "max_value", "inf"),
    (lambda: schedules.one_cycle(0.1, total_steps=100, pct_start=1.0), "pct_start", "1.0"),
    (lambda: schedules.one_cycle(0.1, total_steps=100, pct_start=0.0), "pct_start", "0.0"),
    (lambda: schedules.one_cycle(0.1, 100, anneal_strategy="exp"), "anneal_strategy", "'exp'"),
    (lambda: schedules.one_cycle(0.1, total_steps=100, div_factor=0.0), "div_factor", "0.0"),
    (lambda: schedules.one_cycle(0.1, 100, final_div_factor=-1.0), "final_div_factor", "-1.0"),
    # 0.3 * 3 - 1 < 0: the warm-up phase would be empty.
    (lambda: schedules.one_cycle(0.1, total_steps=3), "total_steps", "3"),
    # 2 * 0.6 * 100 - 2 = 118 >= 99: the final phase would be empty.
    (lambda: schedules.one_cycle(0.1, 100, pct_start=0.6, three_phase=True), "pct_start", "0.6"),
    (lambda: schedules.cosine_warm_restarts(0.1, t_0=0), "t_0", "0"),
    (lambda: schedules.cosine_warm_restarts(0.1, t_0=5, t_mult=0), "t_mult", "0"),
    (lambda: schedules.cosine_warm_restarts(0.1, t_0=5, t_mult=1.5), "t_mult", "1.5"),
    (lambda: schedules.cosine_warm_restarts(0.1, t_0=5, eta_min=-0.1), "eta_min", "-0.1"),
    (lambda: schedules.cosine_warm_restarts(-0.1, t_0=5), "init_value", "-0.1"),
    (lambda: schedules.join([], []), "schedules", "[]"),
    (lambda: schedules.join([CONSTANT], [3]), "boundaries", "[3]"),
    (lambda: schedules.join([CONSTANT] * 3, [5]), "boundaries", "[5]"),
    (lambda: schedules.join([CONSTANT] * 3, [5, 2]), "boundaries", "[5, 2]"),
    (lambda: schedules.join([CONSTANT] * 3, [5, 5]), "boundaries", "[5, 5]"),
    (lambda: schedules.join([CONSTANT] * 2, [0]), "boundaries", "[0]"),
    (lambda: schedules.join([CONSTANT, 0.1], [3]), "schedules[1]", "0.1"),
    (lambda: schedules.warmup(CONSTANT, warmup_steps=0), "warmup_steps", "0"),
    (lambda: schedules.warmup(CONSTANT, 5, start_factor=2.0), "start_factor", "2.0"),
    (lambda: schedules.warmup(CONSTANT, 5, start_factor=-0.5), "start_factor", "-0.5"),
    (lambda: schedules.warmup(0.1, 5), "schedule", "0.1"),
]


@pytest.mark.parametrize(
    "make, argument, value", BAD_ARGUMENTS, ids=[f"{a}={v}" for _, a, v in BAD_ARGUMENTS]
)
def test_bad_arguments_raise_a_value_error_naming_argument_and_value(make, argument, value):
    with pytest.raises(ValueError) as raised:
        make()
    message = str(raised.value)
    assert argument in message and value in message, message
