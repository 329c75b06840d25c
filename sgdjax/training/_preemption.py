"""Preemption: SIGTERM or SIGINT ask the run to save and stop at the next chunk's end.

A preempted cloud VM, a Slurm job past its time (``--signal``) and Ctrl-C all send
a signal. :class:`PreemptionGuard` turns the first one into a flag that the training
loop polls after each chunk of steps; the loop then writes a checkpoint, prints
where, and exits with :data:`PREEMPTED_EXIT_STATUS` (75, ``EX_TEMPFAIL``: "try
again"), which a job script can test to requeue the run with ``--resume``. A
second signal of either kind gives up at once: the original handlers are put back
and the signal is delivered again (SIGINT raises ``KeyboardInterrupt``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

PREEMPTED_EXIT_STATUS = 75
"""The exit status of a run stopped by SIGTERM or SIGINT after saving (``EX_TEMPFAIL``)."""


class PreemptionGuard:
    """A context manager that turns SIGTERM and SIGINT into a flag polled by the loop.

    On entry it installs handlers for ``signals`` (only in the main thread, where
    Python allows it; elsewhere the guard never fires); on exit it restores the
    handlers it replaced. Under several processes, poll with :meth:`should_stop`
    passing :func:`sgdjax.parallel.any_process` so that every process stops after
    the same chunk, even if only one received the signal.

    Args:
      signals: the signals to catch.

    Example:
      >>> import signal
      >>> from sgdjax.training import PreemptionGuard
      >>> with PreemptionGuard() as guard:
      ...     signal.raise_signal(signal.SIGTERM)
      ...     guard.requested, guard.signal_name
      (True, 'SIGTERM')
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        for number in signals:
            if number not in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
                raise ValueError(f"signals must be SIGTERM, SIGINT or SIGUSR1, got {number!r}")
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop waiting for the chunk
            self._restore()
            signal.raise_signal(number)  # to this thread, handled before it returns
            return
        self.requested = True
        self.signal_name = signal.Signals(number).name

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def should_stop(self, agree: Callable[[bool], bool] | None = None) -> bool:
        """Whether to save and stop now; ``agree`` combines the flag over processes."""
        return agree(self.requested) if agree is not None else self.requested


class Preempted(Exception):
    """The run saved a checkpoint and stopped on a signal; continue it with ``--resume``.

    Attributes:
      step: the global step of the checkpoint written.
      directory: the checkpoint folder.
    """

    def __init__(self, message: str, *, step: int, directory: str):
        super().__init__(message)
        self.step, self.directory = step, directory
