"""Running several JAX processes on 127.0.0.1 for tests, and the workers they run.

:func:`run_processes` starts ``N`` Python processes, each with its own fake CPU
devices (``--xla_force_host_platform_device_count``), joined through
``jax.distributed`` with a coordinator on 127.0.0.1 at a port the OS chose as free
(the start is retried on a new port if another program took it in between); the
processes talk through gloo, JAX's CPU collectives. The whole group runs under one
hard time bound; when one process fails the others get a short grace and are then
killed; on every path (success, failure, timeout, an exception in the test) each
child still running is killed through its own process group, whose id is the
child's PID.

Run as a script, this file is a worker: ``python tests/_multiprocess.py NAME OUT``
runs ``WORKERS[NAME](OUT)`` after joining the group from the environment.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

THIS_FILE = Path(__file__).resolve()
ROOT = THIS_FILE.parents[1]
PORT_TAKEN = ("Address already in use", "Failed to add port", "address already in use")


@dataclasses.dataclass
class Finished:
    """One child's exit status and its combined stdout and stderr."""

    process_id: int
    returncode: int | None
    output: str


class ProcessesFailed(AssertionError):
    """A child failed or the group ran past its time bound (outputs attached)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the child's process group (its id is the child's PID), then reap."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _environment(
    process_id: int, num_processes: int, port: int, devices: int, extra: dict[str, str] | None
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        JAX_NUMPY_RANK_PROMOTION="raise",  # as strict as the tests' own process
        SGDJAX_COORDINATOR=f"127.0.0.1:{port}",
        SGDJAX_NUM_PROCESSES=str(num_processes),
        SGDJAX_PROCESS_ID=str(process_id),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def start_processes(
    argv: Callable[[int], Sequence[str]],
    num_processes: int,
    *,
    devices_per_process: int,
    log_dir: Path,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> list[subprocess.Popen]:
    """Starts the group (each child in its own session); the caller must kill them."""
    port = free_port() if port is None else port
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for process_id in range(num_processes):
            log = open(log_dir / f"process-{process_id}.log", "w")  # noqa: SIM115
            processes.append(
                subprocess.Popen(
                    [sys.executable, *argv(process_id)],
                    env=_environment(process_id, num_processes, port, devices_per_process, env),
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            log.close()
    except BaseException:
        for process in processes:
            _kill_group(process)
        raise
    return processes


def wait_processes(
    processes: list[subprocess.Popen], *, timeout: float, grace: float = 10.0
) -> list[int | None]:
    """Waits for every child; a failure leaves the others ``grace`` seconds, then kills.

    Returns the exit statuses (``None`` for a child killed at the deadline).
    """
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes):
                break
            if any(code not in (None, 0) for code in codes):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.05)
        return [process.poll() for process in processes]
    finally:
        for process in processes:
            _kill_group(process)


def run_processes(
    argv: Callable[[int], Sequence[str]],
    num_processes: int = 2,
    *,
    devices_per_process: int = 2,
    timeout: float = 120.0,
    log_dir: Path,
    env: dict[str, str] | None = None,
    check: bool = True,
    attempts: int = 3,
) -> list[Finished]:
    """Runs ``python *argv(i)`` for ``i < num_processes`` as one JAX process group.

    Args:
      argv: the arguments after ``python`` for process ``i``.
      num_processes: how many processes.
      devices_per_process: fake CPU devices in each.
      timeout: seconds for the whole group (each attempt).
      log_dir: where ``process-<i>.log`` are written.
      env: extra environment variables.
      check: raise :class:`ProcessesFailed` unless every child exits with 0.
      attempts: starts to try when the coordinator's port was taken meanwhile.

    Returns:
      One :class:`Finished` per process.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        processes = start_processes(
            argv, num_processes, devices_per_process=devices_per_process, log_dir=log_dir, env=env
        )
        codes = wait_processes(processes, timeout=timeout)
        finished = [
            Finished(index, code, (log_dir / f"process-{index}.log").read_text(errors="replace"))
            for index, code in enumerate(codes)
        ]
        port_taken = any(
            code != 0 and any(text in item.output for text in PORT_TAKEN)
            for code, item in zip(codes, finished)
        )
        if not port_taken or attempt == attempts - 1:
            break
    if check and any(item.returncode != 0 for item in finished):
        report = "\n".join(
            f"--- process {item.process_id}: exit {item.returncode} "
            f"({'killed at the time bound' if item.returncode is None else 'exited'})\n"
            + item.output[-4000:]
            for item in finished
        )
        raise ProcessesFailed(f"the process group failed:\n{report}")
    return finished


def worker_argv(name: str, out: Path, *extra: str) -> Callable[[int], list[str]]:
    """``argv`` for :func:`run_processes` that runs the worker ``name``."""
    return lambda process_id: [str(THIS_FILE), name, str(out), *extra]


# ---------------------------------------------------------------- the computation under test


