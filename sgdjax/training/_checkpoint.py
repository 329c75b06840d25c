"""Atomic orbax checkpoints of the whole train state, and resuming from the newest good one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from sgdjax.training._state import TrainState


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
    return state, int(tree["epoch"])


class Checkpointer:
    """Saves the train state every few epochs and restores the newest readable one.

    Orbax writes each checkpoint into a temporary folder and renames it when complete,
    so a crash never leaves a half-written checkpoint that looks finished. Restoring
    reads array data only (no pickled code). If the newest checkpoint is unreadable,
    the next older one is used and the returned note says so.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    @staticmethod
    def saved_epochs(directory: str | Path) -> list[int]:
        """The epochs with a finished checkpoint in ``directory`` (none if it is missing)."""
        directory = Path(directory)
        if not directory.is_dir():
            return []
        return sorted(int(child.name) for child in directory.iterdir() if child.name.isdigit())

    def save(self, epoch: int, state: TrainState, config: dict[str, Any] | None = None) -> None:
        """Writes the checkpoint for ``epoch`` (state and config) and waits until it is on disk."""
        args = self._ocp.args
        self._manager.save(
            epoch,
            args=args.Composite(
                state=args.StandardSave(_to_tree(state, epoch)),
                config=args.JsonSave(config or {}),
            ),
        )
        self._manager.wait_until_finished()

    def restore_tree(self, epoch: int, like: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
        """The raw arrays and the config saved for ``epoch``."""
        args = self._ocp.args
        restored = self._manager.restore(
            epoch,
            args=args.Composite(
                state=args.StandardRestore(_to_tree(like, 0)), config=args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["config"] or {})

    def restore_latest(
        self, like: TrainState
    ) -> tuple[TrainState, int, str, dict[str, Any]] | None:
        """``(state, epoch, note, config)`` from the newest readable checkpoint, or None."""
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        skipped = []
        for step in steps:
            try:
                tree, config = self.restore_tree(step, like)
                state, epoch = _from_tree(tree, like)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                skipped.append(f"epoch {step} ({type(error).__name__})")
                continue
            note = f"resuming from the checkpoint of epoch {epoch} in {self.directory}"
            if skipped:
                note += f"; skipped unreadable checkpoint(s): {', '.join(skipped)}"
            return state, epoch, note, config
        if skipped:
            print(
                f"no readable checkpoint in {self.directory} ({', '.join(skipped)}); "
                "starting from scratch"
            )
        return None

    def close(self) -> None:
        self._manager.close()
