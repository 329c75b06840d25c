"""The training engine: every preset, parallel mode and step option through one loop.

* **Data on the devices.** The uint8 training and test sets are placed once: split
  over the data axis when it has more than one device (each device holds ``1/N`` of
  the rows, :meth:`Placement.take` gathers every batch), else replicated. Under
  several processes each process reads and places only its own devices' rows. Each
  epoch's order is drawn on the device from ``(seed, epoch)``; gathering, flips,
  crops, translation and normalization run inside the compiled program from keys of
  ``(seed, step)``.
* **Nothing before the lock.** Building an engine reads no more than the whitening
  sample and compiles nothing; the first run places the data and compiles
  (:meth:`Engine.prepare`) after it holds its output folder's lock.
* **Several steps per program.** A chunk of steps is one ``lax.scan``; metrics and
  the non-finite counter are summed on the device and read once per chunk, one chunk
  late, so the host never waits on the device between steps. How many steps a
  program runs is decided in one place, :func:`steps_per_program`.
* **Host-fed fallback.** When the data set does not fit beside the model
  (``Config.data_placement``), the host gathers the same batches in the same order
  and the same program runs on them; dispatch is asynchronous, so the next chunk's
  batches are gathered while the device runs the current one.

``train_and_evaluate`` runs one seed; :func:`train_seeds` runs several after one
compilation and reports mean and spread.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sgdjax
from sgdjax import data
from sgdjax._averaging import ema_init
from sgdjax.parallel import (
    DATA_AXIS,
    any_process,
    check_same_config,
    check_shared_directory,
    gather_to_host,
    is_primary,
)
from sgdjax.training import _checkpoint, _report
from sgdjax.training._config import Config, asgd_t0, make_optimizer
from sgdjax.training._models import choose_kernel_grad, create_model
from sgdjax.training._nnx import nnx_convnet_like
from sgdjax.training._parallel import Placement, make_placement, needs_bn_axis
from sgdjax.training._pipeline import augment_batch, epoch_order, lookahead_sync, run_keys
from sgdjax.training._preemption import Preempted, PreemptionGuard
from sgdjax.training._rundir import (
    claim_run_directory,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
from sgdjax.training._speednet import Whitened, kernel_from_covariance, patch_covariance
from sgdjax.training._state import TrainState
from sgdjax.training._step import example_keys, make_eval_step, make_train_step
from sgdjax.training._weight_averaging import averaged_params, with_averaged_weights

MAX_TOTAL_STEPS = 2**31 - 1  # the step counter is int32


class NonFiniteError(RuntimeError):
    """Raised when too many training steps in a row had non-finite gradients."""


class SetupError(ValueError):
    """The config does not fit the data or the devices (checked before any work)."""


# ---------------------------------------------------------------- the plan of a run


def steps_per_program(requested: int | None, available: int) -> int:
    """Steps (or evaluation batches) per compiled program: the one CPU exception.

    ``requested`` wins when given. Otherwise a whole epoch (``available``) per program
    on accelerators, and one per program on CPUs: XLA's CPU backend runs convolutions
    inside a loop many times slower than outside one (measured: 25x for the speed-run
    network, 20x for the ConvNet), so there the program is one step with no loop.
    """
    if requested is not None:
        return max(1, min(requested, available))
    return 1 if jax.default_backend() == "cpu" else max(1, available)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many steps a run takes: per full epoch, per epoch (the last may be partial)."""

    steps_per_epoch: int
    epoch_steps: tuple[int, ...]
    steps_per_call: int

    @property
    def total_steps(self) -> int:
        return sum(self.epoch_steps)

    def chunks(self, epoch: int) -> list[tuple[int, int]]:
        """``(first step, steps)`` of each program call in ``epoch`` (1-based)."""
        steps, size = self.epoch_steps[epoch - 1], self.steps_per_call
        return [(first, min(size, steps - first)) for first in range(0, steps, size)]


def plan_run(config: Config, num_train: int) -> Plan:
    """The run's step counts for ``num_train`` training examples.

    Raises:
      SetupError: the batch is larger than the training set, or the run would take
        more steps than the int32 step counter holds.
    """
    per_epoch = num_train // config.batch_size
    if per_epoch == 0:
        raise SetupError(
            f"batch size {config.batch_size} is larger than the {num_train} training images"
        )
    if config.max_steps is not None:
        per_epoch = min(per_epoch, config.max_steps)
    total = math.ceil(config.epochs * per_epoch)
    if total > MAX_TOTAL_STEPS:
        raise SetupError(
            f"epochs={config.epochs} makes {total} steps, more than the {MAX_TOTAL_STEPS} "
            "an int32 step counter holds"
        )
    epochs = [per_epoch] * (total // per_epoch) + ([total % per_epoch] if total % per_epoch else [])
    return Plan(per_epoch, tuple(epochs), steps_per_program(config.steps_per_call, per_epoch))


def subset_rows(total: int, count: int | None) -> np.ndarray:
    """The rows of a fixed random subset of ``count`` of ``total`` examples, increasing
    (all rows when ``count`` is None or larger)."""
    if count is None or count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(0).permutation(total)[:count])


