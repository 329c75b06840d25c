"""``sgdjax.schedules`` against ``torch.optim.lr_scheduler``, optax and hand-computed values."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch.optim import lr_scheduler

from sgdjax import schedules

BASE_LR = 0.1


def _torch_rates(make_scheduler, num_steps, base_lr=BASE_LR):
    """The lr after 0, 1, ..., num_steps - 1 calls of ``scheduler.step()``."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(num_steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return np.asarray(rates)


def _our_rates(schedule, num_steps):
    """The schedule at counts 0..num_steps-1: eagerly, jitted scalar and jitted vmap."""
    counts = np.arange(num_steps)
    eager = np.asarray([float(schedule(int(c))) for c in counts])
    jitted_scalar = jax.jit(schedule)
    jitted = np.asarray([float(jitted_scalar(jnp.int32(c))) for c in counts])
    vmapped = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(counts, jnp.int32)))
    # float32 precision relative to the schedule's scale (XLA may fuse differently).
    scale = max(np.max(np.abs(jitted)), 1e-12)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=2e-7 * scale)
    np.testing.assert_allclose(vmapped, jitted, rtol=1e-6, atol=2e-7 * scale)
    assert jitted_scalar(jnp.int32(0)).dtype == jnp.float32
    return jitted


CASES = {
    "step": (
        lambda: schedules.step_decay(BASE_LR, step_size=7, gamma=0.5),
        lambda opt: lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
        50,
    ),
    "step_default_gamma": (
        lambda: schedules.step_decay(BASE_LR, step_size=3),
        lambda opt: lr_scheduler.StepLR(opt, step_size=3),
        20,
    ),
    "multistep": (
        lambda: schedules.multistep_decay(BASE_LR, milestones=[5, 12, 30], gamma=0.3),
        lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[5, 12, 30], gamma=0.3),
        45,
    ),
    "exponential": (
        lambda: schedules.exponential_decay(BASE_LR, gamma=0.95),
        lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.95),
        80,
    ),
    "linear_default": (
        lambda: schedules.linear(BASE_LR),
        lambda opt: lr_scheduler.LinearLR(opt),
        12,
    ),
    "linear_decreasing": (
        lambda: schedules.linear(BASE_LR, start_factor=1.0, end_factor=0.1, total_iters=20),
        lambda opt: lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=20),
        30,
    ),
    "onecycle_cos": (
        lambda: schedules.one_cycle(BASE_LR, total_steps=100),
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=BASE_LR, total_steps=100),
        100,
    ),
    "onecycle_linear_three_phase": (
        lambda: schedules.one_cycle(
            0.5,
            total_steps=77,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=True,
        ),
        lambda opt: lr_scheduler.OneCycleLR(
            opt,
            max_lr=0.5,
            total_steps=77,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=True,
            cycle_momentum=False,
        ),
        77,
    ),
    "warm_restarts": (
        lambda: schedules.cosine_warm_restarts(BASE_LR, t_0=10, eta_min=1e-3),
        lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, eta_min=1e-3),
        105,
    ),
    "warm_restarts_doubling": (
        lambda: schedules.cosine_warm_restarts(BASE_LR, t_0=3, t_mult=2),
        lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2),
        200,
    ),
    "warm_restarts_tripling": (
        lambda: schedules.cosine_warm_restarts(BASE_LR, t_0=2, t_mult=3, eta_min=0.01),
        lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=3, eta_min=0.01),
        250,
    ),
    "join_linear_then_exponential": (
        lambda: schedules.join(
            [
                schedules.linear(BASE_LR, start_factor=0.1, total_iters=5),
                schedules.exponential_decay(BASE_LR, gamma=0.9),
            ],
            [5],
        ),
        lambda opt: lr_scheduler.SequentialLR(
            opt,
            [
                lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
                lr_scheduler.ExponentialLR(opt, gamma=0.9),
            ],
            milestones=[5],
        ),
        40,
    ),
    "join_three_step_schedules": (
        lambda: schedules.join(
            [
                schedules.constant(BASE_LR),
                schedules.step_decay(BASE_LR, step_size=4, gamma=0.5),
                schedules.multistep_decay(BASE_LR, milestones=[3], gamma=0.1),
            ],
            [6, 20],
        ),
        lambda opt: lr_scheduler.SequentialLR(
            opt,
            [
                lr_scheduler.ConstantLR(opt, factor=1.0),
                lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
                lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.1),
            ],
            milestones=[6, 20],
        ),
        35,
    ),
    "warmup_then_cosine": (
        lambda: schedules.warmup(
            schedules.cosine_annealing(BASE_LR, t_max=30), warmup_steps=5, start_factor=0.2
        ),
        lambda opt: lr_scheduler.SequentialLR(
            opt,
            [
                lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=5),
                lr_scheduler.CosineAnnealingLR(opt, T_max=30),
            ],
            milestones=[5],
        ),
        35,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_scheduler(name):
    make_schedule, make_scheduler, num_steps = CASES[name]
    expected = _torch_rates(make_scheduler, num_steps)
    ours = _our_rates(make_schedule(), num_steps)
    np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=2e-7 * np.max(expected))


