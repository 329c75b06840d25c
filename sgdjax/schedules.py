"""Learning-rate schedules that match ``torch.optim.lr_scheduler`` step for step.

A schedule is a pure, jittable function of the integer step count ``c >= 0`` that
returns a float32 value. The value at count ``c`` equals the learning rate of the
torch scheduler with the same arguments and defaults after ``c`` calls of
``scheduler.step()`` (count 0 is the rate right after constructing the scheduler).
An sgdjax or optax optimizer evaluates its schedule at the number of updates taken so
far, which is torch's behaviour when the scheduler is stepped once per optimizer step.

=======================================  =============================================
``torch.optim.lr_scheduler``             ``sgdjax.schedules``
=======================================  =============================================
(no scheduler)                           :func:`constant`
``LambdaLR``                             :func:`lambda_factor`
``MultiplicativeLR``                     :func:`multiplicative`
``StepLR``                               :func:`step_decay`
``MultiStepLR``                          :func:`multistep_decay`
``ConstantLR``                           :func:`constant_factor`
``LinearLR``                             :func:`linear`
``ExponentialLR``                        :func:`exponential_decay`
``SequentialLR``                         :func:`join`
``SequentialLR([LinearLR, scheduler])``  :func:`warmup`
``PolynomialLR``                         :func:`polynomial`
``CosineAnnealingLR``                    :func:`cosine_annealing`
``ChainedScheduler``                     :func:`chained`
``ReduceLROnPlateau``                    :func:`reduce_on_plateau` (a stateful object)
``CyclicLR`` (rate; momentum)            :func:`cyclic`; :func:`cyclic_momentum`
``CosineAnnealingWarmRestarts``          :func:`cosine_warm_restarts`
``OneCycleLR`` (rate; momentum)          :func:`one_cycle`; :func:`one_cycle_momentum`
``swa_utils.SWALR``                      :func:`swa_lr`
=======================================  =============================================

The count may be a Python int or an int32 array, traced or not; an array of counts
gives an array of rates of the same shape. Every factory checks its arguments when
called and raises a ``ValueError`` naming the argument and its value.

torch updates most schedulers recursively (``lr <- lr * factor``) in float64; here
each schedule is its closed form, evaluated in float32 so that the result is within
a few float32 roundings of torch's rate at every count, however long the run: powers
``gamma ** n`` come from float64 tables rather than from repeated float32 products,
and cosines and linear ramps are written without cancellation near their ends. The
two forms part ways only when something else also edits the optimizer's rate between
steps (torch's "chainable" schedulers), which a function of the count cannot see;
:func:`chained` gives the product that ``ChainedScheduler`` forms.

:func:`one_cycle_momentum` and :func:`cyclic_momentum` are the momentum that
``OneCycleLR`` and ``CyclicLR`` set by default (``cycle_momentum=True``); pass them as
the ``momentum`` of :func:`sgdjax.sgd`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sgdjax._base import check_real as _check_real

Schedule = Callable[[ArrayLike], jax.Array]

__all__ = [
    "ReduceOnPlateau",
    "ReduceOnPlateauState",
    "Schedule",
    "chained",
    "constant",
    "constant_factor",
    "cosine_annealing",
    "cosine_warm_restarts",
    "cyclic",
    "cyclic_momentum",
    "exponential_decay",
    "join",
    "lambda_factor",
    "linear",
    "multiplicative",
    "multistep_decay",
    "one_cycle",
    "one_cycle_momentum",
    "polynomial",
    "reduce_on_plateau",
    "step_decay",
    "swa_lr",
    "warmup",
]

_INT32_MAX = int(np.iinfo(np.int32).max)


# --------------------------------------------------------------------------------------
# Argument checks (construction time only, on concrete Python or NumPy values).
# --------------------------------------------------------------------------------------


def _check_int(name: str, value: int, *, minimum: int = 1) -> int:
    """Returns ``value`` as an int in ``[minimum, 2**31 - 1]``, or raises a ``ValueError``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not minimum <= value <= _INT32_MAX
    ):
        raise ValueError(f"{name} must be an integer in [{minimum}, 2**31 - 1], got {value!r}")
    return int(value)