def read_rows(images: Any, labels: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``images[rows], labels[rows]`` (labels as int32); a row ``-1`` is padding (zeros).

    ``images`` may be any array that reads only the rows it is indexed with (a
    memory-mapped cache, :func:`sgdjax.data.load_cifar10`'s lazy image folders).
    """
    rows = np.asarray(rows, np.int64)
    real = rows >= 0
    out_images = np.zeros((len(rows), *images.shape[1:]), images.dtype)
    out_labels = np.zeros(len(rows), np.int32)
    if real.any():
        out_images[real] = images[rows[real]]
        out_labels[real] = np.asarray(labels)[rows[real]]
    return out_images, out_labels


def fits_on_device(config: Config, dataset_bytes: int) -> bool:
    """``data_placement``'s rule: on the device unless the data take a quarter of its memory.

    ``dataset_bytes`` are the bytes one device holds (``1/N`` of the data set when it
    is split over ``N`` devices). Devices that report no memory limit (CPUs) always
    take the data.
    """
    if config.data_placement != "auto":
        return config.data_placement == "device"
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit is None or dataset_bytes < limit / 4


# ---------------------------------------------------------------- the compiled programs


def _evaluation_state(config: Config, state: TrainState) -> TrainState:
    """The model to score: schedule-free's averaged sequence, or the EMA, or the weights."""
    if config.optimizer == "schedule_free":
        state = state.replace(params=sgdjax.schedule_free_eval_params(state.opt_state))
    if config.ema_decay is not None:
        state = state.averaged(config.ema_decay)
    return state


def _scan_or_once(body: Callable, carry: Any, xs: Any, length: int):
    """``lax.scan(body, carry, xs)``, or one call with no loop when ``length`` is 1."""
    if length == 1:  # XLA's CPU backend runs convolutions inside loops many times slower
        carry, _ = body(carry, jax.tree.map(lambda x: x[0], xs))
        return carry
    carry, _ = jax.lax.scan(body, carry, xs)
    return carry


def _chunk_sums() -> dict[str, jax.Array]:
    zero = jnp.zeros([], jnp.float32)
    return {"loss": zero, "accuracy": zero, "steps": zero, "learning_rate": zero,
            "bad_in_a_row": jnp.zeros([], jnp.int32), "step": jnp.zeros([], jnp.int32)}  # fmt: skip


def _add_step(sums: dict[str, jax.Array], metrics: dict[str, jax.Array], state: TrainState):
    return {
        "loss": sums["loss"] + metrics["loss"],
        "accuracy": sums["accuracy"] + metrics["accuracy"],
        "steps": sums["steps"] + 1.0,
        "learning_rate": metrics["learning_rate"],
        "bad_in_a_row": jnp.maximum(sums["bad_in_a_row"], state.opt_state.consecutive_skipped),
        "step": state.step,
    }


def make_train_chunk(config: Config, plan: Plan, *, host_fed: bool, take: Callable,
                     **step_options) -> Callable:  # fmt: skip
    """``body(state, *inputs, epoch, first, axis_name, constrain, num_steps)``: steps
    ``first, ..., first + num_steps - 1`` of ``epoch`` and the chunk's metric sums.

    Device-resident inputs are ``(images, labels, order)``: the uint8 training set
    as placed and the epoch's order; ``take(images, labels, indices, axis_name)``
    (:meth:`Placement.take`) gathers each step's batch. Host-fed inputs are
    ``(images, labels, indices)`` stacked ``(num_steps, batch, ...)``. Both feed the
    same step.
    """
    steps = {
        axis: make_train_step(axis_name=axis, jit=False, **step_options)
        for axis in (None, DATA_AXIS)
    }
    lookahead = None
    if config.lookahead_period is not None:
        lookahead = functools.partial(
            lookahead_sync, total_steps=plan.total_steps, period=config.lookahead_period,
            decay=config.lookahead_decay, power=config.lookahead_decay_power,
        )  # fmt: skip

    def body(state, images, labels, order, epoch, first, *, axis_name, constrain, num_steps):
        if host_fed:
            xs = (images, labels, order)
        else:
            size = config.batch_size
            xs = jax.lax.dynamic_slice_in_dim(order, first * size, num_steps * size)
            xs = xs.reshape(num_steps, size)  # whole batches: take hands out the shares

        def one_step(carry, x):
            state, sums = carry
            batch_images, batch_labels, indices = (
                x if host_fed else take(images, labels, x, axis_name)
            )
            batch_images, batch_labels, indices = constrain((batch_images, batch_labels, indices))
            keys = run_keys(state.rng)
            per_example = example_keys(
                jax.random.fold_in(keys.steps, state.step), indices.shape[0], axis_name
            )
            batch_images = augment_batch(config, per_example, batch_images, indices, epoch,
                                         keys.flips)  # fmt: skip
            batch = {"image": data.normalize(batch_images), "label": batch_labels}
            state, metrics = steps[axis_name](state, batch)
            if lookahead is not None:
                state = lookahead(state)
            return (state, _add_step(sums, metrics, state)), None

        return _scan_or_once(one_step, (state, _chunk_sums()), xs, num_steps)

    return body


def make_eval_chunk(config: Config) -> Callable:
    """``evaluate(state, images, labels, mask, first, num_batches)``: summed loss, correct
    and count over batches ``first, ...`` of a test set stacked ``(batches, size, ...)``."""
    eval_step = make_eval_step(tta=config.tta, jit=False)

    def evaluate(state, images, labels, mask, first, *, num_batches, constrain):
        state = _evaluation_state(config, state)
        xs = jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, first, num_batches), (images, labels, mask)
        )

        def one_batch(totals, x):
            batch_images, batch_labels, batch_mask = constrain(x)
            batch = {"image": data.normalize(batch_images), "label": batch_labels,
                     "mask": batch_mask}  # fmt: skip
            sums = eval_step(state, batch)
            return jax.tree.map(jnp.add, totals, sums), None

        zero = jnp.zeros([], jnp.float32)
        totals = {"loss_sum": zero, "correct": zero, "count": zero}
        return _scan_or_once(one_batch, totals, xs, num_batches)

    return evaluate


