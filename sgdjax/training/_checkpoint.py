"""Orbax checkpoints of the whole train state that never lose work silently.

- Checkpoints are named by the global step (so mid-epoch checkpoints work) and
  record the number of whole epochs done inside.
- Every refusal or failure of orbax is a :class:`CheckpointError` naming the step
  and the folder (orbax silently refuses to save a step when a step at or beyond
  it already exists on disk).
- On resume, a newer checkpoint that cannot be read is moved aside (renamed to
  ``<step>.unreadable``) and named before the older one is used, so later saves
  are not refused and nothing is deleted.
- A config that differs from the checkpoint's is a :class:`ConfigChangedError`
  listing the differences, unless the caller accepts them.
- Several processes save into one shared folder and restore straight into the
  shardings of the state they pass as ``like``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from sgdjax.parallel._distributed import barrier, is_primary, place_global
from sgdjax.training._state import TrainState

SAFE_TO_CHANGE = (
    "epochs",
    "checkpoint_every",
    "checkpoint_every_steps",
    "eval_every",
    "tensorboard",
)
"""Config fields that may differ on resume without being accepted: they change how
long the run goes and what it writes, not the numbers it computes."""


class CheckpointError(RuntimeError):
    """Orbax refused or failed to write or read a checkpoint (the step and folder named)."""


class ConfigChangedError(ValueError):
    """``--resume`` with a config that differs from the checkpoint's (differences listed)."""


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore_latest` returns.

    Attributes:
      state: the restored state (its ``step`` is the checkpoint's global step).
      epoch: whole epochs completed when the checkpoint was written.
      note: one line for the log: where from, what was moved aside or accepted.
      config: the config saved with the checkpoint.
    """

    state: TrainState
    epoch: int
    note: str
    config: dict[str, Any]


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    ignore: Sequence[str] = SAFE_TO_CHANGE,
) -> list[str]:
    """``"name: saved -> current"`` for each field that differs (JSON-normalised).

    Fields named in ``ignore`` (by default :data:`SAFE_TO_CHANGE`, such as
    ``epochs``: continuing a run for longer is what ``--resume`` is for) and fields
    absent from ``saved`` (a checkpoint written before the field existed) are not
    compared.
    """
    current = json.loads(json.dumps(dict(current), default=str))
    return [
        f"{name}: {saved[name]!r} -> {value!r}"
        for name, value in sorted(current.items())
        if name not in ignore and name in saved and saved[name] != value
    ]


def _is_local(x: Any) -> bool:
    """A leaf that lives in this process alone while several processes run."""
    if jax.process_count() == 1:
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def _everywhere() -> jax.sharding.NamedSharding:
    """A full copy on every device of every process."""
    devices = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
    mesh = jax.sharding.Mesh(np.asarray(devices), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _global(tree: Any) -> Any:
    """Under several processes, process-local leaves as global copies (orbax saves
    global arrays; every process holds the same values, e.g. pmap's gathered state)."""
    return jax.tree.map(lambda x: place_global(x, _everywhere()) if _is_local(x) else x, tree)


def _abstract(tree: Any) -> Any:
    """Restore targets: the shape, dtype and sharding of each array of ``tree``
    (process-local arrays, under several processes, as global copies)."""

    def leaf(x):
        if _is_local(x):
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=_everywhere())
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _localise(restored: Any, like: Any) -> Any:
    """Restored leaves back where ``like``'s process-local leaves live."""

    def leaf(value, target):
        if not _is_local(target):
            return value
        host = np.asarray(value.addressable_data(0))
        return jax.device_put(host, target.sharding) if isinstance(target, jax.Array) else host

    return jax.tree.map(leaf, restored, like)


def _to_tree(state: TrainState, epoch: int) -> dict[str, Any]:
    """The state as plain arrays (the PRNG key as its raw data) plus the epoch number."""
    tree = {
        "epoch": np.asarray(epoch, np.int32),
        "step": state.step,
        "params": state.params,
        "model_state": state.model_state,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }
    if state.ema is not None:
        tree["ema"] = {"count": state.ema.count, "average": state.ema.average}
    if state.slow is not None:
        tree["slow"] = state.slow
    return tree


def _from_tree(tree: dict[str, Any], like: TrainState) -> tuple[TrainState, int]:
    state = like.replace(
        step=tree["step"],
        params=tree["params"],
        model_state=tree["model_state"],
        opt_state=jax.tree.unflatten(
            jax.tree.structure(like.opt_state), jax.tree.leaves(tree["opt_state"])
        ),
        rng=jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(like.rng)),
    )
    if like.ema is not None:
        if "ema" not in tree:
            raise ValueError("the checkpoint holds no moving average, but the run keeps one")
        state = state.replace(ema=like.ema._replace(**tree["ema"]))
    if like.slow is not None:
        if "slow" not in tree:
            raise ValueError("the checkpoint holds no lookahead weights, but the run keeps them")
        state = state.replace(slow=tree["slow"])
    return state, int(tree["epoch"])


class Checkpointer:
    """Saves the train state by global step and restores the newest readable one.

    Orbax writes each checkpoint into a temporary folder and renames it when
    complete, so a crash never leaves a half-written checkpoint that looks
    finished. Restoring reads array data only (no pickled code). Under several
    processes, every process creates the ``Checkpointer`` and calls ``save`` and
    ``restore_latest`` together, on one folder they all see.

    Args:
      directory: the checkpoint folder (created when needed).
      max_to_keep: how many checkpoints to keep (older ones are deleted).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from sgdjax.training import Checkpointer, ConvNet, TrainState
      >>> state = TrainState.create(model=ConvNet(widths=(4, 4)), tx=optax.sgd(0.1),
      ...                           rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3)))
      >>> checkpoints = Checkpointer(tempfile.mkdtemp())
      >>> checkpoints.save(0, state, {"seed": 0}, epoch=0)
      >>> checkpoints.restore_latest(state, config={"seed": 0}).epoch
      0
      >>> checkpoints.close()
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        import orbax.checkpoint as ocp

        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be a positive integer, got {max_to_keep!r}")
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    @staticmethod
    def saved_steps(directory: str | Path) -> list[int]:
        """The steps with a checkpoint folder in ``directory`` (none if it is missing)."""
        directory = Path(directory)
        if not directory.is_dir():
            return []
        return sorted(int(child.name) for child in directory.iterdir() if child.name.isdigit())

    saved_epochs = saved_steps  # the name the epoch-numbered loop used

    def save(
        self,
        step: int,
        state: TrainState,
        config: Mapping[str, Any] | None = None,
        *,
        epoch: int | None = None,
    ) -> None:
        """Writes the checkpoint of global step ``step`` and waits until it is on disk.

        Args:
          step: the checkpoint's name, the global step ``int(state.step)`` (a loop
            that saves once per epoch may name checkpoints by epoch instead).
          state: the state; global arrays under several processes.
          config: the run's config, saved beside it as JSON.
          epoch: whole epochs completed at this step (default: ``step``).

        Raises:
          CheckpointError: a checkpoint at ``step`` or later already exists in the
            folder (orbax would silently skip the save), or orbax failed.
        """
        epoch = step if epoch is None else epoch
        self._manager.reload()
        later = [saved for saved in self._manager.all_steps() if saved >= step]
        if later:
            raise CheckpointError(
                f"cannot save the checkpoint of step {step} in {self.directory}: "
                f"step(s) {sorted(later)} already exist there (from another run, or a stray "
                "folder); move them away or choose another --out"
            )
        args = self._ocp.args
        try:
            saved = self._manager.save(
                step,
                args=args.Composite(
                    state=args.StandardSave(_global(_to_tree(state, epoch))),
                    config=args.JsonSave(json.loads(json.dumps(dict(config or {}), default=str))),
                ),
            )
            self._manager.wait_until_finished()
        except Exception as error:
            raise CheckpointError(
                f"saving the checkpoint of step {step} in {self.directory} failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        if not saved:
            raise CheckpointError(
                f"orbax refused to save the checkpoint of step {step} in {self.directory}"
            )

    def restore_config(self, step: int) -> dict[str, Any]:
        """The config saved with the checkpoint of ``step``."""
        restored = self._manager.restore(
            step, args=self._ocp.args.Composite(config=self._ocp.args.JsonRestore())
        )
        return dict(restored["config"] or {})

    def restore_tree(self, step: int, like: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
        """The raw arrays (with ``like``'s shardings) and the config saved for ``step``."""
        args = self._ocp.args
        target = _to_tree(like, 0)
        restored = self._manager.restore(
            step,
            args=args.Composite(
                state=args.StandardRestore(_abstract(target)), config=args.JsonRestore()
            ),
        )
        return _localise(restored["state"], target), dict(restored["config"] or {})

    def _move_aside(self, step: int) -> Path:
        """Renames the folder of ``step`` to ``<step>.unreadable`` (process 0; all wait)."""
        target = self.directory / f"{step}.unreadable"
        suffix = 2
        while target.exists():
            target = self.directory / f"{step}.unreadable-{suffix}"
            suffix += 1
        if is_primary():
            (self.directory / str(step)).rename(target)
        barrier(f"sgdjax-checkpoint-aside-{step}")
        self._manager.reload()
        return target

    def restore_latest(
        self,
        like: TrainState,
        *,
        config: Mapping[str, Any] | None = None,
        accept_config_changes: bool = False,
        ignore: Sequence[str] = SAFE_TO_CHANGE,
    ) -> Restored | None:
        """The newest readable checkpoint, or None when the folder holds none.

        Newest first: a checkpoint that cannot be read is moved aside (renamed to
        ``<step>.unreadable``) and the next older one is tried; the note names
        what was moved. With ``config`` given, the checkpoint's config is compared
        first (see :func:`config_differences`).

        Args:
          like: a state of the run's structure; the restored arrays take its
            shardings (pass a placed state to restore straight onto the mesh).
          config: the run's config, compared with the checkpoint's.
          accept_config_changes: continue despite differences (listed in the note).
          ignore: config fields that may change on resume.

        Returns:
          A :class:`Restored`, or None when there is no readable checkpoint.

        Raises:
          ConfigChangedError: ``config`` differs and the changes are not accepted.
          CheckpointError: with accepted config changes, the checkpoint does not
            fit the changed run (nothing is moved aside then).
        """
        self._manager.reload()
        moved = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                saved_config = self.restore_config(step)
            except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is moved aside
                moved.append(f"step {step} ({type(error).__name__}) to {self._move_aside(step)}")
                continue
            differences = [] if config is None else config_differences(
                saved_config, config, ignore=ignore
            )  # fmt: skip
            aside = f"; moved unreadable checkpoint(s) aside: {', '.join(moved)}" if moved else ""
            if differences and not accept_config_changes:
                raise ConfigChangedError(
                    f"the checkpoint of step {step} in {self.directory} was written with a "
                    f"different config ({'; '.join(differences)}); resume with the same "
                    f"settings, or accept the changes (--accept-config-changes){aside}"
                )
            try:
                tree, _ = self.restore_tree(step, like)
                state, epoch = _from_tree(tree, like)
            except Exception as error:  # noqa: BLE001 - classified below
                if differences:
                    raise CheckpointError(
                        f"the checkpoint of step {step} in {self.directory} does not fit the "
                        f"changed config ({'; '.join(differences)}): "
                        f"{type(error).__name__}: {error}"
                    ) from error
                moved.append(f"step {step} ({type(error).__name__}) to {self._move_aside(step)}")
                continue
            note = (
                f"resuming from the checkpoint of step {step} (epoch {epoch}) in {self.directory}"
            )
            if differences:
                note += f"; accepted config changes: {'; '.join(differences)}"
            return Restored(state, epoch, note + aside, saved_config)
        if moved:
            print(
                f"no readable checkpoint in {self.directory} (moved aside: {', '.join(moved)}); "
                "starting from scratch"
            )
        return None

    def close(self) -> None:
        """Waits for pending writes and releases orbax's resources."""
        self._manager.close()
