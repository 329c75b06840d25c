"""Where data are kept: the default data folder, the ``.npy`` cache, and temporary folders."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from sgdjax.data._dataset import Dataset, check_dataset
from sgdjax.data._errors import DataError

_CACHE_VERSION = 1
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
CACHE_FOLDER = ".sgdjax_cache"


def default_data_dir() -> Path:
    """Where downloads go when no folder is given: ``$SGDJAX_DATA``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/sgdjax`` when ``XDG_CACHE_HOME`` is set, else
    ``~/.cache/sgdjax``.

    Returns:
      The folder (not created).
    """
    if os.environ.get("SGDJAX_DATA"):
        return Path(os.environ["SGDJAX_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sgdjax"


# ---------------------------------------------------------------- temporary folders

_STALE_AFTER_SECONDS = 3600.0
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# Folders this layer writes before one rename: <base>.tmp-<host hash>-<pid>-<random>.
_BASES = r"(?:cifar10-(?:folder|pickle)-[0-9a-f]{16}|cifar-10-batches-py)"
_TEMPORARY = re.compile(_BASES + r"\.tmp-([0-9a-f]{8})-(\d+)-\w+")
# The first cache writer named them <base>.tmp<random>, without an owner.
_OWNERLESS_TEMPORARY = re.compile(r"cifar10-(?:folder|pickle)-[0-9a-f]{16}\.tmp\w+")


def make_temporary(parent: Path, base: str) -> Path:
    """A new folder in ``parent`` named after ``base``, this host and this process."""
    return Path(tempfile.mkdtemp(dir=parent, prefix=f"{base}.tmp-{_HOST}-{os.getpid()}-"))


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: rely on age alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists under another user
        return True
    return True


def _is_stale(entry: Path) -> bool:
    """True for a temporary folder whose writer is gone: dead on this host, or long idle."""
    owned = _TEMPORARY.fullmatch(entry.name)
    if owned is None and _OWNERLESS_TEMPORARY.fullmatch(entry.name) is None:
        return False
    if not entry.is_dir() or entry.is_symlink():
        return False
    if owned is not None and owned.group(1) == _HOST:
        pid = int(owned.group(2))
        if pid != os.getpid() and not _process_alive(pid):
            return True
    try:
        idle = time.time() - entry.stat().st_mtime
    except OSError:
        return False
    return idle > _STALE_AFTER_SECONDS


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Deletes temporary folders in ``parent`` left by writers that were killed.

    A folder counts as stale when its name says it was made by a process of this
    host that no longer runs, or when nothing has been written into it for an hour
    (writers on other hosts, and folders from before names carried their writer).
    Only folders named the way :func:`make_temporary` (or the first cache writer)
    names them are touched; a writer still running keeps its folder.

    Returns:
      The folders removed.
    """
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        if _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


# ---------------------------------------------------------------- the .npy cache


def fingerprint(path: Path) -> str:
    """A key that changes when files are added, removed or renamed under ``path``.

    It combines the modification time and entry count of every folder (a folder's
    time changes whenever an entry in it is added, removed or renamed) and costs one
    ``stat`` per folder, not per file. A file rewritten in place under the same name
    is not noticed: delete the cache folder after editing images by hand.
    """
    parts = [str(_CACHE_VERSION), str(path.resolve())]
    for directory, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if f != CACHE_FOLDER)
        # The top folder's own time changes when the cache is written into it: use
        # its subfolder names instead.
        stamp = folders if directory == str(path) else os.stat(directory).st_mtime_ns
        parts.append(f"{directory}:{stamp}:{len(files)}:{len(folders)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_dir_for(path: Path, cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` if given, else ``<path>/.sgdjax_cache`` when writable, else the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.access(path, os.W_OK):
        return path / CACHE_FOLDER
    return default_data_dir()


def read_cache(folder: Path, *, lazy: bool = False) -> tuple[Dataset | None, str | None]:
    """``(data, None)``; ``(None, None)`` when absent; ``(None, why)`` when unusable.

    The arrays are checked as a loader's are (shapes, dtypes, equal lengths, labels
    below the class count), so a damaged or foreign cache is never trusted. With
    ``lazy`` the images are memory-mapped: only the rows indexed are read from disk.
    """
    if not folder.is_dir():
        return None, None
    try:
        arrays = [
            np.load(folder / f"{name}.npy", allow_pickle=False,
                    mmap_mode="r" if lazy and name.endswith("images") else None)
            for name in _ARRAYS
        ]  # fmt: skip
        names = tuple((folder / "class_names.txt").read_text(encoding="utf-8").split("\n"))
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as error:
        return None, f"unreadable ({type(error).__name__}: {error})".splitlines()[0]
    data = Dataset(*arrays, names)
    try:
        check_dataset(data, str(folder))
    except DataError as error:
        return None, str(error).removeprefix(f"{folder}: ")
    return data, None


def write_cache(folder: Path, data: Dataset) -> None:
    """Writes the cache atomically: a temporary folder beside it, then one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = make_temporary(folder.parent, folder.name)
    try:
        for name in _ARRAYS:
            with open(temporary / f"{name}.npy", "wb") as stream:
                np.save(stream, getattr(data, name), allow_pickle=False)
                stream.flush()
                os.fsync(stream.fileno())
        (temporary / "class_names.txt").write_text("\n".join(data.class_names), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)  # an unusable cache being replaced
        os.rename(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