# ---------------------------------------------------------------- the engine


@dataclasses.dataclass
class _Epoch:
    """What one epoch's chunks add up to (read from the device once per chunk)."""

    loss: float = 0.0
    accuracy: float = 0.0
    steps: int = 0
    learning_rate: float = math.nan
    bad_in_a_row: int = 0
    seconds: float = 0.0


class Engine:
    """One configuration's data, model and compiled programs, ready to train seeds.

    Building an engine checks the config against the data and the devices; the first
    :meth:`run` (after taking its folder's lock) places the data on the devices and
    compiles every program the run needs (:meth:`prepare`, reported as
    ``compile_seconds``); :meth:`run` trains one seed.
    """

    def __init__(self, config: Config, dataset: data.Dataset, *, log: Callable = print):
        self.config = config
        self.log = log if is_primary() else (lambda message: None)  # process 0 alone logs
        _report.code_commit()  # the commit this code came from, before a run can outlive it
        self.dataset = dataset  # read row by row: each process reads its devices' rows
        self._train_rows = subset_rows(len(dataset.train_images), config.train_subset)
        self._test_rows = subset_rows(len(dataset.test_images), config.test_subset)
        self.num_train, self.num_test = len(self._train_rows), len(self._test_rows)
        for name, asked, have in (("train_subset", config.train_subset, self.num_train),
                                  ("test_subset", config.test_subset, self.num_test)):  # fmt: skip
            if asked is not None and asked > have:
                self.log(
                    f"note: {name}={asked} is more than the {have} images there are; using {have}"
                )
        self.plan = plan_run(config, self.num_train)
        self.placement = self._check_devices()
        self.eval_placement = self.placement
        if config.parallel == "pmap":  # pmap's gathered state is scored by jit on its mesh
            self.eval_placement = dataclasses.replace(self.placement, mode="sharded")
        self.num_classes = len(dataset.class_names)
        micro = config.batch_size // config.accumulate
        self.kernel_grad = choose_kernel_grad(jax.default_backend(),
                                              micro // self.placement.num_devices)  # fmt: skip
        self.tx, self.schedule = make_optimizer(
            config, self.plan.steps_per_epoch, self.plan.total_steps
        )
        self.model = self._model()
        self._create = jax.jit(functools.partial(
            _create_state, self.model, self.tx, ema=config.ema_decay is not None,
            slow=config.lookahead_period is not None,
        ))  # fmt: skip
        self._whiten_images = None
        if config.whiten:  # every process needs the same sample for the same kernel
            sample = self._train_rows[: config.whiten_images]
            self._whiten_images = read_rows(dataset.train_images, dataset.train_labels, sample)[0]
        image_bytes = int(np.prod(dataset.train_images.shape[1:]))
        data_bytes = (self.num_train + self.num_test) * image_bytes
        shares = self.placement.num_devices if self.placement.shard_data else 1
        self.host_fed = not fits_on_device(config, data_bytes // shares)
        self.compile_seconds: float | None = None  # set by prepare
        self._statistics_images = None  # the training images, read when first scored

    def prepare(self) -> None:
        """Places the data and compiles every program the run needs (once).

        :meth:`run` calls it after taking its folder's lock, so a second run on a
        locked folder is refused before any of this work.
        """
        if self.compile_seconds is not None:
            return
        compile_start = time.perf_counter()
        self._place_data()
        self._compile()
        self.compile_seconds = time.perf_counter() - compile_start
        sizes = sorted(self._train_programs)
        self.log(f"compiled in {self.compile_seconds:.1f} s (training programs of {sizes} steps, "
                 f"{self.kernel_grad} convolution kernel gradients)")  # fmt: skip

    # ------------------------------------------------------------ building
    def _check_devices(self) -> Placement:
        config, available = self.config, jax.device_count()
        if config.num_devices is not None and config.num_devices > available:
            raise SetupError(f"num_devices {config.num_devices}: only {available} device(s) exist")
        if config.parallel == "none" and jax.process_count() > 1:
            raise SetupError(
                f"parallel 'none' trains on one device; with {jax.process_count()} processes "
                "choose pmap, sharded, shard_map or zero"
            )
        placement = make_placement(config.parallel, config.num_devices)
        micro = config.batch_size // config.accumulate
        if micro % placement.num_devices:
            per_micro = "" if config.accumulate == 1 else f" (per micro-batch {micro})"
            raise SetupError(
                f"batch_size {config.batch_size}{per_micro} is not divisible by the device "
                f"count {placement.num_devices}"
            )
        return placement

    def _model(self, *, bn_axis: bool = True):
        config = self.config
        model = create_model(
            config.model,
            widths=config.widths,
            kernel_grad=self.kernel_grad,
            num_classes=self.num_classes,
            dtype=jnp.bfloat16 if config.bf16 else jnp.float32,
            bn_axis_name=DATA_AXIS if bn_axis and needs_bn_axis(config.parallel) else None,
        )
        if config.api == "nnx":  # the same network and initial weights, run through NNX
            return nnx_convnet_like(model)
        return Whitened(model, dtype=model.dtype) if config.whiten else model

    def _place_data(self):
        """The training set (unless host-fed) and the test set where the programs read
        them; each process reads from disk only the rows its devices hold."""
        dataset, placement = self.dataset, self.placement
        self.train_data = None
        if self.host_fed:
            self._host_train = read_rows(dataset.train_images, dataset.train_labels,
                                         self._train_rows)  # fmt: skip
        else:
            kind = placement.data_kind()
            shares = placement.num_devices if placement.shard_data else 1
            length = -(-self.num_train // shares) * shares  # padded to whole shares
            rows = np.full(length, -1)
            rows[: self.num_train] = self._train_rows
            local = read_rows(dataset.train_images, dataset.train_labels,
                              rows[placement.own_rows(kind, length)])  # fmt: skip
            self.train_data = tuple(placement.place_local(x, kind, length) for x in local)
        evaluating = self.eval_placement
        shares = evaluating.num_devices if evaluating.shard_data else 1
        size = min(self.config.eval_batch_size, self.num_test)
        size = -(-size // shares) * shares  # the mask hides the padding
        batches = -(-self.num_test // size)
        rows = np.full(batches * size, -1)
        rows[: self.num_test] = self._test_rows
        kind = evaluating.data_kind(stacked=True)
        own = rows.reshape(batches, size)[:, evaluating.own_rows(kind, size)]
        images, labels = read_rows(dataset.test_images, dataset.test_labels, own.ravel())
        mask = (own >= 0).astype(np.float32)
        stacked = (images.reshape(*own.shape, *images.shape[1:]), labels.reshape(own.shape), mask)
        self.test_data = tuple(evaluating.place_local(x, kind, size) for x in stacked)
        self.eval_batches = batches
        self._order = jax.jit(epoch_order, static_argnums=2)

    def _initial_state(self, seed: int) -> TrainState:
        """A fresh state for ``seed``: init, the whitening kernel set, optimizer state."""
        config = self.config
        kernel = None
        if config.whiten:
            covariance = _patch_covariance(self._whiten_images)
            kernel = jnp.asarray(kernel_from_covariance(np.asarray(covariance),
                                                        eps=config.whiten_eps))  # fmt: skip
        return self._create(jax.random.key(seed), kernel)

    def _compile(self):
        config, plan, placement = self.config, self.plan, self.placement
        self._like = self._initial_state(config.seed)
        placed = placement.place_state(self._like)
        body = make_train_chunk(
            config, plan, host_fed=self.host_fed, take=placement.take,
            learning_rate_fn=self.schedule,
            label_smoothing=config.label_smoothing, accumulate=config.accumulate,
            sam_rho=config.sam_rho, ema_decay=config.ema_decay,
        )  # fmt: skip
        data_kind = placement.data_kind()
        kinds = ("steps_batch",) * 3 if self.host_fed else (data_kind, data_kind, "replicated")
        sizes = sorted({size for epoch in range(1, len(plan.epoch_steps) + 1)
                        for _, size in plan.chunks(epoch)})  # fmt: skip
        self._train_programs = {}
        for size in sizes:
            program = placement.compile(
                _keyword_scalars(body, num_steps=size), (*kinds, "scalar", "scalar")
            )
            if placement.mode == "pmap" and jax.process_count() > 1:
                # pmap's ahead-of-time executables expect global shapes under several
                # processes, its calls local ones: compiled at the first call instead.
                self._train_programs[size] = program
                continue
            inputs = self._train_inputs(1, 0, size, self._placed_order(self._like.rng, 1))
            self._train_programs[size] = program.lower(placed, *inputs).compile()
        eval_body = make_eval_chunk(config)
        eval_size = steps_per_program(config.steps_per_call, self.eval_batches)
        self._eval_chunks = [(first, min(eval_size, self.eval_batches - first))
                             for first in range(0, self.eval_batches, eval_size)]  # fmt: skip
        like = self.eval_placement.place_state(self._like)
        self._eval_programs = {}
        for size in sorted({size for _, size in self._eval_chunks}):
            program = _compile_eval(eval_body, self.eval_placement, size)
            self._eval_programs[size] = program.lower(like, *self.test_data, np.int32(0)).compile()

    def _placed_order(self, rng: jax.Array, epoch: int):
        """The epoch's example order, where the programs read it (host-fed: on the host)."""
        order = self._order(rng, np.int32(epoch), self.num_train)
        return np.asarray(order) if self.host_fed else self.placement.place(order, "replicated")

    def _train_inputs(self, epoch: int, first: int, size: int, order) -> tuple:
        """The program's inputs for steps ``first, ..., first + size - 1`` of ``epoch``."""
        scalars = (np.int32(epoch), np.int32(first))
        if not self.host_fed:
            images, labels = self.train_data
            return (images, labels, order, *scalars)
        batch = self.config.batch_size
        indices = order[first * batch : (first + size) * batch].reshape(size, batch)
        images, labels = self._host_train
        stacked = (images[indices], labels[indices], indices.astype(np.int32))
        return (*(self.placement.place(x, "steps_batch") for x in stacked), *scalars)

    # ------------------------------------------------------------ one epoch
    def train_epoch(self, placed: Any, rng: jax.Array, epoch: int, progress, *, start: int = 0,
                    after_chunk: Callable | None = None) -> tuple[Any, _Epoch]:  # fmt: skip
        """Runs ``epoch``'s chunks; reads each chunk's sums after dispatching the next.

        ``rng`` is the run's key (``TrainState.rng``, constant over the run). The epoch
        starts at its step ``start`` (a mid-epoch checkpoint's, on a chunk boundary);
        ``after_chunk(placed, first, size)`` runs after each chunk is dispatched (the
        step checkpoints and the preemption check).
        """
        self.prepare()
        totals, pending = _Epoch(), None
        start_time = time.perf_counter()
        order = self._placed_order(rng, epoch)
        for first, size in self.plan.chunks(epoch):
            if first + size <= start:
                continue
            if first < start:
                raise SetupError(
                    f"the checkpoint stopped at step {start} of epoch {epoch}, inside a program "
                    f"of {size} steps; resume with the steps_per_call it was written with"
                )
            inputs = self._train_inputs(epoch, first, size, order)
            placed, sums = self._train_programs[size](placed, *inputs)
            if pending is not None:
                self._absorb(totals, pending, progress)
            pending = sums
            if after_chunk is not None:
                after_chunk(placed, first, size)
        if pending is not None:
            self._absorb(totals, pending, progress)
        totals.seconds = time.perf_counter() - start_time
        return placed, totals

    def _absorb(self, totals: _Epoch, sums, progress) -> None:
        """Adds one chunk's sums (the one read that waits on the device)."""
        values = gather_to_host(self.placement.first(sums))
        totals.loss += float(values["loss"])
        totals.accuracy += float(values["accuracy"])
        totals.steps += int(values["steps"])
        totals.learning_rate = float(values["learning_rate"])
        totals.bad_in_a_row = max(totals.bad_in_a_row, int(values["bad_in_a_row"]))
        progress(int(values["steps"]), totals)
        if totals.bad_in_a_row >= self.config.max_bad_steps:
            raise NonFiniteError(
                f"{totals.bad_in_a_row} steps in a row had non-finite gradients (up to step "
                f"{int(values['step'])}); stopping"
            )

    def scored_state(self, state: TrainState) -> TrainState:
        """``state``, or once ASGD or SWA averages, the average with BatchNorm statistics
        recomputed over the training images (see ``_weight_averaging``)."""
        config = self.config
        t0 = asgd_t0(config, self.plan.total_steps) if config.optimizer == "asgd" else None
        params = averaged_params(state.opt_state, t0)
        if params is None:
            return state
        if self._statistics_images is None:
            self._statistics_images = read_rows(
                self.dataset.train_images, self.dataset.train_labels, self._train_rows
            )[0]
            self._statistics_model = self._model(bn_axis=False)
        return with_averaged_weights(self._statistics_model, state, params,
                                     self._statistics_images, config.batch_size)  # fmt: skip

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Test loss and accuracy of ``state`` (the EMA, schedule-free, ASGD or SWA
        average if kept: :meth:`scored_state`)."""
        placed = self.eval_placement.place_state(self.scored_state(state))
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        pending = [self._eval_programs[size](placed, *self.test_data, np.int32(first))
                   for first, size in self._eval_chunks]  # fmt: skip
        for sums in gather_to_host(pending):
            for key in totals:
                totals[key] += float(sums[key])
        count = max(totals["count"], 1.0)
        return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}

    # ------------------------------------------------------------ one run
    def run(self, seed: int, workdir: str | os.PathLike, *, resume: bool = False,
            progress: bool = True,
            accept_config_changes: bool = False) -> dict[str, Any]:  # fmt: skip
        """Trains seed ``seed``, writing logs, plots and checkpoints into ``workdir``.

        ``resume`` continues from the newest readable checkpoint (mid-epoch ones too),
        refusing a changed config unless ``accept_config_changes``. On SIGTERM or
        SIGINT the run saves after the current chunk and raises
        :class:`sgdjax.training.Preempted`.
        """
        config = dataclasses.replace(self.config, seed=seed)
        run = _Run(self, config, Path(workdir), progress=progress,
                   accept_config_changes=accept_config_changes)  # fmt: skip
        try:
            return run.train(resume)
        finally:
            run.close()

    def run_seeds(self, runs: int, workdir: str | os.PathLike, *, progress: bool = True):
        """Trains seeds ``config.seed, ..., config.seed + runs - 1`` with these programs.

        Each run writes its outputs into ``workdir/seed-S``; ``workdir/summary.json``
        gets the report: per run the accuracy, the seconds of initialisation, training
        and evaluation (no compilation, no checkpoint writing) and the steps; over runs
        the mean and sample standard deviation of accuracy and seconds; compile time
        apart.
        """
        if isinstance(runs, bool) or not isinstance(runs, int) or runs <= 0:
            raise ValueError(f"runs must be a positive integer, got {runs!r}")
        workdir, config = Path(workdir), self.config
        results = []
        for run in range(runs):
            seed = config.seed + run
            summary = self.run(seed, workdir / f"seed-{seed}", progress=progress)
            results.append(
                {
                    "seed": seed,
                    "accuracy": summary["test_accuracy"],
                    "seconds": summary["run_seconds"],
                    "steps": summary["steps"],
                }
            )
            self.log(f"run {run + 1}/{runs}  seed {seed}  accuracy {summary['test_accuracy']:.4f}"
                     f"  {summary['run_seconds']:.2f} s  ({summary['steps']} steps)")  # fmt: skip
        accuracies = [r["accuracy"] for r in results]
        seconds = [r["seconds"] for r in results]
        report = {
            "runs": results,
            "compile_seconds": self.compile_seconds,
            "accuracy_mean": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies, ddof=1)) if runs > 1 else math.nan,
            "seconds_mean": float(np.mean(seconds)),
            "seconds_std": float(np.std(seconds, ddof=1)) if runs > 1 else math.nan,
            "seconds_with_compile_mean": float(np.mean(seconds)) + self.compile_seconds,
            "steps_per_run": self.plan.total_steps,
            "data": {"train_examples": self.num_train, "test_examples": self.num_test},
            "config": dataclasses.asdict(config),
            "device": str(jax.devices()[0]),
            "environment": _report.environment(),
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
        return report

    def chunk_metrics(self, seed: int):
        """Trains ``seed`` without outputs, yielding each program call's mean metrics.

        Yields ``{"step", "loss", "accuracy", "learning_rate"}`` per chunk (per step
        with ``steps_per_call=1``); stop iterating to stop training (the learning-rate
        range test does).
        """
        self.prepare()
        state = self._initial_state(seed)
        rng = _kept(state.rng)
        placed = self.placement.place_state(state)
        for epoch in range(1, len(self.plan.epoch_steps) + 1):
            order = self._placed_order(rng, epoch)
            for first, size in self.plan.chunks(epoch):
                inputs = self._train_inputs(epoch, first, size, order)
                placed, sums = self._train_programs[size](placed, *inputs)
                values = gather_to_host(self.placement.first(sums))
                steps = float(values["steps"])
                yield {"step": int(values["step"]), "loss": float(values["loss"]) / steps,
                       "accuracy": float(values["accuracy"]) / steps,
                       "learning_rate": float(values["learning_rate"])}  # fmt: skip


def _kept(key: jax.Array) -> jax.Array:
    """A copy of a PRNG key that no program donates (on this process's default device)."""
    return gather_to_host(key)


def _host_int(value: Any) -> int:
    """``int(value)`` for a scalar that may be a global array spanning processes."""
    return int(gather_to_host(value))


def _keyword_scalars(body: Callable, **static) -> Callable:
    """``body`` with its static options bound and ``epoch``, ``first`` positional."""

    def bound(state, images, labels, order, epoch, first, *, axis_name, constrain):
        return body(state, images, labels, order, epoch, first, axis_name=axis_name,
                    constrain=constrain, **static)  # fmt: skip

    return bound


def _compile_eval(eval_body: Callable, placement: Placement, num_batches: int) -> Callable:
    constrain = lambda tree: tree  # noqa: E731
    if placement.mode in ("sharded", "zero", "shard_map"):
        from sgdjax.parallel import batch_sharding

        split = batch_sharding(placement.mesh)
        constrain = lambda tree: jax.lax.with_sharding_constraint(tree, split)  # noqa: E731
    return jax.jit(functools.partial(eval_body, num_batches=num_batches, constrain=constrain))


@jax.jit
def _patch_covariance(images):
    return patch_covariance(data.normalize(images))


def _create_state(model, tx, key, kernel, *, ema: bool, slow: bool) -> TrainState:
    """``TrainState.create``, with the whitening kernel (when given) set before the
    optimizer, the average and the slow weights start from the parameters."""
    state = TrainState.create(model=model, tx=tx, rng=key, sample_input=jnp.zeros((1, 32, 32, 3)),
                              ema=ema, slow=slow)  # fmt: skip
    if kernel is None:
        return state
    params = dict(state.params)
    params["whiten"] = dict(params["whiten"], kernel=kernel)
    variables = {"params": params, **state.model_state}
    return state.replace(
        params=params,
        opt_state=tx.init(params),
        ema=ema_init(variables) if ema else None,
        slow=variables if slow else None,
    )


# ---------------------------------------------------------------- what one run writes


class _Run:
    """One seed's loop and its outputs: metrics.jsonl, summary.json, plots, checkpoints."""

    def __init__(self, engine: Engine, config: Config, workdir: Path, *, progress: bool,
                 accept_config_changes: bool = False):  # fmt: skip
        self.engine, self.config, self.workdir = engine, config, workdir
        self.show_progress, self.accept_config_changes = progress, accept_config_changes
        self.primary = is_primary()  # process 0 alone writes logs, plots and the summary
        check_same_config(dataclasses.asdict(config))
        workdir.mkdir(parents=True, exist_ok=True)
        check_shared_directory(workdir)
        self.lock = claim_run_directory(workdir)  # before any placement or compilation
        if self.lock is not None and self.lock.note:
            engine.log(f"note: {self.lock.note}")
        self.metrics_path = workdir / "metrics.jsonl"
        self.checkpoints = _checkpoint.Checkpointer(workdir / "checkpoints")
        self.saved_epoch: int | None = None
        self.saved_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.guard = PreemptionGuard()
        self.scalars = None
        if config.tensorboard and self.primary:
            from sgdjax.training._tensorboard import ScalarWriter

            self.scalars = ScalarWriter(workdir / "tensorboard")

    def close(self) -> None:
        self.checkpoints.close()
        if self.lock is not None:
            self.lock.release()
        if self.scalars is not None:
            self.scalars.close()

    def train(self, resume: bool) -> dict[str, Any]:
        engine = self.engine
        engine.prepare()  # data placed and programs compiled only now, under the lock
        wall_start = time.perf_counter()
        state, start_epoch, history = self._start(resume)
        self.history = history
        start_step = _host_int(state.step) - sum(engine.plan.epoch_steps[:start_epoch])
        init_seconds = time.perf_counter() - wall_start
        rng = _kept(state.rng)  # the run's key outlives the donated states
        placed = engine.placement.place_state(state)
        with self.guard:
            return self._epochs(placed, rng, start_epoch, start_step, history, wall_start,
                                init_seconds)  # fmt: skip

    def _epochs(self, placed, rng, start_epoch, start_step, history, wall_start, init_seconds):
        engine, config = self.engine, self.config
        train_seconds = eval_seconds = 0.0
        steps_timed = 0
        for epoch in range(start_epoch + 1, len(engine.plan.epoch_steps) + 1):
            with self._progress_bar(epoch) as progress:
                try:
                    placed, train = engine.train_epoch(
                        placed, rng, epoch, progress, start=start_step,
                        after_chunk=functools.partial(self._after_chunk, epoch),
                    )  # fmt: skip
                except NonFiniteError as error:
                    raise NonFiniteError(f"{error}. {self._checkpoint_note()}") from None
            start_step = 0
            train_seconds += train.seconds
            steps_timed += train.steps
            state = engine.placement.gather_state(placed)
            tick = time.perf_counter()
            test = engine.evaluate(state) if self._due(epoch, config.eval_every) else None
            eval_seconds += time.perf_counter() - tick
            history.append(self._log_epoch(epoch, state, train, test))
            if self._due(epoch, config.checkpoint_every) or self._steps_due(
                _host_int(state.step), engine.plan.chunks(epoch)[-1][1]
            ):
                self._save(state, epoch)
            if self.guard.should_stop(any_process):
                self._stop(state, epoch)
        wall_seconds = time.perf_counter() - wall_start
        return self._summary(history, wall_seconds, train_seconds, eval_seconds, init_seconds,
                             steps_timed)  # fmt: skip

    # ------------------------------------------------------------ helpers, one per concern
    def _start(self, resume: bool) -> tuple[TrainState, int, list[dict[str, Any]]]:
        """A fresh state, or the newest good checkpoint's with its metrics rows."""
        engine = self.engine
        fresh = engine._initial_state(self.config.seed)
        history: list[dict[str, Any]] = []
        start_epoch = 0
        if resume:
            restored = self.checkpoints.restore_latest(
                fresh, config=dataclasses.asdict(self.config),
                accept_config_changes=self.accept_config_changes,
            )  # fmt: skip
            if restored is not None:
                fresh, start_epoch, note, saved_config = restored
                self.saved_epoch, self.saved_step = start_epoch, _host_int(fresh.step)
                engine.log(note)
                if start_epoch > len(engine.plan.epoch_steps):
                    raise ValueError(
                        f"the checkpoint in {self.checkpoints.directory} is of epoch "
                        f"{start_epoch}, past this run's last epoch "
                        f"{len(engine.plan.epoch_steps)} (epochs={self.config.epochs})"
                    )
                rows, dropped = read_jsonl(self.metrics_path)
                if dropped:
                    engine.log(f"note: {self.metrics_path}: dropped {'; '.join(dropped)}")
                history = [row for row in rows if row["epoch"] <= start_epoch]
        if self.primary:
            write_jsonl_atomic(self.metrics_path, history)
        return fresh, start_epoch, history

    def _steps_due(self, step: int, size: int) -> bool:
        """Whether the last ``size`` steps, up to global ``step``, crossed a multiple of
        ``checkpoint_every_steps``."""
        every = self.config.checkpoint_every_steps
        return every > 0 and step // every != (step - size) // every

    def _after_chunk(self, epoch: int, placed: Any, first: int, size: int) -> None:
        """Mid-epoch: the step checkpoint when due, and the preemption check."""
        if first + size >= self.engine.plan.epoch_steps[epoch - 1]:
            return  # the epoch's end logs, saves and checks
        step = sum(self.engine.plan.epoch_steps[: epoch - 1]) + first + size
        due = self._steps_due(step, size)
        stop = self.guard.should_stop(any_process)
        if due or stop:
            state = self.engine.placement.gather_state(placed)
            self._save(state, epoch - 1)
            if stop:
                self._stop(state, epoch - 1)

    def _save(self, state: TrainState, epoch: int) -> None:
        """The checkpoint of ``state`` (``epoch`` whole epochs done), unless just written."""
        step = _host_int(state.step)
        if step != self.saved_step:
            self.checkpoints.save(step, state, dataclasses.asdict(self.config), epoch=epoch)
            self.saved_step, self.saved_epoch = step, epoch

    def _stop(self, state: TrainState, epoch: int) -> None:
        """Saves (if not saved at this step) and raises :class:`Preempted`."""
        self._save(state, epoch)
        name = self.guard.signal_name or "a signal on another process"
        raise Preempted(
            f"stopped by {name} at step {self.saved_step} (epoch {epoch} done); checkpoint "
            f"in {self.checkpoints.directory}; continue with --resume",
            step=self.saved_step, directory=str(self.checkpoints.directory),
        )  # fmt: skip

    def _checkpoint_note(self) -> str:
        if self.saved_epoch is None:
            return "No checkpoint was written"
        directory = self.checkpoints.directory
        return f"The last good checkpoint (epoch {self.saved_epoch}) is in {directory}"

    def _due(self, epoch: int, every: int) -> bool:
        last = len(self.engine.plan.epoch_steps)
        return epoch == last or (every > 0 and epoch % every == 0)

    def _progress_bar(self, epoch: int):
        from contextlib import contextmanager

        from tqdm import tqdm

        @contextmanager
        def bar():
            total = self.engine.plan.epoch_steps[epoch - 1]
            last = len(self.engine.plan.epoch_steps)
            shown = tqdm(total=total, desc=f"epoch {epoch}/{last}",
                         disable=not (self.show_progress and self.primary),
                         leave=False)  # fmt: skip

            def update(steps: int, totals: _Epoch) -> None:
                shown.set_postfix(loss=f"{totals.loss / max(totals.steps, 1):.3f}",
                                  acc=f"{totals.accuracy / max(totals.steps, 1):.3f}")  # fmt: skip
                shown.update(steps)

            try:
                yield update
            finally:
                shown.close()

        return bar()

    def _log_epoch(self, epoch: int, state: TrainState, train: _Epoch, test) -> dict[str, Any]:
        """One metrics row: written to metrics.jsonl, TensorBoard and the terminal."""
        config = self.config
        steps = max(train.steps, 1)
        row = {
            "epoch": epoch,
            "step": _host_int(state.step),
            "train_loss": train.loss / steps,
            "train_accuracy": train.accuracy / steps,
            "test_loss": None if test is None else test["loss"],
            "test_accuracy": None if test is None else test["accuracy"],
            "learning_rate": train.learning_rate,
            "skipped_steps": _host_int(state.opt_state.skipped_steps),
            "epoch_seconds": train.seconds,
            "images_per_second": train.steps * config.batch_size / max(train.seconds, 1e-9),
        }
        if config.diagnostics:  # global arrays under several processes: read collectively
            metrics = gather_to_host(sgdjax.diagnostics_metrics(state.opt_state))
            row["diagnostics"] = {name: float(value) for name, value in metrics.items()}
        if self.primary:  # the whole file, atomically: a crash leaves the old one
            write_jsonl_atomic(self.metrics_path, [*self.history, row])
        if self.scalars is not None:
            numbers = {k: v for k, v in row.items() if isinstance(v, float) and k != "epoch"}
            self.scalars.scalars(row["step"], numbers)
        tested = "" if test is None else (
            f"  test loss {row['test_loss']:.4f}  test acc {row['test_accuracy']:.4f}"
        )  # fmt: skip
        self.engine.log(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  "
            f"train acc {row['train_accuracy']:.4f}{tested}  "
            f"{row['images_per_second']:.0f} img/s"
        )
        return row

    def _summary(self, history, wall_seconds, train_seconds, eval_seconds, init_seconds,
                 steps_timed) -> dict[str, Any]:  # fmt: skip
        """summary.json: final accuracy, timings (compile apart), data, config, environment."""
        engine, config = self.engine, self.config
        if self.primary:
            _report.plot_curves(history, self.workdir / "curves.png")
        if config.diagnostics and history and self.primary:
            _report.plot_diagnostics(history, self.workdir / "diagnostics.png")
        final = history[-1] if history else {}
        summary = {
            "test_accuracy": final.get("test_accuracy"),
            "test_loss": final.get("test_loss"),
            "epochs": config.epochs,
            "steps": final.get("step"),
            "wall_seconds": wall_seconds,
            "compile_seconds": engine.compile_seconds,
            "train_seconds_excluding_compile": train_seconds,
            "run_seconds": init_seconds + train_seconds + eval_seconds,
            "images_per_second": steps_timed * config.batch_size / max(train_seconds, 1e-9),
            "data": {
                "train_examples": engine.num_train,
                "test_examples": engine.num_test,
                "placement": "host" if engine.host_fed else "device",
            },  # fmt: skip
            "kernel_grad": engine.kernel_grad,
            "config": dataclasses.asdict(config),
            "environment": _report.environment(),
        }
        if self.primary:
            write_json_atomic(self.workdir / "summary.json", summary)
        return summary


# ---------------------------------------------------------------- entry points


def _dataset(dataset: data.Dataset | None, data_dir) -> data.Dataset:
    return dataset if dataset is not None else data.load_cifar10(data_dir)


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    dataset: data.Dataset | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains ``config`` on CIFAR-10 and writes logs, plots and checkpoints.

    Writes into ``workdir``: ``metrics.jsonl`` (one line per epoch), ``summary.json``
    (final accuracy, timings with compile time apart, images/s, the effective data
    sizes, config, versions, hardware), ``curves.png``, ``tensorboard/`` (with
    ``config.tensorboard``) and ``checkpoints/`` (orbax; every
    ``config.checkpoint_every`` epochs and at the end).

    Args:
      config: the run's configuration.
      workdir: the output directory (created if needed).
      data_dir: where CIFAR-10 is (see :func:`sgdjax.data.load_cifar10`).
      resume: continue from the newest good checkpoint in ``workdir``.
      progress: show tqdm progress bars.
      dataset: arrays to use instead of loading (tests).
      log: where progress lines go.

    Returns:
      The summary dict also written to ``summary.json``.

    Raises:
      NonFiniteError: ``config.max_bad_steps`` steps in a row were not finite.
      ValueError: the data do not fit the config (batch larger than the data, a
        checkpoint past the run's end, a batch that does not split over the devices).
    """
    engine = Engine(config, _dataset(dataset, data_dir), log=log)
    return engine.run(config.seed, workdir, resume=resume, progress=progress)


def train_seeds(
    config: Config,
    workdir: str | os.PathLike,
    *,
    runs: int,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    dataset: data.Dataset | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains seeds ``config.seed, ..., config.seed + runs - 1`` after one compilation
    (see :meth:`Engine.run_seeds`)."""
    engine = Engine(config, _dataset(dataset, data_dir), log=log)
    return engine.run_seeds(runs, workdir, progress=progress)
