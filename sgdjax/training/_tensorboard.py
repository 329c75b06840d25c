"""TensorBoard scalars: one small writer over tensorboardX's event files."""

from __future__ import annotations

import numbers
import os
import time
import uuid
from collections.abc import Mapping

import numpy as np


class ScalarWriter:
    """Writes scalars (loss, accuracy, learning rate, ...) as TensorBoard event files.

    Each call of :meth:`scalars` appends one event per value at the given step and
    flushes the file before it returns, so a run that stops early keeps everything
    written so far and ``tensorboard --logdir`` shows it while the run goes on.
    The events are framed and encoded by `tensorboardX
    <https://github.com/lanpa/tensorboardX>`_ (pure Python, no TensorFlow;
    imported only when a writer is made) through its synchronous
    ``EventsWriter``: no background thread, so a flush means the bytes are in
    the file (``tensorboardX.SummaryWriter.flush`` does not wait for its queue).

    Args:
      logdir: the folder the event file is written in (made if missing). Point
        ``tensorboard --logdir`` at it or at a folder above it. Every writer
        opens a new file, so several runs or restarts never overwrite each other.
      purge_step: for a run resumed at this step: TensorBoard hides the events
        of earlier files in ``logdir`` at this step and after (a ``SessionLog``
        START event, as ``tensorboardX.SummaryWriter(purge_step=...)`` writes).

    Example::

      writer = ScalarWriter("runs/tutorial/tensorboard")
      writer.scalars(100, {"train/loss": 1.25, "train/accuracy": 0.55})
      writer.close()

    Raises:
      ValueError: if ``logdir`` is empty or names an existing file, or
        ``purge_step`` is not a non-negative integer.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, purge_step: int | None = None):
        logdir = os.fspath(logdir)
        if not logdir:
            raise ValueError(f"logdir must name a folder, got {logdir!r}")
        if os.path.exists(logdir) and not os.path.isdir(logdir):
            raise ValueError(f"logdir must be a folder, got the file {logdir!r}")
        if purge_step is not None:
            _check_step("purge_step", purge_step)
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._event = event_pb2.Event
        self._session_log = event_pb2.SessionLog
        self._scalar_summary = scalar
        suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._writer = EventsWriter(os.path.join(logdir, "events"), suffix)
        self._closed = False
        if purge_step is not None:
            start = self._session_log(status=self._session_log.START)
            self._writer.write_event(
                self._event(step=int(purge_step), wall_time=time.time(), session_log=start)
            )
            self._writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes ``values`` (tag to number) at ``step`` and flushes the event file.

        Args:
          step: the global step (a non-negative integer) the values belong to.
          values: a mapping from tag (``"train/loss"``) to a real number: a Python
            number, a numpy scalar or a 0-d (jax) array. NaN and infinities are
            written as they are (TensorBoard shows them).

        Raises:
          ValueError: if ``step`` is not a non-negative integer, a tag is not a
            non-empty string, a value is not a real scalar, or the writer is closed.
        """
        if self._closed:
            raise ValueError(f"this ScalarWriter for {self.logdir!r} is closed")
        _check_step("step", step)
        converted = {}
        for tag, value in values.items():
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"tags must be non-empty strings, got {tag!r}")
            converted[tag] = _to_float(tag, value)
        wall_time = time.time()
        for tag, value in converted.items():
            summary = self._scalar_summary(tag, value)
            self._writer.write_event(
                self._event(step=int(step), wall_time=wall_time, summary=summary)
            )
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file; closing twice does nothing."""
        if not self._closed:
            self._writer.close()
            self._closed = True

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_step(name: str, step) -> None:
    """A ValueError naming ``name`` unless ``step`` is a non-negative integer."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {step!r}")


def _to_float(tag: str, value) -> float:
    """``value`` as a Python float, or a ValueError naming the tag."""
    array = np.asarray(value)
    real = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.shape != () or not real:
        raise ValueError(f"the value of {tag!r} must be a real scalar, got {value!r}")
    return float(array)