@pytest.mark.parametrize("t_max, eta_min", [(10, 0.0), (7, 0.01)])
def test_cosine_annealing_matches_torch_over_several_cycles(t_max, eta_min):
    num_steps = 3 * 2 * t_max
    ours = _our_rates(schedules.cosine_annealing(BASE_LR, t_max=t_max, eta_min=eta_min), num_steps)
    # torch's step() uses a recursive form; it agrees with the closed form up to
    # rounding, and exactly (by construction) with its own closed form.
    recursive = _torch_rates(
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min), num_steps
    )
    np.testing.assert_allclose(ours, recursive, rtol=1e-5, atol=1e-8)
    closed = [
        eta_min + (BASE_LR - eta_min) * (1 + math.cos(math.pi * c / t_max)) / 2
        for c in range(num_steps)
    ]
    np.testing.assert_allclose(ours, closed, rtol=2e-6, atol=1e-9)


def test_one_cycle_holds_its_final_value_after_the_cycle():
    schedule = schedules.one_cycle(1.0, total_steps=50)
    final = float(schedule(49))
    np.testing.assert_allclose(final, 1.0 / 25.0 / 1e4, rtol=1e-5)
    assert float(schedule(50)) == final and float(schedule(10_000)) == final


def test_golden_values():
    # StepLR: 0.1 * 0.5 ** floor(15 / 7) = 0.1 * 0.25 = 0.025
    assert math.isclose(float(schedules.step_decay(0.1, 7, 0.5)(15)), 0.025, rel_tol=1e-6)
    # Cosine: 0.1 * (1 + cos(pi * 5 / 20)) / 2 = 0.05 * (1 + 0.70710678) = 0.0853553
    assert math.isclose(float(schedules.cosine_annealing(0.1, 20)(5)), 0.0853553, rel_tol=1e-6)
    # Warm restarts, t_0 = 3, t_mult = 2: cycles start at 0, 3, 9, 21; count 12 is 3
    # steps into a 12-step cycle: 0.5 * (1 + cos(pi / 4)) = 0.8535534
    value = float(schedules.cosine_warm_restarts(1.0, t_0=3, t_mult=2)(12))
    assert math.isclose(value, 0.8535534, rel_tol=1e-6)
    # OneCycle, 100 steps: warm-up ends at 0.3 * 100 - 1 = 29; count 29 is the peak.
    assert float(schedules.one_cycle(2.0, 100)(29)) == 2.0