def tiny_training(mode: str, num_steps: int = 3):
    """A tiny regression model trained with sgdjax over every device in ``mode``.

    Works alike in one process and in several: the state (with a typed PRNG key
    that the step folds the step into for its noise) is placed with
    ``place_global``, each process supplies its rows of each global batch, and the
    final state comes back as numpy through ``gather_to_host``.

    Returns:
      ``{"params": ..., "momentum": ..., "losses": [...], "psum": ...}`` as numpy.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec

    import sgdjax
    from sgdjax import parallel

    mesh = parallel.data_mesh(4)
    everywhere = parallel.replicated(mesh)
    rows = parallel.batch_sharding(mesh)
    tx = sgdjax.sgd(0.05, momentum=0.9)
    generator = np.random.default_rng(0)
    params = {"w": generator.normal(size=(8, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    state = {"params": params, "opt": tx.init(params), "key": jax.random.key(42)}
    images = generator.normal(size=(num_steps, 16, 8)).astype(np.float32)
    targets = generator.normal(size=(num_steps, 16, 3)).astype(np.float32)

    def loss_fn(params, x, y, key):
        noise = 0.01 * jax.random.normal(key, y.shape[1:])
        return jnp.mean((x @ params["w"] + params["b"][None] + noise[None] - y) ** 2)

    def update(state, grads, loss, step):
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {**state, "params": sgdjax.apply_updates(state["params"], updates), "opt": opt}, loss

    def global_step(state, x, y, step):
        key = jax.random.fold_in(state["key"], step)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y, key)
        return update(state, grads, loss, step)

    def local_step(state, x, y, step):  # per device, explicit collectives
        key = jax.random.fold_in(state["key"], step)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y, key)
        grads, loss = jax.lax.pmean((grads, loss), parallel.DATA_AXIS)
        return update(state, grads, loss, step)

    share = parallel.process_rows(rows, 16)
    losses = []
    if mode == "pmap":
        devices = parallel.addressable_devices(mesh)
        local = len(devices)

        def pmap_body(state, x, y, step):  # the key travels as its raw data
            keyed = {**state, "key": jax.random.wrap_key_data(state["key"])}
            new, loss = local_step(keyed, x, y, step)
            return {**new, "key": jax.random.key_data(new["key"])}, loss

        step_fn = jax.pmap(
            pmap_body, axis_name=parallel.DATA_AXIS, devices=list(mesh.devices.flat),
            in_axes=(0, 0, 0, None),
        )  # fmt: skip
        raw = {**state, "key": jax.random.key_data(state["key"])}
        placed = jax.tree.map(lambda leaf: np.stack([np.asarray(leaf)] * local), raw)
        for step in range(num_steps):
            x = images[step][share].reshape(local, -1, 8)
            y = targets[step][share].reshape(local, -1, 3)
            placed, loss = step_fn(placed, x, y, np.int32(step))
            losses.append(float(np.asarray(loss)[0]))
        final = jax.tree.map(lambda leaf: np.asarray(leaf[0]), placed)
    else:
        shardings = jax.tree.map(lambda _: everywhere, state)
        if mode == "zero":
            shardings["opt"] = parallel.zero_sharding(state["opt"], mesh)
        if mode == "shard_map":
            spec = PartitionSpec(parallel.DATA_AXIS)
            mapped = jax.shard_map(
                local_step, mesh=mesh, in_specs=(PartitionSpec(), spec, spec, PartitionSpec()),
                out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False,
            )  # fmt: skip
            step_fn = jax.jit(mapped)
        else:
            step_fn = jax.jit(
                global_step,
                in_shardings=(shardings, rows, rows, everywhere),
                out_shardings=(shardings, everywhere),
            )
        placed = parallel.place_global(state, shardings)
        for step in range(num_steps):
            x = parallel.global_batch(images[step][share], rows)
            y = parallel.global_batch(targets[step][share], rows)
            placed, loss = step_fn(placed, x, y, np.int32(step))
            losses.append(float(parallel.gather_to_host(loss)))
        final = parallel.gather_to_host(placed)
        if mode == "zero":
            split = [leaf for leaf in jax.tree.leaves(placed["opt"]) if leaf.ndim]
            assert not all(leaf.is_fully_replicated for leaf in split)  # really partitioned
    values = jax.tree.leaves(final["opt"])
    total = jax.jit(lambda v: jnp.sum(v), out_shardings=everywhere)(
        parallel.global_batch(np.arange(share.start, share.stop, dtype=np.float32), rows)
    )
    return {
        "params": final["params"],
        "momentum": [np.asarray(v) for v in values],
        "losses": np.asarray(losses),
        "psum": np.asarray(parallel.gather_to_host(total)),
        "rows": np.asarray([share.start, share.stop]),
    }


def _save(out: Path, name: str, result: dict) -> None:
    import jax
    import numpy as np

    flat = {f"leaf{i}": leaf for i, leaf in enumerate(jax.tree.leaves(result))}
    np.savez(out / f"{name}.npz", **flat)


def _collectives(out: str) -> None:
    """Every parallel mode's tiny training, saved by each process as ``<mode>-<pid>.npz``."""
    import jax

    for mode in ("sharded", "zero", "shard_map", "pmap"):
        _save(Path(out), f"{mode}-{jax.process_index()}", tiny_training(mode))


