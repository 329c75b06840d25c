"""Learning-rate schedules that match ``torch.optim.lr_scheduler`` step for step.

A schedule is a pure, jittable function of the integer step count ``c >= 0`` that
returns a float32 value. The value at count ``c`` equals the learning rate of the
torch scheduler with the same arguments and defaults after ``c`` calls of
``scheduler.step()`` (count 0 is the rate right after constructing the scheduler).
An sgdjax or optax optimizer evaluates its schedule at the number of updates taken so
far, which is torch's behaviour when the scheduler is stepped once per optimizer step.

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
``SequentialLR([LinearLR, scheduler])``         :func:`warmup`
==============================================  ==========================

The count may be a Python int or an int32 array, traced or not; an array of counts
gives an array of rates of the same shape. Every factory checks its arguments when
called and raises a ``ValueError`` naming the argument and its value.

torch updates most schedulers recursively (``lr <- lr * factor``) in float64; here
each schedule is its closed form, evaluated in float32 so that the result is within
a few float32 roundings of torch's rate at every count, however long the run: powers
``gamma ** n`` come from float64 tables rather than from repeated float32 products,
and cosines and linear ramps are written without cancellation near their ends. The
two forms part ways only when something else also edits the optimizer's rate between
steps (torch's "chainable" schedulers), which a function of the count cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sgdjax._base import check_real as _check_real

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

    return schedule


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

    return schedule


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

    return schedule


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

    return schedule


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

    return schedule


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
    # (end step, value at the start, value at the end), as in torch, in float64.
    phases = [(float(pct_start * total_steps) - 1, initial, max_value)]
    if three_phase:
        phases.append((float(2 * pct_start * total_steps) - 2, max_value, initial))
        phases.append((float(total_steps - 1), initial, final))
    else:
        phases.append((float(total_steps - 1), max_value, final))
    ends = [end for end, _, _ in phases]
    if not all(b > a for a, b in zip([0.0, *ends], ends)):
        raise ValueError(
            f"total_steps={total_steps!r} with pct_start={pct_start!r} and "
            f"three_phase={three_phase!r} gives phase ends {ends}: some phase is empty"
        )

    # Per-phase tables. Phase boundaries are split into an integer and a fraction so
    # that c - t_0 and t_1 - c come out exact (or nearly) in float32.
    starts = [0.0, *ends[:-1]]
    start_whole = np.asarray([math.floor(t) for t in starts], np.int32)
    start_part = np.asarray([t - math.floor(t) for t in starts], np.float32)
    end_whole = np.asarray([math.floor(t) for t in ends], np.int32)
    end_part = np.asarray([t - math.floor(t) for t in ends], np.float32)
    lengths = np.asarray([b - a for a, b in zip(starts, ends)], np.float64)
    scales = (np.pi / (2 * lengths)).astype(np.float32)
    from_values = np.asarray([v for _, v, _ in phases], np.float32)
    to_values = np.asarray([v for _, _, v in phases], np.float32)
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

    return schedule


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

    return schedule


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

    return warmed
