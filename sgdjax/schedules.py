"""Learning-rate schedules that match ``torch.optim.lr_scheduler`` step for step.

A schedule is a pure, jittable function of the integer step count that returns a
float32 value. The value at count ``c`` equals the learning rate of the torch
scheduler with the same arguments after ``c`` calls of ``scheduler.step()``; an sgdjax
optimizer evaluates its schedule at the number of updates taken so far, which is
torch's behaviour when the scheduler is stepped once per optimizer step.

==============================================  ==========================
``torch.optim.lr_scheduler``                    ``sgdjax.schedules``
==============================================  ==========================
(no scheduler)                                  :func:`constant`
``StepLR``                                      :func:`step_decay`
``MultiStepLR``                                 :func:`multistep_decay`
``ExponentialLR``                               :func:`exponential_decay`
``CosineAnnealingLR``                           :func:`cosine_annealing`
``LinearLR``                                    :func:`linear`
``OneCycleLR``                                  :func:`one_cycle`
``CosineAnnealingWarmRestarts``                 :func:`cosine_warm_restarts`
``SequentialLR``                                :func:`join`
``SequentialLR([LinearLR, s])``                 :func:`warmup`
==============================================  ==========================

Schedules work on a scalar count or, element-wise, on an array of counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sgdjax._base import check_in_range

Schedule = Callable[[ArrayLike], jax.Array]

__all__ = [
    "Schedule",
    "constant",
    "cosine_annealing",
    "cosine_warm_restarts",
    "exponential_decay",
    "join",
    "linear",
    "multistep_decay",
    "one_cycle",
    "step_decay",
    "warmup",
]


def _count(count: ArrayLike) -> jax.Array:
    return jnp.asarray(count, jnp.int32)


def _check_value(name: str, value: float) -> None:
    check_in_range(name, value, low=0.0)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _cosine(start: ArrayLike, end: ArrayLike, fraction: jax.Array) -> jax.Array:
    """``end + (start - end) * (1 + cos(pi * fraction)) / 2``: start at 0, end at 1."""
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))


def constant(value: float) -> Schedule:
    """A constant learning rate.

    Rule::

        eta(c) = value

    Args:
      value: a finite number ``>= 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> round(float(schedules.constant(0.1)(7)), 6)
      0.1

    References:
      ``torch.optim.SGD`` with no scheduler.
    """
    _check_value("value", value)

    def schedule(count):
        return jnp.full(jnp.shape(count), value, jnp.float32)

    return schedule


def step_decay(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiplies the rate by ``gamma`` every ``step_size`` steps.

    Rule::

        eta(c) = init_value * gamma ** floor(c / step_size)

    Args:
      init_value: the rate at count 0, ``>= 0``.
      step_size: steps between decays, a positive integer.
      gamma: the factor, ``> 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> round(float(schedules.step_decay(1.0, step_size=10, gamma=0.5)(25)), 6)
      0.25

    References:
      ``torch.optim.lr_scheduler.StepLR``.
    """
    _check_value("init_value", init_value)
    _check_positive_int("step_size", step_size)
    check_in_range("gamma", gamma, low=0.0, low_inclusive=False)

    def schedule(count):
        exponent = (_count(count) // step_size).astype(jnp.float32)
        return (init_value * jnp.power(jnp.float32(gamma), exponent)).astype(jnp.float32)

    return schedule


def multistep_decay(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """Multiplies the rate by ``gamma`` at each milestone.

    Rule::

        eta(c) = init_value * gamma ** #{m in milestones : m <= c}

    Args:
      init_value: the rate at count 0, ``>= 0``.
      milestones: strictly increasing positive integers.
      gamma: the factor, ``> 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.multistep_decay(1.0, milestones=[3, 5], gamma=0.1)
      >>> [round(float(s(c)), 6) for c in (2, 3, 5)]
      [1.0, 0.1, 0.01]

    References:
      ``torch.optim.lr_scheduler.MultiStepLR`` (which also counts a repeated
      milestone twice; here milestones must be distinct).
    """
    _check_value("init_value", init_value)
    check_in_range("gamma", gamma, low=0.0, low_inclusive=False)
    milestones = list(milestones)
    for milestone in milestones:
        _check_positive_int("milestones", milestone)
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"milestones must be strictly increasing, got {milestones!r}")
    marks = np.asarray(milestones, np.int32)

    def schedule(count):
        count = _count(count)
        passed = jnp.sum(jnp.expand_dims(count, -1) >= marks, axis=-1) if marks.size else 0
        exponent = jnp.asarray(passed, jnp.float32)
        return (init_value * jnp.power(jnp.float32(gamma), exponent)).astype(jnp.float32)

    return schedule


def exponential_decay(init_value: float, gamma: float) -> Schedule:
    """Multiplies the rate by ``gamma`` every step.

    Rule::

        eta(c) = init_value * gamma ** c

    Args:
      init_value: the rate at count 0, ``>= 0``.
      gamma: the factor, ``> 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> round(float(schedules.exponential_decay(1.0, gamma=0.5)(3)), 6)
      0.125

    References:
      ``torch.optim.lr_scheduler.ExponentialLR``.
    """
    _check_value("init_value", init_value)
    check_in_range("gamma", gamma, low=0.0, low_inclusive=False)

    def schedule(count):
        exponent = _count(count).astype(jnp.float32)
        return (init_value * jnp.power(jnp.float32(gamma), exponent)).astype(jnp.float32)

    return schedule


def cosine_annealing(init_value: float, t_max: int, eta_min: float = 0.0) -> Schedule:
    """Cosine annealing from ``init_value`` to ``eta_min`` over ``t_max`` steps.

    Rule (the closed form)::

        eta(c) = eta_min + (init_value - eta_min) * (1 + cos(pi * c / t_max)) / 2

    Past ``t_max`` the cosine continues, rising back to ``init_value`` at
    ``2 * t_max``, as torch's closed form does. torch's ``step()`` applies a recursive
    form that equals this up to rounding (tested to a relative 1e-5 over several
    cycles) except at ``eta_min`` itself, where torch's recursion pins the value.

    Args:
      init_value: the rate at count 0, ``>= 0``.
      t_max: half the period, a positive integer.
      eta_min: the lowest rate, ``>= 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> round(float(schedules.cosine_annealing(1.0, t_max=10)(5)), 6)
      0.5

    References:
      Loshchilov & Hutter, "SGDR" (2017);
      ``torch.optim.lr_scheduler.CosineAnnealingLR``.
    """
    _check_value("init_value", init_value)
    _check_positive_int("t_max", t_max)
    _check_value("eta_min", eta_min)

    def schedule(count):
        # The cosine has period 2 t_max: reduce the count exactly before going to floats.
        fraction = (_count(count) % (2 * t_max)).astype(jnp.float32) / t_max
        return _cosine(init_value, eta_min, fraction).astype(jnp.float32)

    return schedule


def linear(
    init_value: float,
    start_factor: float = 1.0 / 3.0,
    end_factor: float = 1.0,
    total_iters: int = 5,
) -> Schedule:
    """Scales the rate by a factor moving linearly from ``start_factor`` to ``end_factor``.

    Rule::

        eta(c) = init_value * (s + (e - s) * min(c, total_iters) / total_iters)

    Args:
      init_value: the base rate, ``>= 0``.
      start_factor: ``s`` in ``(0, 1]``.
      end_factor: ``e`` in ``[0, 1]``.
      total_iters: steps to reach ``end_factor``, a positive integer.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.linear(1.0, start_factor=0.5, end_factor=1.0, total_iters=4)
      >>> [round(float(s(c)), 6) for c in (0, 2, 9)]
      [0.5, 0.75, 1.0]

    References:
      ``torch.optim.lr_scheduler.LinearLR`` (same defaults).
    """
    _check_value("init_value", init_value)
    check_in_range("start_factor", start_factor, low=0.0, high=1.0, low_inclusive=False)
    check_in_range("end_factor", end_factor, low=0.0, high=1.0)
    _check_positive_int("total_iters", total_iters)

    def schedule(count):
        progress = jnp.minimum(_count(count), total_iters).astype(jnp.float32) / total_iters
        factor = start_factor + (end_factor - start_factor) * progress
        return (init_value * factor).astype(jnp.float32)

    return schedule


def one_cycle(
    max_value: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle policy: warm up to ``max_value``, then anneal far below the start.

    Rule, with ``a = max_value / div_factor`` and ``z = a / final_div_factor``, and
    ``p = pct_start * total_steps``::

        two phases:   a -> max_value over [0, p - 1],  max_value -> z over [p - 1, T - 1]
        three phases: a -> max_value over [0, p - 1],  max_value -> a over [p - 1, 2p - 2],
                      a -> z over [2p - 2, T - 1]

    each piece annealed by a half cosine (``"cos"``) or a straight line (``"linear"``),
    with ``T = total_steps``. From count ``T - 1`` on, the value stays at ``z``
    (torch raises past ``T``; at exactly ``T`` it extrapolates the last phase).

    Args:
      max_value: the peak rate, ``>= 0``.
      total_steps: the length of the cycle, a positive integer.
      pct_start: the fraction of the cycle spent warming up, in ``(0, 1)``.
      anneal_strategy: ``"cos"`` or ``"linear"``.
      div_factor: ``a = max_value / div_factor``, ``> 0``.
      final_div_factor: ``z = a / final_div_factor``, ``> 0``.
      three_phase: add the symmetric return to ``a`` before the final descent.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.one_cycle(1.0, total_steps=100)
      >>> round(float(s(0)), 6), round(float(s(29)), 6)
      (0.04, 1.0)

    References:
      Smith & Topin, "Super-Convergence" (2018);
      ``torch.optim.lr_scheduler.OneCycleLR`` (same defaults; no momentum cycling).
    """
    _check_value("max_value", max_value)
    _check_positive_int("total_steps", total_steps)
    check_in_range(
        "pct_start", pct_start, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    check_in_range("div_factor", div_factor, low=0.0, low_inclusive=False)
    check_in_range("final_div_factor", final_div_factor, low=0.0, low_inclusive=False)

    initial = max_value / div_factor
    final = initial / final_div_factor
    warm_end = float(pct_start * total_steps) - 1
    if three_phase:
        phases = [
            (warm_end, initial, max_value),
            (float(2 * pct_start * total_steps) - 2, max_value, initial),
            (total_steps - 1, initial, final),
        ]
    else:
        phases = [(warm_end, initial, max_value), (total_steps - 1, max_value, final)]
    for (end, _, _), (start, _, _) in zip(phases[1:], phases[:-1]):
        if end <= start:
            raise ValueError(
                f"total_steps={total_steps} with pct_start={pct_start} leaves an empty phase"
            )
    if warm_end <= 0:
        raise ValueError(
            f"total_steps={total_steps} with pct_start={pct_start} leaves no warm-up step"
        )

    def anneal(start, end, fraction):
        if anneal_strategy == "cos":
            return _cosine(start, end, fraction)
        return start + (end - start) * fraction

    def schedule(count):
        step = jnp.minimum(_count(count), total_steps - 1).astype(jnp.float32)
        value = jnp.zeros(jnp.shape(step), jnp.float32)
        chosen = jnp.zeros(jnp.shape(step), bool)
        phase_start = 0.0
        for index, (phase_end, start, end) in enumerate(phases):
            fraction = (step - phase_start) / (phase_end - phase_start)
            here = step <= phase_end if index < len(phases) - 1 else jnp.ones_like(chosen)
            take = jnp.logical_and(here, jnp.logical_not(chosen))
            value = jnp.where(take, anneal(start, end, fraction), value)
            chosen = jnp.logical_or(chosen, here)
            phase_start = phase_end
        return value.astype(jnp.float32)

    return schedule


def cosine_warm_restarts(
    init_value: float, t_0: int, t_mult: int = 1, eta_min: float = 0.0
) -> Schedule:
    """Cosine annealing with warm restarts, each cycle ``t_mult`` times longer.

    Rule: with cycle ``i`` starting at ``S_i = t_0 (t_mult^i - 1) / (t_mult - 1)``
    (``S_i = i t_0`` when ``t_mult = 1``) and lasting ``T_i = t_0 t_mult^i`` steps::

        eta(c) = eta_min + (init_value - eta_min) * (1 + cos(pi * (c - S_i) / T_i)) / 2

    for the cycle ``i`` that contains ``c``. Cycle boundaries are found with integer
    arithmetic, so restarts land on exactly the same steps as torch's.

    Args:
      init_value: the rate at the start of each cycle, ``>= 0``.
      t_0: the first cycle's length, a positive integer.
      t_mult: the growth factor of cycle lengths, an integer ``>= 1``.
      eta_min: the lowest rate, ``>= 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.cosine_warm_restarts(1.0, t_0=10, t_mult=2)
      >>> [round(float(s(c)), 6) for c in (0, 10, 20)]
      [1.0, 1.0, 0.5]

    References:
      Loshchilov & Hutter, "SGDR" (2017);
      ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` stepped with no argument.
    """
    _check_value("init_value", init_value)
    _check_positive_int("t_0", t_0)
    _check_positive_int("t_mult", t_mult)
    _check_value("eta_min", eta_min)

    limit = np.iinfo(np.int32).max
    starts, lengths = [0], [t_0]
    while starts[-1] + lengths[-1] <= limit and (t_mult > 1 or len(starts) == 1):
        starts.append(starts[-1] + lengths[-1])
        lengths.append(lengths[-1] * t_mult)
    starts_array = np.asarray(starts[1:], np.int64).clip(max=limit).astype(np.int32)

    def schedule(count):
        count = _count(count)
        if t_mult == 1:
            position = count % t_0
            length = jnp.full(jnp.shape(count), t_0, jnp.float32)
        else:
            cycle = jnp.sum(jnp.expand_dims(count, -1) >= starts_array, axis=-1)
            position = count - jnp.asarray(starts, jnp.int32)[cycle]
            length = jnp.asarray(lengths, jnp.float32)[cycle]
        fraction = position.astype(jnp.float32) / length
        return _cosine(init_value, eta_min, fraction).astype(jnp.float32)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs schedules one after another, restarting each one's count at its boundary.

    Rule, with ``b_0 = 0`` and ``i`` the number of boundaries ``<= c``::

        eta(c) = schedules[i](c - b_i)

    Args:
      schedules: one or more schedules.
      boundaries: ``len(schedules) - 1`` strictly increasing positive integers.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.join([schedules.constant(0.1), schedules.constant(0.01)], [5])
      >>> [round(float(s(c)), 6) for c in (4, 5)]
      [0.1, 0.01]

    References:
      ``torch.optim.lr_scheduler.SequentialLR``.
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules:
        raise ValueError("schedules must hold at least one schedule, got []")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must have len(schedules) - 1 = {len(schedules) - 1} entries, "
            f"got {boundaries!r}"
        )
    for boundary in boundaries:
        _check_positive_int("boundaries", boundary)
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}")
    for index, item in enumerate(schedules):
        if not callable(item):
            raise ValueError(f"schedules[{index}] must be a schedule (callable), got {item!r}")

    def schedule(count):
        count = _count(count)
        value = schedules[0](count)
        for boundary, later in zip(boundaries, schedules[1:]):
            value = jnp.where(count >= boundary, later(count - boundary), value)
        return jnp.asarray(value, jnp.float32)

    return schedule


def warmup(schedule: Schedule, warmup_steps: int, start_factor: float = 0.0) -> Schedule:
    """Linear warm-up to ``schedule(0)``, then ``schedule`` with its count restarted.

    Rule, with ``w = warmup_steps`` and ``s = start_factor``::

        eta(c) = schedule(0) * (s + (1 - s) * c / w)     for c < w
        eta(c) = schedule(c - w)                         for c >= w

    Args:
      schedule: the schedule to run after warm-up.
      warmup_steps: the length of the warm-up, a positive integer.
      start_factor: the fraction of ``schedule(0)`` at count 0, in ``[0, 1]``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.warmup(schedules.constant(1.0), warmup_steps=4)
      >>> [round(float(s(c)), 6) for c in (0, 2, 4)]
      [0.0, 0.5, 1.0]

    References:
      ``SequentialLR([LinearLR(start_factor=s, total_iters=w), scheduler], [w])`` for
      ``s > 0`` (torch's ``LinearLR`` needs ``start_factor > 0``).
    """
    if not callable(schedule):
        raise ValueError(f"schedule must be a schedule (callable), got {schedule!r}")
    _check_positive_int("warmup_steps", warmup_steps)
    check_in_range("start_factor", start_factor, low=0.0, high=1.0)

    def warmed(count):
        count = _count(count)
        progress = jnp.minimum(count, warmup_steps).astype(jnp.float32) / warmup_steps
        ramp = schedule(jnp.zeros_like(count)) * (start_factor + (1.0 - start_factor) * progress)
        after = schedule(jnp.maximum(count - warmup_steps, 0))
        return jnp.where(count < warmup_steps, ramp, after).astype(jnp.float32)

    return warmed
