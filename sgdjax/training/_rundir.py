"""The output folder of a run: one writer at a time, files that are whole or absent.

- :class:`RunLock`: a lock file ``.lock`` in the folder naming the process that
  writes there. A second writer is refused with one line; a lock left by a killed
  process (its PID dead on this host, or reused by a newer process) is recognised
  and taken over. :func:`claim_run_directory` takes it for a run of one or several
  processes (process 0 holds it; all processes learn the outcome).
- :func:`write_text_atomic`, :func:`write_json_atomic`, :func:`write_jsonl_atomic`:
  a temporary file in the same folder, flushed and ``fsync``-ed, then renamed over
  the target, so a crash leaves the old file or the new one, never a mix.
- :func:`read_jsonl`: reads ``metrics.jsonl`` back, keeping every readable row and
  saying which lines it dropped (a line cut short by a crash, a foreign row).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class RunDirectoryLocked(RuntimeError):
    """Another live process is writing into the run's output folder."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a reused PID apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """A lock on a run's output folder, held while the run writes there.

    The lock file records host, PID and the process's start time. It is created
    whole (written under a temporary name, then hard-linked into place, which fails
    if a lock exists), so a reader never sees half a lock.

    Args:
      directory: the output folder (created if needed).

    Example:
      >>> import tempfile
      >>> from sgdjax.training import RunLock
      >>> with RunLock(tempfile.mkdtemp()) as lock:
      ...     lock.held
      True
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.held = False
        self.note: str | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        """Whether ``holder`` is a process of this host that no longer runs."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        pid = holder["pid"]
        if not _alive(pid):
            return True
        started = holder.get("start_time")
        return started is not None and _process_start_time(pid) not in (None, started)

    def acquire(self) -> RunLock:
        """Takes the lock, or raises :class:`RunDirectoryLocked` naming its holder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            descriptor, temporary = tempfile.mkstemp(prefix=".lock-", dir=self.directory)
            try:
                with os.fdopen(descriptor, "w") as stream:
                    json.dump(self._record(), stream)
                try:
                    os.link(temporary, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
            finally:
                os.unlink(temporary)
            holder = self._holder()
            if holder is None:  # released in between: try again
                continue
            if self._stale(holder):
                self.note = (
                    f"took over the lock of process {holder['pid']} on {holder['host']}, "
                    "which no longer runs"
                )
                aside = self.path.with_name(f"{LOCK_NAME}.stale-{holder['pid']}")
                try:
                    os.replace(self.path, aside)  # only one of several racing takers wins
                    aside.unlink()
                except FileNotFoundError:
                    pass
                continue
            who = (
                f"process {holder['pid']} on {holder['host']} (since {holder.get('since')})"
                if holder
                else "an unreadable lock"
            )
            raise RunDirectoryLocked(
                f"--out {self.directory} is in use by {who}; wait for that run to end or "
                f"choose another --out (if no such run exists, delete {self.path})"
            )
        raise RunDirectoryLocked(f"--out {self.directory}: could not take the lock {self.path}")

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def claim_run_directory(directory: str | os.PathLike) -> RunLock | None:
    """Process 0 takes ``directory``'s :class:`RunLock`; every process learns the outcome.

    Collective under several processes: when process 0 is refused, every process
    raises the same :class:`RunDirectoryLocked`, so none goes on to place data or
    compile. One process: ``RunLock(directory).acquire()``.

    Returns:
      The held lock on process 0, ``None`` on the others.
    """
    from sgdjax.parallel import is_primary, process_allgather_bytes

    lock, refusal = None, b""
    if is_primary():
        try:
            lock = RunLock(directory).acquire()
        except RunDirectoryLocked as error:
            refusal = str(error).encode()
    refusal = process_allgather_bytes(refusal)[0]
    if refusal:
        raise RunDirectoryLocked(refusal.decode())
    return lock


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` in one step: the old file or the new, never a mix."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """Writes ``value`` as indented JSON to ``path`` atomically (``summary.json``)."""
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Writes one JSON object per line to ``path`` atomically (``metrics.jsonl``)."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(
    path: str | os.PathLike, *, required: Sequence[str] = ("epoch",)
) -> tuple[list[dict[str, Any]], list[str]]:
    """The readable rows of a JSON-lines log and a description of each dropped line.

    A row is kept when it is a JSON object holding every key of ``required``, with
    an integer ``"epoch"`` (when required) larger than the previous kept row's.
    Dropped: lines that are not JSON (a line cut short by a crash), other JSON
    values, rows without the keys (a foreign row), rows that repeat or go back in
    epoch (a second writer).

    Args:
      path: the file; a missing file reads as no rows.
      required: keys every row must hold.

    Returns:
      ``(rows, dropped)``: the kept rows in order, and one short note per dropped line
      (``"line 7: not JSON (cut short?)"``).
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return [], []
    rows: list[dict[str, Any]] = []
    dropped: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            dropped.append(f"line {number}: not JSON (cut short?)")
            continue
        missing = [key for key in required if not isinstance(row, dict) or key not in row]
        if missing:
            dropped.append(f"line {number}: not a metrics row (no {', '.join(missing)})")
            continue
        if "epoch" in required:
            epoch = row["epoch"]
            if isinstance(epoch, bool) or not isinstance(epoch, int):
                dropped.append(f"line {number}: epoch {epoch!r} is not an integer")
                continue
            if rows and epoch <= rows[-1]["epoch"]:
                dropped.append(f"line {number}: epoch {epoch} repeats or goes back")
                continue
        rows.append(row)
    return rows, dropped
