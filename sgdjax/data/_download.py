"""Fetching a file over HTTP(S): mirrors tried in turn, resumed, verified, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

from sgdjax.data._errors import DataError

_CHUNK = 1 << 20
_USER_AGENT = "sgdjax-fetch/1"
_HEX = re.compile(r"[0-9a-f]+")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _Failure(Exception):
    """One URL failed; the message says why in a few words."""


class _Dropped(_Failure):
    """The connection ended before the whole body arrived: worth resuming."""


def _check_digest(name: str, value: str | None, length: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != length or not _HEX.fullmatch(value.lower()):
        raise ValueError(f"{name} must be a {length}-character hex digest, got {value!r}")
    return value.lower()


def _check_urls(urls: str | Sequence[str]) -> list[str]:
    listed = [urls] if isinstance(urls, str) else list(urls)
    if not listed:
        raise ValueError("urls must name at least one URL, got an empty list")
    for url in listed:
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "file://")):
            raise ValueError(f"urls must be http://, https:// or file:// URLs, got {url!r}")
    return listed


def _digests(file: Path, sha256: str | None, md5: str | None) -> list[str]:
    """What is wrong with ``file``'s digests, one phrase per mismatch (empty when all match)."""
    wanted = [(name, value) for name, value in (("sha256", sha256), ("md5", md5)) if value]
    if not wanted:
        return []
    hashes = {name: hashlib.new(name) for name, _ in wanted}
    with open(file, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            for hasher in hashes.values():
                hasher.update(chunk)
    return [
        f"{name} {hashes[name].hexdigest()}, expected {value}"
        for name, value in wanted
        if hashes[name].hexdigest() != value
    ]


def _holds_lock(stream, part: Path) -> bool:
    """Waits for an exclusive lock on ``stream`` (POSIX; elsewhere no lock is taken).

    Returns False when another process renamed ``part`` away while this one waited:
    that process finished the download, and ``stream`` is no longer the part file.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        return True
    fcntl.flock(stream.fileno(), fcntl.LOCK_EX)  # released when the stream closes
    try:
        return os.stat(part).st_ino == os.fstat(stream.fileno()).st_ino
    except FileNotFoundError:
        return False


def _progress_bar(total: int | None, initial: int, name: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            enabled = False
    if not enabled:
        return contextlib.nullcontext(None)
    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name
    )


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            error.close()
            return None  # the part already holds the whole file
        error.close()
        raise _Failure(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, socket.gaierror):
            raise _Failure(f"cannot resolve the host ({reason.strerror or reason})") from None
        if isinstance(reason, ConnectionRefusedError):
            raise _Failure("connection refused") from None
        if isinstance(reason, TimeoutError):
            raise _Failure(f"no answer within {timeout:g} s") from None
        raise _Failure(f"cannot connect ({reason})") from None
    except TimeoutError:
        raise _Failure(f"no answer within {timeout:g} s") from None
    except (http.client.HTTPException, OSError) as error:
        raise _Dropped(f"connection failed ({type(error).__name__}: {error})") from None


def _transfer(url: str, stream, name: str, timeout: float, progress: bool) -> None:
    """Appends the rest of ``url``'s body to ``stream``, resuming from its current size."""
    offset = stream.seek(0, os.SEEK_END)
    response = _open(url, offset, timeout)
    if response is None:
        return
    with response:
        status = getattr(response, "status", None)
        length = response.headers.get("Content-Length")
        total = None
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != offset:
                raise _Failure(f"bad Content-Range {response.headers.get('Content-Range')!r}")
            total = None if match.group(3) == "*" else int(match.group(3))
        else:  # the whole body (the server ignored the range, or a file:// URL)
            stream.seek(0)
            stream.truncate()
            offset = 0
            total = int(length) if length is not None and length.isdigit() else None
        received = offset
        with _progress_bar(total, offset, name, progress) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    stream.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as error:
                stream.flush()
                raise _Dropped(
                    f"connection dropped after {received} of {total or '?'} bytes "
                    f"({type(error).__name__})"
                ) from None
            finally:
                stream.flush()
        if total is not None and received < total:
            raise _Dropped(f"connection dropped after {received} of {total} bytes")
        if total is not None and received > total:
            raise _Failure(f"server sent {received} bytes, announced {total}")


def _replace_durably(source: Path, destination: Path) -> None:
    with open(source, "rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(source, destination)
    with contextlib.suppress(OSError):  # not every platform can fsync a folder
        folder = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def fetch_file(
    urls: str | Sequence[str],
    destination: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    attempts: int = 3,
) -> Path:
    """Downloads a file once: mirrors in turn, resumed, checksum-verified, atomically placed.

    The body is written to ``<destination>.part`` beside ``destination`` and renamed
    onto ``destination`` only after the whole file has arrived and matches every
    digest given, so ``destination`` is either absent or complete. When
    ``destination`` already exists (and matches the digests) nothing is downloaded.
    A connection that drops mid-body is resumed with an HTTP ``Range`` request, up to
    ``attempts`` times in a row without progress; a ``.part`` left by an earlier,
    interrupted call is resumed the same way. A file that fails its checksum is
    deleted and the next URL tried (after one fresh retry when it was resumed). Two
    processes fetching the same destination take turns (POSIX file lock on the part).

    Args:
      urls: one URL or a list of mirrors (``http://``, ``https://``, ``file://``),
        tried in order.
      destination: the file to create; its folder is created if needed.
      sha256: expected hex SHA-256 digest, or ``None``.
      md5: expected hex MD5 digest, or ``None``.
      progress: show a tqdm progress bar (when tqdm is installed).
      timeout: seconds to wait for a connection or for the next bytes.
      attempts: connections per URL in a row that bring no new bytes before giving up.

    Returns:
      ``destination`` as a :class:`pathlib.Path`.

    Raises:
      DataError: every URL failed; the one-line message says why for each.

    Example::

      path = fetch_file(
          ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
          "cifar-10-python.tar.gz",
          md5="c58f30108f718f92721af3b95e74349a",
      )

    This matches ``torchvision.datasets.utils.download_url`` (which checks md5 only
    and neither resumes nor writes atomically).
    """
    listed = _check_urls(urls)
    sha256 = _check_digest("sha256", sha256, 64)
    md5 = _check_digest("md5", md5, 32)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be a positive integer, got {attempts!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    destination = Path(destination).expanduser()
    if destination.is_file():
        wrong = _digests(destination, sha256, md5)
        if not wrong:
            return destination
        warnings.warn(
            f"{destination}: existing file has {'; '.join(wrong)}; downloading it again",
            stacklevel=2,
        )
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{destination.parent}: cannot create the folder ({error})") from None
    part = destination.with_name(destination.name + ".part")
    try:
        stream = open(part, "ab")
    except OSError as error:
        raise DataError(f"{part}: cannot write there ({error})") from None
    failures = []
    with stream:
        if not _holds_lock(stream, part):
            return destination  # another process finished while this one waited
        if destination.is_file() and not _digests(destination, sha256, md5):
            part.unlink()  # finished by another process between the checks above
            return destination
        for url in listed:
            try:
                _fetch_one(url, stream, part, destination.name, sha256, md5, timeout, attempts,
                           progress)  # fmt: skip
            except _Failure as error:
                failures.append(f"{url}: {error}")
                continue
            _replace_durably(part, destination)
            return destination
        if stream.seek(0, os.SEEK_END) == 0:
            part.unlink()
    kept = f" (partial download kept in {part} for resuming)" if part.is_file() else ""
    raise DataError(f"cannot download {destination.name}: {'; '.join(failures)}{kept}")


def _fetch_one(url, stream, part, name, sha256, md5, timeout, attempts, progress) -> None:
    """Completes ``part`` from ``url`` and checks it; raises :class:`_Failure` otherwise."""
    fresh_retry = True
    without_progress = 0
    while True:
        start = stream.seek(0, os.SEEK_END)
        try:
            _transfer(url, stream, name, timeout, progress)
        except _Dropped as error:
            without_progress = 0 if stream.seek(0, os.SEEK_END) > start else without_progress + 1
            if without_progress >= attempts:
                raise _Failure(str(error)) from None
            continue
        except _Failure:
            raise
        wrong = _digests(part, sha256, md5)
        if not wrong:
            return
        stream.seek(0)
        stream.truncate()
        if start > 0 and fresh_retry:  # a stale part from another file: once more from zero
            fresh_retry = False
            continue
        raise _Failure(f"checksum mismatch ({'; '.join(wrong)})")