def test_warm_restarts_restart_on_exact_steps_far_out():
    schedule = schedules.cosine_warm_restarts(1.0, t_0=1, t_mult=2)
    # cycle starts: 2^i - 1
    for i in range(2, 30):
        start = 2**i - 1
        assert float(schedule(jnp.int32(start))) == 1.0
        assert float(schedule(jnp.int32(start - 1))) < 1.0


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            schedules.cosine_annealing(0.1, t_max=40, eta_min=0.0),
            optax.cosine_decay_schedule(0.1, decay_steps=40),
        ),
        (
            schedules.step_decay(0.1, step_size=5, gamma=0.5),
            optax.exponential_decay(0.1, transition_steps=5, decay_rate=0.5, staircase=True),
        ),
        (
            schedules.multistep_decay(0.1, milestones=[4, 9], gamma=0.1),
            optax.piecewise_constant_schedule(0.1, {4: 0.1, 9: 0.1}),
        ),
        (
            schedules.exponential_decay(0.1, gamma=0.9),
            optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.9),
        ),
    ],
)
def test_matches_optax_where_the_rules_agree(ours, theirs):
    counts = jnp.arange(40)
    np.testing.assert_allclose(
        jax.vmap(ours)(counts), jax.vmap(theirs)(counts), rtol=2e-6, atol=2e-8
    )


BAD_ARGUMENTS = [
    (lambda: schedules.constant(-1.0), "value"),
    (lambda: schedules.constant(float("nan")), "value"),
    (lambda: schedules.step_decay(0.1, step_size=0), "step_size"),
    (lambda: schedules.step_decay(0.1, step_size=2, gamma=0.0), "gamma"),
    (lambda: schedules.step_decay(-0.1, step_size=2), "init_value"),
    (lambda: schedules.multistep_decay(0.1, milestones=[5, 3]), "milestones"),
    (lambda: schedules.multistep_decay(0.1, milestones=[3, 3]), "milestones"),
    (lambda: schedules.multistep_decay(0.1, milestones=[0, 3]), "milestones"),
    (lambda: schedules.exponential_decay(0.1, gamma=-0.5), "gamma"),
    (lambda: schedules.cosine_annealing(0.1, t_max=0), "t_max"),
    (lambda: schedules.cosine_annealing(0.1, t_max=10, eta_min=-1.0), "eta_min"),
    (lambda: schedules.linear(0.1, start_factor=0.0), "start_factor"),
    (lambda: schedules.linear(0.1, end_factor=1.5), "end_factor"),
    (lambda: schedules.linear(0.1, total_iters=0), "total_iters"),
    (lambda: schedules.one_cycle(0.1, total_steps=0), "total_steps"),
    (lambda: schedules.one_cycle(0.1, total_steps=100, pct_start=1.0), "pct_start"),
    (lambda: schedules.one_cycle(0.1, total_steps=100, pct_start=0.0), "pct_start"),
    (lambda: schedules.one_cycle(0.1, total_steps=100, anneal_strategy="exp"), "anneal_strategy"),
    (lambda: schedules.one_cycle(0.1, total_steps=100, div_factor=0.0), "div_factor"),
    (lambda: schedules.cosine_warm_restarts(0.1, t_0=0), "t_0"),
    (lambda: schedules.cosine_warm_restarts(0.1, t_0=5, t_mult=0), "t_mult"),
    (lambda: schedules.cosine_warm_restarts(0.1, t_0=5, t_mult=1.5), "t_mult"),
    (lambda: schedules.join([schedules.constant(0.1)], [3]), "boundaries"),
    (
        lambda: schedules.join([schedules.constant(0.1)] * 3, [5, 2]),
        "boundaries",
    ),
    (lambda: schedules.warmup(schedules.constant(0.1), warmup_steps=0), "warmup_steps"),
    (lambda: schedules.warmup(schedules.constant(0.1), 5, start_factor=2.0), "start_factor"),
]


@pytest.mark.parametrize("make, argument", BAD_ARGUMENTS)
def test_bad_arguments_raise_a_value_error_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()