def _check_increasing(name: str, values: Sequence[int]) -> list[int]:
    """Returns ``values`` as a list of strictly increasing positive ints, or raises."""
    try:
        items = list(values)
    except TypeError as error:
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}") from error
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise ValueError(f"{name} must hold integers, got {values!r}")
        if not 1 <= item <= _INT32_MAX:
            raise ValueError(f"{name} must hold integers in [1, 2**31 - 1], got {values!r}")
    if any(b <= a for a, b in zip(items, items[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {values!r}")
    return [int(item) for item in items]


# --------------------------------------------------------------------------------------
# Value ranges: a schedule built here records the interval its values lie in, so that a
# transform taking a scheduled hyperparameter (momentum) can check it at construction.
# --------------------------------------------------------------------------------------

_RANGE_ATTRIBUTE = "_sgdjax_value_range"


def _with_range(schedule: Schedule, low: float, high: float) -> Schedule:
    """Records that ``schedule``'s values lie in ``[low, high]``; returns ``schedule``."""
    setattr(schedule, _RANGE_ATTRIBUTE, (float(min(low, high)), float(max(low, high))))
    return schedule


def _value_range(schedule: Schedule) -> tuple[float, float] | None:
    """The interval holding every value of ``schedule``, if it is one of ours; else None."""
    return getattr(schedule, _RANGE_ATTRIBUTE, None)


def _decay_range(init_value: float, gamma: float) -> tuple[float, float]:
    """Bounds of ``init_value * gamma ** n`` over all ``n >= 0``."""
    return (0.0, init_value) if gamma <= 1.0 else (init_value, math.inf)


# --------------------------------------------------------------------------------------
# Accurate float32 building blocks.
# --------------------------------------------------------------------------------------


def _count(count: ArrayLike) -> jax.Array:
    return jnp.asarray(count, jnp.int32)


def _power_lookup(
    scale: float, gamma: float, max_exponent: int
) -> Callable[[jax.Array], jax.Array]:
    """Returns ``n -> scale * gamma ** n`` in float32 for integer ``0 <= n <= max_exponent``.

    ``n`` is split into base-256 digits, ``n = sum_k d_k 256^k``, and each factor
    ``gamma ** (d_k 256^k)`` is read from a table computed in float64 and rounded once.
    The result is correctly rounded for ``n < 256`` and within about two float32 ulps
    per further digit, for any ``n``; raising ``float32(gamma)`` to the ``n``-th power
    instead would multiply the rounding error of ``gamma`` itself by ``n``.
    """
    if scale == 0.0 or gamma == 1.0:
        return lambda n: jnp.full(jnp.shape(n), scale, jnp.float32)
    tables = []
    place = 1
    while True:
        size = min(256, max_exponent // place + 1)
        with np.errstate(over="ignore", under="ignore"):
            table = np.power(np.float64(gamma), np.arange(size, dtype=np.float64) * place)
            if place == 1:
                table = scale * table
            tables.append((place, size, table.astype(np.float32)))
        if place * 256 > max_exponent:
            break
        place *= 256

    def lookup(n):
        value = None
        for place, size, table in tables:
            digit = (n // place) % 256 if size == 256 else n // place
            factor = jnp.asarray(table)[digit]
            value = factor if value is None else value * factor
        return value

    return lookup


def _half_cosines(
    elapsed: jax.Array, remaining: jax.Array, scale: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """``(1 + cos(pi e / L)) / 2`` and ``(1 - cos(pi e / L)) / 2``, ``L = e + r``.

    ``e`` is ``elapsed``, ``r`` is ``remaining`` and ``scale`` is ``pi / (2 L)``. The two
    weights are ``cos^2(pi e / 2L) = sin^2(pi r / 2L)`` and ``sin^2(pi e / 2L) =
    cos^2(pi r / 2L)``, evaluated on whichever side keeps the angle within
    ``[0, pi / 4]``, so each keeps its float32 relative precision even near zero. A
    cosine from ``v_0`` to ``v_1`` is then ``v_0 * w_0 + v_1 * w_1``: a sum of two
    non-negative terms, free of cancellation whichever way it goes.
    """
    near_start = elapsed <= remaining
    angle = jnp.where(near_start, elapsed, remaining) * scale
    cos2, sin2 = jnp.cos(angle) ** 2, jnp.sin(angle) ** 2
    return jnp.where(near_start, cos2, sin2), jnp.where(near_start, sin2, cos2)


# --------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------


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
      ``torch.optim.SGD`` with no scheduler; ``optax.constant_schedule``.
    """
    value = _check_real("value", value, low=0.0)

    def schedule(count):
        return jnp.full(jnp.shape(count), value, jnp.float32)

    return _with_range(schedule, value, value)


def step_decay(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiplies the rate by ``gamma`` every ``step_size`` steps.

    Rule::

        eta(c) = init_value * gamma ** (c // step_size)

    Args:
      init_value: the rate at count 0, a finite number ``>= 0``.
      step_size: steps between decays, a positive integer.
      gamma: the factor, ``> 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> round(float(schedules.step_decay(1.0, step_size=10, gamma=0.5)(25)), 6)
      0.25

    References:
      ``torch.optim.lr_scheduler.StepLR``;
      ``optax.exponential_decay(..., staircase=True)``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    step_size = _check_int("step_size", step_size)
    gamma = _check_real("gamma", gamma, low=0.0, low_inclusive=False)
    power = _power_lookup(init_value, gamma, _INT32_MAX // step_size)

    def schedule(count):
        return power(jnp.maximum(_count(count), 0) // step_size)

    return _with_range(schedule, *_decay_range(init_value, gamma))


def multistep_decay(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """Multiplies the rate by ``gamma`` at each milestone.

    Rule, with ``m_1 < m_2 < ...`` the milestones::

        eta(c) = init_value * gamma ** #{i : m_i <= c}

    Args:
      init_value: the rate at count 0, a finite number ``>= 0``.
      milestones: strictly increasing positive integers (possibly none).
      gamma: the factor, ``> 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.multistep_decay(1.0, milestones=[3, 5], gamma=0.1)
      >>> [round(float(s(c)), 6) for c in (2, 3, 5)]
      [1.0, 0.1, 0.01]

    References:
      ``torch.optim.lr_scheduler.MultiStepLR``, which also accepts a repeated
      milestone and then decays by ``gamma`` once per repetition; here a repeated or
      unsorted milestone is an error. ``optax.piecewise_constant_schedule``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    milestones = _check_increasing("milestones", milestones)
    gamma = _check_real("gamma", gamma, low=0.0, low_inclusive=False)
    marks = np.asarray(milestones, np.int32)
    power = _power_lookup(init_value, gamma, len(milestones))

    def schedule(count):
        count = _count(count)
        if not milestones:
            return power(jnp.zeros_like(count))
        passed = jnp.searchsorted(marks, count, side="right", method="compare_all")
        return power(passed.astype(jnp.int32))

    return _with_range(schedule, init_value, init_value * gamma ** len(milestones))


def exponential_decay(init_value: float, gamma: float) -> Schedule:
    """Multiplies the rate by ``gamma`` every step.

    Rule::

        eta(c) = init_value * gamma ** c

    Args:
      init_value: the rate at count 0, a finite number ``>= 0``.
      gamma: the factor, ``> 0`` (above 1 the rate grows, as in torch).

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> round(float(schedules.exponential_decay(1.0, gamma=0.5)(3)), 6)
      0.125

    References:
      ``torch.optim.lr_scheduler.ExponentialLR``;
      ``optax.exponential_decay(init_value, transition_steps=1, decay_rate=gamma)``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    gamma = _check_real("gamma", gamma, low=0.0, low_inclusive=False)
    power = _power_lookup(init_value, gamma, _INT32_MAX)

    def schedule(count):
        return power(jnp.maximum(_count(count), 0))

    return _with_range(schedule, *_decay_range(init_value, gamma))


def cosine_annealing(init_value: float, t_max: int, eta_min: float = 0.0) -> Schedule:
    """Cosine annealing from ``init_value`` to ``eta_min`` over ``t_max`` steps.

    Rule (torch's closed form)::

        eta(c) = eta_min + (init_value - eta_min) * (1 + cos(pi * c / t_max)) / 2
               = init_value * cos^2(pi c / (2 t_max)) + eta_min * sin^2(pi c / (2 t_max))

    the second line being how it is evaluated (no cancellation near ``eta_min``).
    Past ``t_max`` the cosine goes on: the rate climbs back to ``init_value`` at
    ``2 t_max`` and keeps oscillating with period ``2 t_max``, as torch's
    ``_get_closed_form_lr`` does (it does not hold ``eta_min``; wrap the schedule in
    :func:`join` with :func:`constant` to hold it, or use ``optax.cosine_decay_schedule``).

    torch's ``step()`` uses a recursive, "chainable" form instead,
    ``lr <- eta_min + (lr - eta_min) (1 + cos(pi c / t_max)) / (1 + cos(pi (c-1) / t_max))``
    with an additive step right after each minimum. In float64 it equals the closed
    form up to accumulated rounding (relative 1e-12 after a thousand cycles, far below
    float32 resolution), before and after ``t_max`` alike; the two differ only when
    something else changes the optimizer's rate between steps.

    Args:
      init_value: the rate at count 0, a finite number ``>= 0``.
      t_max: half the period, a positive integer.
      eta_min: the rate at ``t_max``, a finite number ``>= 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.cosine_annealing(1.0, t_max=10)
      >>> [round(float(s(c)), 6) for c in (0, 5, 10, 15, 20)]
      [1.0, 0.5, 0.0, 0.5, 1.0]

    References:
      Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts"
      (ICLR 2017); ``torch.optim.lr_scheduler.CosineAnnealingLR``;
      ``optax.cosine_decay_schedule`` (equal up to ``t_max``, then constant).
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    t_max = _check_int("t_max", t_max)
    eta_min = _check_real("eta_min", eta_min, low=0.0)
    scale = math.pi / (2 * t_max)

    def schedule(count):
        count = jnp.maximum(_count(count), 0)
        # The cosine has period 2 t_max and is symmetric about t_max: fold the count
        # into [0, t_max] with integer arithmetic before going to floats.
        if 2 * t_max <= _INT32_MAX:
            count = count % (2 * t_max)
        elapsed = jnp.where(count <= t_max, count, t_max - (count - t_max))
        remaining = t_max - elapsed
        weight_start, weight_end = _half_cosines(
            elapsed.astype(jnp.float32), remaining.astype(jnp.float32), np.float32(scale)
        )
        return init_value * weight_start + eta_min * weight_end

    return _with_range(schedule, init_value, eta_min)


def linear(
    init_value: float,
    start_factor: float = 1.0 / 3.0,
    end_factor: float = 1.0,
    total_iters: int = 5,
) -> Schedule:
    """Scales the rate by a factor moving linearly from ``start_factor`` to ``end_factor``.

    Rule, with ``k = min(c, total_iters)``, ``s = start_factor``, ``e = end_factor``::

        eta(c) = init_value * (s * (total_iters - k) + e * k) / total_iters

    which is torch's ``s + (e - s) * k / total_iters`` written without cancellation
    when the rate falls towards ``e = 0``.

    Args:
      init_value: the base rate, a finite number ``>= 0``.
      start_factor: ``s`` in ``(0, 1]`` (torch's range).
      end_factor: ``e`` in ``[0, 1]`` (torch's range).
      total_iters: steps to reach ``end_factor``, a positive integer.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.linear(1.0, start_factor=0.5, end_factor=1.0, total_iters=4)
      >>> [round(float(s(c)), 6) for c in (0, 2, 9)]
      [0.5, 0.75, 1.0]

    References:
      ``torch.optim.lr_scheduler.LinearLR`` (same defaults);
      ``optax.linear_schedule(init_value * s, init_value * e, total_iters)``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    start_factor = _check_real("start_factor", start_factor, low=0.0, high=1.0, low_inclusive=False)
    end_factor = _check_real("end_factor", end_factor, low=0.0, high=1.0)
    total_iters = _check_int("total_iters", total_iters)
    start, end = init_value * start_factor, init_value * end_factor

    def schedule(count):
        done = jnp.clip(_count(count), 0, total_iters)
        left = (total_iters - done).astype(jnp.float32)
        return (start * left + end * done.astype(jnp.float32)) / total_iters

    return _with_range(schedule, start, end)


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

    Rule, with ``a = max_value / div_factor``, ``z = a / final_div_factor``,
    ``T = total_steps`` and ``p = float(pct_start * T)`` (torch's phase ends, in float64)::

        two phases:   a -> max_value on [0, p - 1],   max_value -> z on [p - 1, T - 1]
        three phases: a -> max_value on [0, p - 1],   max_value -> a on [p - 1, 2p - 2],
                      a -> z on [2p - 2, T - 1]

    A count ``c`` belongs to the first phase whose end is ``>= c``. Within a phase
    from ``(t_0, v_0)`` to ``(t_1, v_1)``, with ``x = (c - t_0) / (t_1 - t_0)``::

        "cos":     eta(c) = v_1 + (v_0 - v_1) * (1 + cos(pi x)) / 2
                          = v_0 * cos^2(pi x / 2) + v_1 * sin^2(pi x / 2)
        "linear":  eta(c) = v_0 + (v_1 - v_0) * x = v_0 * (1 - x) + v_1 * x

    each evaluated in its second form, which keeps float32 precision as the rate
    approaches the small final value ``z``.
    From count ``T - 1`` on the rate stays at ``z``. torch raises a ``ValueError``
    past ``T`` steps, and at exactly ``T`` extrapolates the last phase one step: just
    above ``z`` for ``"cos"``, below ``z`` (possibly negative) for ``"linear"``.

    Configurations in which a phase is empty or runs backwards (``p - 1 <= 0``, or
    ``p - 1 >= T - 1``, or, with three phases, ``2p - 2 >= T - 1``) raise a
    ``ValueError``; torch accepts some of them and divides by zero or skips a phase.

    Args:
      max_value: the peak rate, a finite number ``>= 0``.
      total_steps: the length of the cycle, a positive integer.
      pct_start: the fraction of the cycle spent warming up, in ``(0, 1)``.
      anneal_strategy: ``"cos"`` or ``"linear"``.
      div_factor: ``a = max_value / div_factor``, ``> 0``.
      final_div_factor: ``z = a / final_div_factor``, ``> 0``.
      three_phase: return to ``a`` before the final descent, as in the paper.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.one_cycle(1.0, total_steps=100)
      >>> [round(float(s(c)), 6) for c in (0, 29, 99, 150)]
      [0.04, 1.0, 4e-06, 4e-06]

    References:
      Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks Using
      Large Learning Rates" (2018); ``torch.optim.lr_scheduler.OneCycleLR`` (same
      defaults; its momentum cycling is not part of a learning-rate schedule).
      optax's ``cosine_onecycle_schedule`` places the phase ends differently.
    """
    max_value = _check_real("max_value", max_value, low=0.0)
    total_steps = _check_int("total_steps", total_steps)
    pct_start = _check_real(
        "pct_start", pct_start, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    div_factor = _check_real("div_factor", div_factor, low=0.0, low_inclusive=False)
    final_div_factor = _check_real(
        "final_div_factor", final_div_factor, low=0.0, low_inclusive=False
    )

    initial = max_value / div_factor
    final = initial / final_div_factor
    if three_phase:
        values = [(initial, max_value), (max_value, initial), (initial, final)]
    else:
        values = [(initial, max_value), (max_value, final)]
    ends = _one_cycle_ends(total_steps, pct_start, three_phase)
    schedule = _phase_schedule(total_steps, ends, values, anneal_strategy)
    return _with_range(schedule, min(min(pair) for pair in values), max_value)


def _one_cycle_ends(total_steps: int, pct_start: float, three_phase: bool) -> list[float]:
    """torch's ``OneCycleLR`` phase ends (in float64), or a ``ValueError`` if one is empty."""
    ends = [float(pct_start * total_steps) - 1]
    if three_phase:
        ends.append(float(2 * pct_start * total_steps) - 2)
    ends.append(float(total_steps - 1))
    if not all(b > a for a, b in zip([0.0, *ends], ends)):
        raise ValueError(
            f"total_steps={total_steps!r} with pct_start={pct_start!r} and "
            f"three_phase={three_phase!r} gives phase ends {ends}: some phase is empty"
        )
    return ends


def _phase_schedule(
    total_steps: int,
    ends: Sequence[float],
    values: Sequence[tuple[float, float]],
    anneal_strategy: str,
) -> Schedule:
    """Anneals from ``values[i][0]`` to ``values[i][1]`` over phase ``i`` (:func:`one_cycle`)."""
    # Per-phase tables. Phase boundaries are split into an integer and a fraction so
    # that c - t_0 and t_1 - c come out exact (or nearly) in float32.
    starts = [0.0, *ends[:-1]]
    start_whole = np.asarray([math.floor(t) for t in starts], np.int32)
    start_part = np.asarray([t - math.floor(t) for t in starts], np.float32)
    end_whole = np.asarray([math.floor(t) for t in ends], np.int32)
    end_part = np.asarray([t - math.floor(t) for t in ends], np.float32)
    lengths = np.asarray([b - a for a, b in zip(starts, ends)], np.float64)
    scales = (np.pi / (2 * lengths)).astype(np.float32)
    from_values = np.asarray([v for v, _ in values], np.float32)
    to_values = np.asarray([v for _, v in values], np.float32)
    lengths = lengths.astype(np.float32)
    last_counts = end_whole[:-1]  # the last integer count of every phase but the final one

    def schedule(count):
        count = jnp.clip(_count(count), 0, total_steps - 1)
        phase = jnp.searchsorted(last_counts, count, side="left", method="compare_all")

        def at_phase(table):
            return jnp.asarray(table)[phase]

        elapsed = (count - at_phase(start_whole)).astype(jnp.float32) - at_phase(start_part)
        remaining = (at_phase(end_whole) - count).astype(jnp.float32) + at_phase(end_part)
        begin, finish = at_phase(from_values), at_phase(to_values)
        if anneal_strategy == "cos":
            weight_start, weight_end = _half_cosines(elapsed, remaining, at_phase(scales))
            return begin * weight_start + finish * weight_end
        return (begin * remaining + finish * elapsed) / at_phase(lengths)

    return schedule


def cosine_warm_restarts(
    init_value: float, t_0: int, t_mult: int = 1, eta_min: float = 0.0
) -> Schedule:
    """Cosine annealing with warm restarts, each cycle ``t_mult`` times longer.

    Rule: cycle ``i`` starts at ``S_i = t_0 (t_mult^i - 1) / (t_mult - 1)``
    (``S_i = i t_0`` when ``t_mult = 1``) and lasts ``T_i = t_0 t_mult^i`` steps; for
    the cycle ``i`` with ``S_i <= c < S_{i+1}``::

        eta(c) = eta_min + (init_value - eta_min) * (1 + cos(pi * (c - S_i) / T_i)) / 2
               = init_value * cos^2(pi x / 2) + eta_min * sin^2(pi x / 2),  x = (c - S_i) / T_i

    The cycle is found with integer arithmetic: ``c mod t_0`` when ``t_mult = 1``, and
    otherwise a search in the table of cycle starts (at most 31 fit below ``2**31``),
    so restarts land on exactly the steps where torch's ``step()`` restarts. torch's
    ``step(epoch)`` finds the cycle through a float logarithm instead, which can be
    one cycle off at a restart: with ``T_0=1, T_mult=10`` it puts epoch 111 (a
    restart, rate ``init_value``) at the end of the previous cycle (rate ``eta_min``).

    Args:
      init_value: the rate at the start of each cycle, a finite number ``>= 0``.
      t_0: the first cycle's length, a positive integer.
      t_mult: the growth factor of cycle lengths, an integer ``>= 1``.
      eta_min: the floor of the cosine, a finite number ``>= 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.cosine_warm_restarts(1.0, t_0=10, t_mult=2)
      >>> [round(float(s(c)), 6) for c in (0, 5, 10, 20, 30)]
      [1.0, 0.5, 1.0, 0.5, 1.0]

    References:
      Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts"
      (ICLR 2017); ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` stepped
      with no argument.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    t_0 = _check_int("t_0", t_0)
    t_mult = _check_int("t_mult", t_mult)
    eta_min = _check_real("eta_min", eta_min, low=0.0)

    if t_mult == 1:
        scale_0 = np.float32(math.pi / (2 * t_0))

        def locate(count):
            elapsed = count % t_0
            return elapsed.astype(jnp.float32), (t_0 - elapsed).astype(jnp.float32), scale_0

    else:
        starts, lengths = [0], [t_0]
        while starts[-1] + lengths[-1] <= _INT32_MAX:
            starts.append(starts[-1] + lengths[-1])
            lengths.append(lengths[-1] * t_mult)
        # The last cycle may end past int32: keep its end as int32 max plus a float excess.
        ends = [start + length for start, length in zip(starts, lengths)]
        start_table = np.asarray(starts, np.int32)
        end_whole = np.asarray([min(end, _INT32_MAX) for end in ends], np.int32)
        end_excess = np.asarray([max(end - _INT32_MAX, 0) for end in ends], np.float32)
        scales = np.asarray([math.pi / (2 * length) for length in lengths], np.float32)

        def locate(count):
            cycle = jnp.searchsorted(start_table[1:], count, side="right", method="compare_all")
            elapsed = count - jnp.asarray(start_table)[cycle]
            remaining = (jnp.asarray(end_whole)[cycle] - count).astype(jnp.float32)
            remaining = remaining + jnp.asarray(end_excess)[cycle]
            return elapsed.astype(jnp.float32), remaining, jnp.asarray(scales)[cycle]

    def schedule(count):
        elapsed, remaining, scale = locate(jnp.maximum(_count(count), 0))
        weight_start, weight_end = _half_cosines(elapsed, remaining, scale)
        return init_value * weight_start + eta_min * weight_end

    return _with_range(schedule, init_value, eta_min)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs schedules one after another, restarting each one's count at its boundary.

    Rule, with ``b_0 = 0 < b_1 < ...`` and ``i`` the number of boundaries ``<= c``::

        eta(c) = schedules[i](c - b_i)

    This is ``torch.optim.lr_scheduler.SequentialLR``: at each milestone torch restarts
    the next scheduler at its own count 0 (through its closed form), from the
    optimizer's initial rate, not from the rate the previous one reached. Here each
    schedule carries its own initial value. One torch quirk: ``OneCycleLR`` rewrites
    the optimizer's initial rate to ``max_lr / div_factor`` when constructed, so in a
    ``SequentialLR`` every other scheduler starts from that value; build the sgdjax
    schedules with that value to reproduce it. torch does not check its milestones;
    here they must be strictly increasing and positive (in torch a zero or repeated
    milestone silently skips a scheduler).

    Args:
      schedules: one or more schedules (any callables of the count, e.g. optax's).
      boundaries: ``len(schedules) - 1`` strictly increasing positive integers.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.join(
      ...     [schedules.linear(1.0, start_factor=0.5, total_iters=2),
      ...      schedules.exponential_decay(1.0, gamma=0.5)],
      ...     boundaries=[2],
      ... )
      >>> [round(float(s(c)), 6) for c in range(5)]
      [0.5, 0.75, 1.0, 0.5, 0.25]

    References:
      ``torch.optim.lr_scheduler.SequentialLR``; ``optax.join_schedules``.
    """
    schedules = list(schedules)
    if not schedules:
        raise ValueError(f"schedules must hold at least one schedule, got {schedules!r}")
    for index, item in enumerate(schedules):
        if not callable(item):
            raise ValueError(f"schedules[{index}] must be a schedule (callable), got {item!r}")
    try:
        count_given = len(boundaries)
    except TypeError as error:
        raise ValueError(
            f"boundaries must be a sequence of integers, got {boundaries!r}"
        ) from error
    if count_given != len(schedules) - 1:
        raise ValueError(
            f"boundaries must have len(schedules) - 1 = {len(schedules) - 1} entries, "
            f"got {boundaries!r}"
        )
    boundaries = _check_increasing("boundaries", boundaries)

    def schedule(count):
        count = _count(count)
        value = jnp.asarray(schedules[0](count), jnp.float32)
        for boundary, later in zip(boundaries, schedules[1:]):
            # Clamp so a later schedule never sees a negative count (its value is unused).
            shifted = jnp.asarray(later(jnp.maximum(count - boundary, 0)), jnp.float32)
            value = jnp.where(count >= boundary, shifted, value)
        return jnp.broadcast_to(value, jnp.shape(count))

    ranges = [_value_range(item) for item in schedules]
    if any(bounds is None for bounds in ranges):
        return schedule
    return _with_range(schedule, min(low for low, _ in ranges), max(high for _, high in ranges))


def warmup(schedule: Schedule, warmup_steps: int, start_factor: float = 0.0) -> Schedule:
    """Linear warm-up to ``schedule(0)``, then ``schedule`` with its count restarted.

    Rule, with ``w = warmup_steps`` and ``s = start_factor``::

        eta(c) = schedule(0) * (s * (w - c) + c) / w     for c < w
        eta(c) = schedule(c - w)                         for c >= w

    Args:
      schedule: the schedule to run after warm-up.
      warmup_steps: the length of the warm-up, a positive integer.
      start_factor: the fraction of ``schedule(0)`` at count 0, in ``[0, 1]``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.warmup(schedules.cosine_annealing(1.0, t_max=4), warmup_steps=4)
      >>> [round(float(s(c)), 6) for c in range(0, 9, 2)]
      [0.0, 0.5, 1.0, 0.5, 0.0]

    References:
      In torch, ``SequentialLR(opt, [LinearLR(opt, start_factor=s, total_iters=w),
      scheduler], milestones=[w])`` when ``s > 0`` (``LinearLR`` needs it) and the
      scheduler starts at the optimizer's initial rate (``StepLR``, ``MultiStepLR``,
      ``ExponentialLR``, ``CosineAnnealingLR``, ``CosineAnnealingWarmRestarts``; also
      ``OneCycleLR``, which makes ``max_lr / div_factor`` the initial rate).
      ``optax.warmup_cosine_decay_schedule`` is ``warmup`` of a cosine decay.
    """
    if not callable(schedule):
        raise ValueError(f"schedule must be a schedule (callable), got {schedule!r}")
    warmup_steps = _check_int("warmup_steps", warmup_steps)
    start_factor = _check_real("start_factor", start_factor, low=0.0, high=1.0)

    def warmed(count):
        count = _count(count)
        done = jnp.clip(count, 0, warmup_steps)
        ramp = (start_factor * (warmup_steps - done).astype(jnp.float32)) + done.astype(jnp.float32)
        peak = jnp.asarray(schedule(jnp.zeros_like(count)), jnp.float32)
        after = jnp.asarray(schedule(jnp.maximum(count - warmup_steps, 0)), jnp.float32)
        return jnp.where(count < warmup_steps, peak * (ramp / warmup_steps), after)

    bounds = _value_range(schedule)
    if bounds is None:
        return warmed
    # The ramp runs from start_factor * schedule(0) to schedule(0), inside [s * low, high].
    return _with_range(warmed, min(start_factor * bounds[0], bounds[0]), bounds[1])


def constant_factor(init_value: float, factor: float = 1.0 / 3, total_iters: int = 5) -> Schedule:
    """A reduced rate for the first ``total_iters`` steps, then ``init_value``.

    Rule::

        eta(c) = init_value * factor     for c < total_iters
        eta(c) = init_value              for c >= total_iters

    Args:
      init_value: the rate from ``total_iters`` on, a finite number ``>= 0``.
      factor: the reduction, in ``(0, 1]`` (torch divides by it at ``total_iters``).
      total_iters: the number of reduced steps, a positive integer.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.constant_factor(0.3, factor=0.5, total_iters=2)
      >>> [round(float(s(c)), 6) for c in range(4)]
      [0.15, 0.15, 0.3, 0.3]

    References:
      ``torch.optim.lr_scheduler.ConstantLR`` (same defaults).
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    factor = _check_real("factor", factor, low=0.0, high=1.0, low_inclusive=False)
    total_iters = _check_int("total_iters", total_iters)
    reduced = init_value * factor

    def schedule(count):
        count = _count(count)
        return jnp.where(count < total_iters, np.float32(reduced), np.float32(init_value))

    return _with_range(schedule, reduced, init_value)


def polynomial(init_value: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    """Polynomial decay to zero over ``total_iters`` steps.

    Rule::

        eta(c) = init_value * ((total_iters - min(c, total_iters)) / total_iters) ** power

    torch's ``step()`` multiplies the rate by the ratio of consecutive values of this
    rule, which in float64 is the closed form to within rounding.

    Args:
      init_value: the rate at count 0, a finite number ``>= 0``.
      total_iters: the number of decaying steps, a positive integer.
      power: the exponent, a finite number ``>= 0``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.polynomial(1.0, total_iters=4, power=2.0)
      >>> [round(float(s(c)), 6) for c in range(6)]
      [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]

    References:
      ``torch.optim.lr_scheduler.PolynomialLR`` (same defaults);
      ``optax.polynomial_schedule(init_value, 0, power, total_iters)``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    total_iters = _check_int("total_iters", total_iters)
    power = _check_real("power", power, low=0.0)

    def schedule(count):
        left = total_iters - jnp.clip(_count(count), 0, total_iters)
        fraction = left.astype(jnp.float32) / np.float32(total_iters)
        return init_value * jnp.power(fraction, np.float32(power))

    return _with_range(schedule, 0.0 if power > 0 else init_value, init_value)


_CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def _cyclic_weight(
    step_size_up: int,
    step_size_down: int | None,
    mode: str,
    gamma: float,
    scale_fn: Callable[[jax.Array], ArrayLike] | None,
    scale_mode: str,
) -> tuple[Callable[[jax.Array], jax.Array], bool]:
    """``count -> h(c) * s(c)`` of :func:`cyclic`, and whether it lies in ``[0, 1]``."""
    step_size_up = _check_int("step_size_up", step_size_up)
    if step_size_down is None:
        step_size_down = step_size_up
    step_size_down = _check_int("step_size_down", step_size_down, minimum=0)
    if mode not in _CYCLIC_MODES:
        raise ValueError(f"mode must be one of {_CYCLIC_MODES}, got {mode!r}")
    gamma = _check_real("gamma", gamma, low=0.0, low_inclusive=False)
    if scale_fn is not None and not callable(scale_fn):
        raise ValueError(f"scale_fn must be None or a callable, got {scale_fn!r}")
    if scale_mode not in ("cycle", "iterations"):
        raise ValueError(f"scale_mode must be 'cycle' or 'iterations', got {scale_mode!r}")
    total = step_size_up + step_size_down
    if total > _INT32_MAX:
        raise ValueError(
            f"step_size_up + step_size_down must be below 2**31, got {step_size_up} + "
            f"{step_size_down}"
        )

    if scale_fn is not None:
        by_cycle = scale_mode == "cycle"

        def scale(cycle, count):
            return jnp.asarray(scale_fn(cycle if by_cycle else count), jnp.float32)

        bounded = False
    elif mode == "triangular":

        def scale(cycle, count):
            return jnp.ones(jnp.shape(count), jnp.float32)

        bounded = True
    elif mode == "triangular2":
        halving = _power_lookup(1.0, 0.5, _INT32_MAX // total + 1)

        def scale(cycle, count):
            return halving(cycle - 1)

        bounded = True
    else:
        growth = _power_lookup(1.0, gamma, _INT32_MAX)

        def scale(cycle, count):
            return growth(count)

        bounded = gamma <= 1.0

    def weight(count):
        count = jnp.maximum(_count(count), 0)
        cycle = count // total + 1
        position = count - (cycle - 1) * total
        rising = position.astype(jnp.float32) / np.float32(step_size_up)
        falling = (total - position).astype(jnp.float32) / np.float32(max(step_size_down, 1))
        height = jnp.where(position <= step_size_up, rising, falling)
        return height * scale(cycle, count)

    return weight, bounded


def cyclic(
    base_value: float,
    max_value: float,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[jax.Array], ArrayLike] | None = None,
    scale_mode: str = "cycle",
) -> Schedule:
    """The cyclical learning rate: triangles between ``base_value`` and ``max_value``.

    Rule, with ``u = step_size_up``, ``d = step_size_down`` (``u`` if None),
    ``T = u + d``, the cycle number ``k = c // T + 1`` and ``p = c - (k - 1) T``::

        h(c) = p / u            if p <= u      (rising)
        h(c) = (T - p) / d      otherwise      (falling)
        eta(c) = base_value + (max_value - base_value) * h(c) * s(c)

    with the amplitude scale ``s``: ``1`` for ``"triangular"``, ``0.5 ** (k - 1)`` for
    ``"triangular2"``, ``gamma ** c`` for ``"exp_range"``. A custom ``scale_fn``
    replaces the mode (which is then ignored, as in torch) and receives ``k`` when
    ``scale_mode="cycle"`` or ``c`` when ``scale_mode="iterations"``, as an int32 array:
    it must be written with ``jnp`` operations. ``scale_mode`` matters only with a
    custom ``scale_fn``: torch resets it to ``"cycle"`` for the two triangular modes and
    to ``"iterations"`` for ``"exp_range"``.

    Args:
      base_value: the rate at the start of each cycle, a finite number ``>= 0``.
      max_value: the rate at the peak (before scaling), a finite number ``>= 0``.
      step_size_up: steps from base to peak, a positive integer.
      step_size_down: steps from peak back to base, an integer ``>= 0``; None: ``u``.
      mode: ``"triangular"``, ``"triangular2"`` or ``"exp_range"``.
      gamma: the ``"exp_range"`` factor, ``> 0``.
      scale_fn: a custom amplitude scale (jittable), or None.
      scale_mode: ``"cycle"`` or ``"iterations"``: what ``scale_fn`` receives.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.cyclic(0.1, 0.5, step_size_up=2, mode="triangular2")
      >>> [round(float(s(c)), 6) for c in range(7)]
      [0.1, 0.3, 0.5, 0.3, 0.1, 0.2, 0.3]

    References:
      Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017);
      ``torch.optim.lr_scheduler.CyclicLR``'s learning rate (its momentum is
      :func:`cyclic_momentum`). torch sets the optimizer's rate to ``base_lr`` when the
      scheduler is built, whatever ``lr`` the optimizer was given.
    """
    base_value = _check_real("base_value", base_value, low=0.0)
    max_value = _check_real("max_value", max_value, low=0.0)
    weight, bounded = _cyclic_weight(
        step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode
    )
    height = max_value - base_value

    def schedule(count):
        return base_value + height * weight(count)

    return _with_range(schedule, base_value, max_value) if bounded else schedule


def cyclic_momentum(
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    base_momentum: float = 0.8,
    max_momentum: float = 0.9,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[jax.Array], ArrayLike] | None = None,
    scale_mode: str = "cycle",
) -> Schedule:
    """The momentum ``CyclicLR`` sets (``cycle_momentum=True``): :func:`cyclic`, inverted.

    Rule, with ``h`` and ``s`` those of :func:`cyclic` for the same arguments::

        mu(c) = max_momentum - (max_momentum - base_momentum) * h(c) * s(c)

    so the momentum is ``max_momentum`` where the rate is lowest and
    ``base_momentum`` at the rate's peak. Pass it as the momentum of
    :func:`sgdjax.sgd` together with :func:`cyclic` as its learning rate.

    Args:
      step_size_up: as :func:`cyclic`.
      step_size_down: as :func:`cyclic`.
      base_momentum: the momentum at the peak of the rate, in ``[0, 1)``.
      max_momentum: the momentum at the start of each cycle, in ``[0, 1)``.
      mode: as :func:`cyclic`.
      gamma: as :func:`cyclic`.
      scale_fn: as :func:`cyclic`.
      scale_mode: as :func:`cyclic`.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.cyclic_momentum(step_size_up=2)
      >>> [round(float(s(c)), 6) for c in range(5)]
      [0.9, 0.85, 0.8, 0.85, 0.9]

    References:
      ``torch.optim.lr_scheduler.CyclicLR`` (its ``base_momentum``,
      ``max_momentum``; same defaults).
    """
    base_momentum = _check_real(
        "base_momentum", base_momentum, low=0.0, high=1.0, high_inclusive=False
    )
    max_momentum = _check_real(
        "max_momentum", max_momentum, low=0.0, high=1.0, high_inclusive=False
    )
    weight, bounded = _cyclic_weight(
        step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode
    )
    height = max_momentum - base_momentum

    def schedule(count):
        return max_momentum - height * weight(count)

    return _with_range(schedule, base_momentum, max_momentum) if bounded else schedule


def one_cycle_momentum(
    total_steps: int,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The momentum ``OneCycleLR`` sets (``cycle_momentum=True``), opposite to the rate.

    Rule: the phases of :func:`one_cycle` with the same ``total_steps``,
    ``pct_start`` and ``three_phase``, annealed the same way, through::

        two phases:   max_momentum -> base_momentum -> max_momentum
        three phases: max_momentum -> base_momentum -> max_momentum -> max_momentum

    so ``torch.optim.SGD`` with ``OneCycleLR``'s defaults is ``sgdjax.sgd(
    one_cycle(max_lr, T), momentum=one_cycle_momentum(T), ...)``.

    Args:
      total_steps: the length of the cycle, a positive integer.
      base_momentum: the momentum at the peak of the rate, in ``[0, 1)``.
      max_momentum: the momentum at the start and the end, in ``[0, 1)``.
      pct_start: as :func:`one_cycle`.
      anneal_strategy: ``"cos"`` or ``"linear"``.
      three_phase: as :func:`one_cycle`.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.one_cycle_momentum(total_steps=100)
      >>> [round(float(s(c)), 6) for c in (0, 29, 99)]
      [0.95, 0.85, 0.95]

    References:
      ``torch.optim.lr_scheduler.OneCycleLR`` (same defaults). torch overwrites the
      optimizer's momentum with ``max_momentum`` when the scheduler is built.
    """
    total_steps = _check_int("total_steps", total_steps)
    base_momentum = _check_real(
        "base_momentum", base_momentum, low=0.0, high=1.0, high_inclusive=False
    )
    max_momentum = _check_real(
        "max_momentum", max_momentum, low=0.0, high=1.0, high_inclusive=False
    )
    pct_start = _check_real(
        "pct_start", pct_start, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    values = [(max_momentum, base_momentum), (base_momentum, max_momentum)]
    if three_phase:
        values.append((max_momentum, max_momentum))
    ends = _one_cycle_ends(total_steps, pct_start, three_phase)
    schedule = _phase_schedule(total_steps, ends, values, anneal_strategy)
    return _with_range(schedule, base_momentum, max_momentum)


def lambda_factor(init_value: float, factor_fn: Callable[[jax.Array], ArrayLike]) -> Schedule:
    """``init_value`` times a factor computed from the count.

    Rule::

        eta(c) = init_value * factor_fn(c)

    ``factor_fn`` receives the count as an int32 array and must be written with ``jnp``
    operations (torch calls it on a Python int).

    Args:
      init_value: the optimizer's initial rate, a finite number ``>= 0``.
      factor_fn: a jittable function of the count.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.lambda_factor(0.5, lambda c: 0.9 ** c)
      >>> round(float(s(2)), 6)
      0.405

    References:
      ``torch.optim.lr_scheduler.LambdaLR``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    if not callable(factor_fn):
        raise ValueError(f"factor_fn must be a callable, got {factor_fn!r}")

    def schedule(count):
        count = jnp.maximum(_count(count), 0)
        return init_value * jnp.asarray(factor_fn(count), jnp.float32)

    return schedule


def multiplicative(
    init_value: float, factor_fn: Callable[[int], float], total_steps: int
) -> Schedule:
    """Multiplies the rate by ``factor_fn(c)`` at every step ``c = 1, 2, ...``.

    Rule::

        eta(c) = init_value * prod_{k=1}^{min(c, total_steps)} factor_fn(k)

    ``factor_fn`` is called once per step on the Python ints ``1..total_steps`` when
    the schedule is built (it need not be jittable), and the running product is
    formed in float64 in torch's order, then rounded once to float32: the values are
    torch's to float32 rounding. From ``total_steps`` on the rate holds.

    Args:
      init_value: the rate at count 0, a finite number ``>= 0``.
      factor_fn: ``k -> factor``, finite and ``>= 0`` for ``k = 1..total_steps``.
      total_steps: the number of steps tabulated, a positive integer (the table takes
        ``4 * total_steps`` bytes).

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.multiplicative(1.0, lambda k: 0.5, total_steps=3)
      >>> [round(float(s(c)), 6) for c in range(5)]
      [1.0, 0.5, 0.25, 0.125, 0.125]

    References:
      ``torch.optim.lr_scheduler.MultiplicativeLR``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    if not callable(factor_fn):
        raise ValueError(f"factor_fn must be a callable, got {factor_fn!r}")
    total_steps = _check_int("total_steps", total_steps)
    values = [init_value]
    for step in range(1, total_steps + 1):
        factor = _check_real(f"factor_fn({step})", factor_fn(step), low=0.0)
        values.append(values[-1] * factor)
    table = np.asarray(values, np.float64)
    if not np.all(np.isfinite(table)):
        raise ValueError(f"factor_fn makes the rate overflow within total_steps={total_steps}")
    table32 = table.astype(np.float32)

    def schedule(count):
        return jnp.asarray(table32)[jnp.clip(_count(count), 0, total_steps)]

    return _with_range(schedule, float(table.min()), float(table.max()))


def chained(init_value: float, schedules: Sequence[Schedule]) -> Schedule:
    """Several schedules applied at once: the product of their factors.

    Rule, with ``s_i`` the given schedules, each built with the same ``init_value``::

        eta(c) = init_value * prod_i (s_i(c) / init_value)

    This is ``torch.optim.lr_scheduler.ChainedScheduler`` of the torch counterparts of
    ``schedules``, for the schedulers whose ``step()`` multiplies the rate by a factor
    (``ConstantLR``, ``LinearLR``, ``StepLR``, ``MultiStepLR``, ``ExponentialLR``,
    ``PolynomialLR``, ``MultiplicativeLR``; also ``CosineAnnealingLR`` with
    ``eta_min=0`` before ``T_max``). Schedulers that set the rate outright
    (``LambdaLR``, ``OneCycleLR``, ``CyclicLR``, ``CosineAnnealingWarmRestarts``)
    make torch's chain keep only the last such value, which this product does not.

    Args:
      init_value: the optimizer's initial rate, a finite number ``>= 0``.
      schedules: one or more schedules.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.chained(
      ...     1.0,
      ...     [schedules.constant_factor(1.0, factor=0.1, total_iters=2),
      ...      schedules.exponential_decay(1.0, gamma=0.5)],
      ... )
      >>> [round(float(s(c)), 6) for c in range(4)]
      [0.1, 0.05, 0.25, 0.125]

    References:
      ``torch.optim.lr_scheduler.ChainedScheduler``.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    schedules = list(schedules)
    if not schedules:
        raise ValueError(f"schedules must hold at least one schedule, got {schedules!r}")
    for index, item in enumerate(schedules):
        if not callable(item):
            raise ValueError(f"schedules[{index}] must be a schedule (callable), got {item!r}")

    def schedule(count):
        count = _count(count)
        value = jnp.full(jnp.shape(count), init_value, jnp.float32)
        if init_value == 0.0:
            return value
        for item in schedules:
            value = value * (jnp.asarray(item(count), jnp.float32) / np.float32(init_value))
        return value

    return schedule


def swa_lr(
    init_value: float, swa_value: float, anneal_steps: int = 10, anneal_strategy: str = "cos"
) -> Schedule:
    """Anneals from ``init_value`` to ``swa_value`` over ``anneal_steps``, then holds it.

    Rule, with ``A = anneal_steps`` and ``t = min(c / A, 1)`` (``t = 1`` when
    ``A = 0``)::

        "cos":     alpha(t) = (1 - cos(pi t)) / 2
        "linear":  alpha(t) = t
        eta(c) = swa_value * alpha(t) + init_value * (1 - alpha(t))

    torch's ``SWALR.step()`` recovers the initial rate from the current one at every
    step and reapplies the rule, which equals this closed form up to float64 rounding
    when nothing else edits the rate.

    Args:
      init_value: the optimizer's rate when ``SWALR`` is built, a finite number ``>= 0``.
      swa_value: the rate held after annealing, a finite number ``>= 0``.
      anneal_steps: the length of the annealing, an integer ``>= 0``.
      anneal_strategy: ``"cos"`` or ``"linear"``.

    Returns:
      A schedule ``count -> float32``.

    Example:
      >>> from sgdjax import schedules
      >>> s = schedules.swa_lr(1.0, 0.1, anneal_steps=2, anneal_strategy="linear")
      >>> [round(float(s(c)), 6) for c in range(4)]
      [1.0, 0.55, 0.1, 0.1]

    References:
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
      Generalization" (UAI 2018); ``torch.optim.swa_utils.SWALR`` (its
      ``anneal_epochs``, here counted in calls of ``step()``).
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    swa_value = _check_real("swa_value", swa_value, low=0.0)
    anneal_steps = _check_int("anneal_steps", anneal_steps, minimum=0)
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    length = max(anneal_steps, 1)
    scale = np.float32(math.pi / (2 * length))

    def schedule(count):
        count = _count(count)
        done = jnp.clip(count, 0, length) if anneal_steps else jnp.full_like(count, length)
        left = (length - done).astype(jnp.float32)
        done = done.astype(jnp.float32)
        if anneal_strategy == "cos":
            weight_init, weight_swa = _half_cosines(done, left, scale)
            return init_value * weight_init + swa_value * weight_swa
        return (init_value * left + swa_value * done) / np.float32(length)

    return _with_range(schedule, init_value, swa_value)


class ReduceOnPlateauState(NamedTuple):
    """State of :class:`ReduceOnPlateau`.

    Attributes:
      learning_rate: float32 current rate.
      best: float32 best metric seen (``+inf`` or ``-inf`` before the first).
      num_bad_epochs: int32 epochs since the last improvement.
      cooldown_counter: int32 epochs of cooldown left.
    """

    learning_rate: jax.Array
    best: jax.Array
    num_bad_epochs: jax.Array
    cooldown_counter: jax.Array


@dataclasses.dataclass(frozen=True)
class ReduceOnPlateau:
    """Reduces the rate when a metric stops improving: ``torch``'s ``ReduceLROnPlateau``.

    Built by :func:`reduce_on_plateau`. ``init()`` gives the state, ``update(state,
    metric)`` takes one epoch's metric (jittable), ``value(state)`` is the rate.
    """

    init_value: float
    mode: str
    factor: float
    patience: int
    threshold: float
    threshold_mode: str
    cooldown: int
    min_value: float
    eps: float

    def init(self) -> ReduceOnPlateauState:
        """The state before any metric: rate ``init_value``, no best yet."""
        worst = math.inf if self.mode == "min" else -math.inf
        return ReduceOnPlateauState(
            learning_rate=jnp.asarray(self.init_value, jnp.float32),
            best=jnp.asarray(worst, jnp.float32),
            num_bad_epochs=jnp.zeros([], jnp.int32),
            cooldown_counter=jnp.zeros([], jnp.int32),
        )

    def _is_better(self, current: jax.Array, best: jax.Array) -> jax.Array:
        if self.threshold_mode == "rel":
            sign = -1.0 if self.mode == "min" else 1.0
            bar = best * np.float32(1.0 + sign * self.threshold)
        else:
            bar = (
                best - np.float32(self.threshold)
                if self.mode == "min"
                else best + np.float32(self.threshold)
            )
        return current < bar if self.mode == "min" else current > bar

    def update(self, state: ReduceOnPlateauState, metric: ArrayLike) -> ReduceOnPlateauState:
        """One call of ``ReduceLROnPlateau.step(metric)``: the state after one epoch."""
        current = jnp.asarray(metric, jnp.float32)
        better = self._is_better(current, state.best)
        best = jnp.where(better, current, state.best)
        bad = jnp.where(better, 0, jnp.minimum(state.num_bad_epochs, _INT32_MAX - 1) + 1)
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = jnp.where(
            in_cooldown, state.cooldown_counter - 1, state.cooldown_counter
        )
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > self.patience
        old = state.learning_rate
        new = jnp.maximum(old * np.float32(self.factor), np.float32(self.min_value))
        learning_rate = jnp.where(reduce & (old - new > np.float32(self.eps)), new, old)
        return ReduceOnPlateauState(
            learning_rate=learning_rate,
            best=best,
            num_bad_epochs=jnp.where(reduce, 0, bad).astype(jnp.int32),
            cooldown_counter=jnp.where(reduce, self.cooldown, cooldown_counter).astype(jnp.int32),
        )

    def value(self, state: ReduceOnPlateauState) -> jax.Array:
        """The current rate."""
        return state.learning_rate


def reduce_on_plateau(
    init_value: float,
    *,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_value: float = 0.0,
    eps: float = 1e-8,
) -> ReduceOnPlateau:
    """Multiplies the rate by ``factor`` after ``patience`` epochs without improvement.

    Rule, for each metric ``m`` passed to ``update`` (once per epoch), with ``b`` the
    best metric so far (``+inf`` in ``"min"`` mode, ``-inf`` in ``"max"``) and
    ``theta`` the threshold::

        better = m < b (1 - theta)   ("min", "rel")     m < b - theta   ("min", "abs")
                 m > b (1 + theta)   ("max", "rel")     m > b + theta   ("max", "abs")
        if better: b = m, bad = 0    else: bad = bad + 1
        if cooldown_left > 0: cooldown_left -= 1, bad = 0      (bad epochs ignored)
        if bad > patience:
            new = max(eta * factor, min_value)
            if eta - new > eps: eta = new              (a smaller change is skipped)
            cooldown_left = cooldown, bad = 0

    Unlike the other schedules this one depends on the metrics, not on the count, so
    it is an object with a state: ``p.init()``, ``p.update(state, metric)`` (pure and
    jittable) and ``p.value(state)``. Its rate drives an optimizer through
    :func:`sgdjax.inject_hyperparams`, written into the optimizer state once per epoch.
    The arithmetic is float32 (torch's is float64): after ``k`` reductions the rate is
    within ``k`` float32 roundings of torch's, and a metric within float32 rounding of
    the threshold may be judged differently.

    Args:
      init_value: the starting rate, a finite number ``>= 0``.
      mode: ``"min"`` (the metric should fall) or ``"max"``.
      factor: the reduction, in ``[0, 1)``.
      patience: bad epochs tolerated before reducing, an integer ``>= 0``.
      threshold: the improvement that counts, a finite number ``>= 0``.
      threshold_mode: ``"rel"`` or ``"abs"``.
      cooldown: epochs after a reduction during which bad epochs are not counted, an
        integer ``>= 0``.
      min_value: the floor of the rate (torch's ``min_lr``), a finite number ``>= 0``.
      eps: reductions smaller than this are skipped, a finite number ``>= 0``.

    Returns:
      A :class:`ReduceOnPlateau`.

    Example:
      >>> import jax.numpy as jnp, sgdjax
      >>> from sgdjax import schedules
      >>> plateau = schedules.reduce_on_plateau(0.1, patience=1)
      >>> tx = sgdjax.inject_hyperparams(sgdjax.sgd)(learning_rate=0.1, momentum=0.9)
      >>> opt_state, plateau_state = tx.init(jnp.zeros(2)), plateau.init()
      >>> for validation_loss in [1.0, 0.5, 0.6, 0.7]:   # one value per epoch
      ...     # (an epoch of training with tx here)
      ...     plateau_state = plateau.update(plateau_state, validation_loss)
      ...     opt_state.hyperparams["learning_rate"] = plateau.value(plateau_state)
      >>> round(float(opt_state.hyperparams["learning_rate"]), 6)
      0.01

    References:
      ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (same defaults; ``min_lr`` is
      ``min_value``); ``optax.contrib.reduce_on_plateau`` is a transform that scales
      the updates instead and counts patience differently.
    """
    init_value = _check_real("init_value", init_value, low=0.0)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    factor = _check_real("factor", factor, low=0.0, high=1.0, high_inclusive=False)
    patience = _check_int("patience", patience, minimum=0)
    threshold = _check_real("threshold", threshold, low=0.0)
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
    cooldown = _check_int("cooldown", cooldown, minimum=0)
    min_value = _check_real("min_value", min_value, low=0.0)
    eps = _check_real("eps", eps, low=0.0)
    return ReduceOnPlateau(
        init_value=init_value,
        mode=mode,
        factor=factor,
        patience=patience,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        min_value=min_value,
        eps=eps,
    )