def _checks(out: str) -> None:
    """The agreement checks: a config that differs, an --out that is not shared."""
    import jax

    from sgdjax import parallel

    index = jax.process_index()
    parallel.check_same_config({"seed": 0, "lr": 0.1})
    parallel.check_shared_directory(Path(out) / "shared")
    for name, call in (
        ("config", lambda: parallel.check_same_config({"seed": 0, "lr": 0.1 * (1 + index)})),
        (
            "folder",
            lambda: parallel.check_shared_directory(Path(out) / f"own-{index}", timeout=1.0),
        ),
    ):
        try:
            call()
        except parallel.ProcessMismatchError as error:
            (Path(out) / f"{name}-{index}.txt").write_text(str(error))
    flag = parallel.any_process(index == 1)
    (Path(out) / f"any-{index}.txt").write_text(str(flag))


# ---------------------------------------------------------------- the engine, every mode

ENGINE_MODES = ("pmap", "sharded", "shard_map", "zero")
STOP_AT_CALL = 3  # process 1 alone gets SIGTERM during this program call of each run


def engine_config(mode: str):
    """The run every mode trains: 80 images, 2 epochs of 5 steps, diagnostics on."""
    from sgdjax import training

    return training.Config(
        widths=(4, 8), epochs=2, batch_size=16, eval_batch_size=8, steps_per_call=1,
        checkpoint_every_steps=2, crop_padding=2, tensorboard=False, diagnostics=True,
        parallel=mode, num_devices=4,
    )  # fmt: skip


class RecordedImages:
    """An image array that records which rows were read from it (and reads only those)."""

    def __init__(self, images):
        self.images, self.rows = images, []
        self.shape, self.dtype, self.ndim = images.shape, images.dtype, images.ndim

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        import numpy as np

        self.rows.extend(np.ravel(np.arange(len(self.images))[index]).tolist())
        return self.images[index]


def _engine_modes(out: str, data_dir: str, *modes: str) -> None:
    """Each mode: SIGTERM to process 1 during call 3 (both stop and save), resumed on
    the same engine to the end; saves the rows each process read and the errors.

    ``parallel="none"`` is refused first: its one-line error is saved too.
    """
    import json

    import jax
    import numpy as np

    from sgdjax import data, training

    index = jax.process_index()
    try:
        training.Engine(engine_config("none"), data.load_cifar10(data_dir, lazy=True))
    except training.SetupError as error:
        (Path(out) / f"none-{index}.txt").write_text(str(error))
    for mode in modes or ENGINE_MODES:
        loaded = data.load_cifar10(data_dir, lazy=True)
        dataset = loaded._replace(train_images=RecordedImages(loaded.train_images),
                                  test_images=RecordedImages(loaded.test_images))  # fmt: skip
        engine = training.Engine(engine_config(mode), dataset, log=lambda line: None)
        workdir = Path(out) / mode
        calls = []
        engine.prepare()
        original = engine._train_programs[1]

        def signalling(*args, original=original, calls=calls):
            calls.append(1)
            if len(calls) == STOP_AT_CALL and index == 1:
                signal.raise_signal(signal.SIGTERM)
            return original(*args)

        engine._train_programs[1] = signalling
        try:
            engine.run(0, workdir, progress=False)
            stopped = None
        except training.Preempted as error:
            stopped = error.step
        engine._train_programs[1] = original
        engine.run(0, workdir, resume=True, progress=False)
        np.savez(
            workdir / f"read-{index}.npz",
            train=np.asarray(dataset.train_images.rows, np.int64),
            test=np.asarray(dataset.test_images.rows, np.int64),
        )
        (workdir / f"stopped-{index}.json").write_text(json.dumps(stopped))


def _hang(out: str, process_id: int, fail: bool) -> None:
    """Writes its PID and waits forever; with ``fail``, process 0 exits with 3 at once."""
    (Path(out) / f"pid-{process_id}.txt").write_text(str(os.getpid()))
    if fail and process_id == 0:
        raise SystemExit(3)
    time.sleep(3600)


WORKERS = {"collectives": _collectives, "checks": _checks, "engine": _engine_modes}


def main(argv: list[str]) -> None:
    name, out = argv[0], argv[1]
    if name == "hang":  # no JAX at all: tests the harness alone
        _hang(out, int(os.environ["SGDJAX_PROCESS_ID"]), fail="fail" in argv[2:])
        return
    from sgdjax.parallel import initialize_distributed

    initialize_distributed()
    WORKERS[name](out, *argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
