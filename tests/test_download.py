"""fetch_file and CIFAR-10's download against a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest

from sgdjax import data
from sgdjax.data import _cache, _cifar


class Server:
    """A threaded HTTP server with scripted faults; ``url(name)`` addresses a file."""

    def __init__(self):
        self.files = {}  # name -> bytes
        self.drops = {}  # name -> bytes to send before dropping, for the next request(s)
        self.ignore_range = False
        self.requests = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                drops = server.drops.get(name)
                if drops:
                    self.wfile.write(body[start : start + drops.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def server():
    running = Server()
    running.thread.start()
    try:
        yield running
    finally:
        running.httpd.shutdown()
        running.httpd.server_close()
        running.thread.join(timeout=5)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def payload(size=300_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def md5(body):
    return hashlib.md5(body).hexdigest()


def sha256(body):
    return hashlib.sha256(body).hexdigest()


def leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------- fetch_file


def test_fetch_verifies_and_never_downloads_twice(server, tmp_path):
    body = payload()
    server.files["f.bin"] = body
    path = data.fetch_file(
        server.url("f.bin"), tmp_path / "f.bin", sha256=sha256(body), md5=md5(body), progress=False
    )
    assert path == tmp_path / "f.bin" and path.read_bytes() == body
    assert leftovers(tmp_path) == ["f.bin"]
    data.fetch_file(server.url("f.bin"), path, md5=md5(body), progress=False)
    assert len(server.requests) == 1


def test_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    body = payload()
    server.files["f.bin"] = body
    server.drops["f.bin"] = [100_000, 50_000]
    data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", md5=md5(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert [r for _, r in server.requests] == [None, "bytes=100000-", "bytes=150000-"]
    assert leftovers(tmp_path) == ["f.bin"]


def test_truncated_download_is_kept_then_resumed_by_the_next_call(server, tmp_path):
    body = payload()
    server.files["f.bin"] = body
    server.drops["f.bin"] = [120_000, 0, 0, 0]  # then three attempts without progress
    with pytest.raises(data.DataError, match=r"dropped after 120000 of 300000 bytes.*resuming"):
        data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", md5=md5(body), progress=False)
    assert leftovers(tmp_path) == ["f.bin.part"]  # never a half-written destination
    assert (tmp_path / "f.bin.part").read_bytes() == body[:120_000]
    data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", md5=md5(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert server.requests[-1] == ("f.bin", "bytes=120000-")
    assert leftovers(tmp_path) == ["f.bin"]


def test_server_that_ignores_ranges_restarts_from_zero(server, tmp_path):
    body = payload()
    server.files["f.bin"] = body
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # not even a prefix of the file
    server.ignore_range = True
    data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", md5=md5(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body


def test_stale_part_of_another_file_is_discarded_once(server, tmp_path):
    body = payload()
    server.files["f.bin"] = body
    (tmp_path / "f.bin.part").write_bytes(payload(seed=1)[:5000])
    data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", sha256=sha256(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert [r for _, r in server.requests] == ["bytes=5000-", None]


def test_complete_part_answered_416_is_verified(server, tmp_path):
    body = payload()
    server.files["f.bin"] = body
    (tmp_path / "f.bin.part").write_bytes(body)
    data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", md5=md5(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body and leftovers(tmp_path) == ["f.bin"]


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    server.files["f.bin"] = payload()
    with pytest.raises(data.DataError, match=f"checksum mismatch \\(md5 {md5(payload())}"):
        data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", md5="0" * 32, progress=False)
    assert leftovers(tmp_path) == []


def test_mirrors_are_tried_in_order(server, tmp_path):
    body = payload()
    server.files["good"] = body
    server.files["bad"] = payload(seed=2)
    urls = [server.url("missing"), server.url("bad"), server.url("good")]
    data.fetch_file(urls, tmp_path / "f.bin", md5=md5(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert [name for name, _ in server.requests] == ["missing", "bad", "good"]


def test_404_is_one_line(server, tmp_path):
    with pytest.raises(data.DataError) as raised:
        data.fetch_file(server.url("nothing"), tmp_path / "f.bin", progress=False)
    assert "HTTP 404" in str(raised.value) and "\n" not in str(raised.value)
    assert leftovers(tmp_path) == []


def test_server_absent(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/f.bin"
    with pytest.raises(data.DataError, match="connection refused"):
        data.fetch_file(url, tmp_path / "sub" / "f.bin", progress=False)
    assert leftovers(tmp_path / "sub") == []


def test_existing_file_with_a_wrong_digest_is_replaced(server, tmp_path):
    body = payload()
    server.files["f.bin"] = body
    (tmp_path / "f.bin").write_bytes(b"old")
    with pytest.warns(UserWarning, match="downloading it again"):
        data.fetch_file(server.url("f.bin"), tmp_path / "f.bin", md5=md5(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body


def test_concurrent_fetches_download_once(server, tmp_path):
    body = payload(2_000_000)
    server.files["f.bin"] = body
    results, errors = [], []

    def fetch():
        try:
            results.append(
                data.fetch_file(
                    server.url("f.bin"), tmp_path / "f.bin", md5=md5(body), progress=False
                )  # fmt: skip
            )
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and results == [tmp_path / "f.bin"] * 4
    assert (tmp_path / "f.bin").read_bytes() == body
    assert len(server.requests) == 1 and leftovers(tmp_path) == ["f.bin"]


def test_file_urls_and_a_partial_prefix(tmp_path):
    body = payload()
    (tmp_path / "source.bin").write_bytes(body)
    (tmp_path / "f.bin.part").write_bytes(body[:777])
    url = (tmp_path / "source.bin").as_uri()
    data.fetch_file(url, tmp_path / "f.bin", sha256=sha256(body), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert leftovers(tmp_path, keep=["source.bin"]) == ["f.bin"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"urls": []}, "urls must name at least one URL"),
        ({"urls": "ftp://x/y"}, "urls must be http"),
        ({"md5": "abc"}, "md5 must be a 32-character hex digest, got 'abc'"),
        ({"sha256": "g" * 64}, "sha256 must be a 64-character"),
        ({"attempts": 0}, "attempts must be a positive integer, got 0"),
        ({"timeout": 0}, "timeout must be positive, got 0"),
    ],
)
def test_arguments_are_checked(tmp_path, kwargs, message):
    arguments = {"urls": "http://127.0.0.1:1/x", **kwargs}
    with pytest.raises(ValueError, match=message):
        data.fetch_file(destination=tmp_path / "x", **arguments)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- CIFAR-10's archive


def cifar_archive(per_batch=4, seed=0):
    """A tiny archive laid out as cifar-10-python.tar.gz; returns (bytes, expected arrays)."""
    rng = np.random.default_rng(seed)
    buffer, expected = io.BytesIO(), {"train": [], "test": []}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:

        def add(name, obj):
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, per_batch).tolist()
            add(name, {b"data": rows, b"labels": labels, b"batch_label": name.encode()})
            expected["test" if name == "test_batch" else "train"].append((rows, labels))
        add("batches.meta", {b"label_names": [n.encode() for n in data.CIFAR10_CLASSES]})
        add("readme.html", {})
    arrays = {
        split: (
            np.concatenate([r for r, _ in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
            np.concatenate([np.asarray(labels, np.int32) for _, labels in parts]),
        )
        for split, parts in expected.items()
    }
    return buffer.getvalue(), arrays


@pytest.fixture
def archive(server, tmp_path, monkeypatch):
    """Serves a tiny archive whose md5 stands in for the published one; SGDJAX_DATA in tmp."""
    body, arrays = cifar_archive()
    server.files["cifar-10-python.tar.gz"] = body
    monkeypatch.setattr(_cifar, "CIFAR10_MD5", md5(body))
    monkeypatch.setattr(_cifar, "_tensorflow_installed", lambda: False)
    monkeypatch.setenv("SGDJAX_DATA", str(tmp_path / "home"))
    monkeypatch.delenv(_cifar.CIFAR10_URL_VARIABLE, raising=False)
    return body, arrays


def assert_loaded(loaded, arrays):
    np.testing.assert_array_equal(loaded.train_images, arrays["train"][0])
    np.testing.assert_array_equal(loaded.train_labels, arrays["train"][1])
    np.testing.assert_array_equal(loaded.test_images, arrays["test"][0])
    np.testing.assert_array_equal(loaded.test_labels, arrays["test"][1])
    assert loaded.class_names == data.CIFAR10_CLASSES


def test_cifar10_downloads_once_into_sgdjax_data(server, archive, tmp_path, monkeypatch):
    _, arrays = archive
    monkeypatch.setenv(_cifar.CIFAR10_URL_VARIABLE, server.url("cifar-10-python.tar.gz"))
    assert_loaded(data.load_cifar10(progress=False), arrays)
    home = tmp_path / "home"
    assert leftovers(home) == ["cifar-10-batches-py"]  # no archive, part or temporary
    assert sorted(p.name for p in (home / "cifar-10-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta", ".sgdjax_cache"]
    )
    assert_loaded(data.load_cifar10(progress=False), arrays)
    assert len(server.requests) == 1  # never twice


def test_cifar10_urls_argument_and_user_cache(server, archive, tmp_path, monkeypatch):
    _, arrays = archive
    monkeypatch.delenv("SGDJAX_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "sgdjax"
    urls = [server.url("missing.tar.gz"), server.url("cifar-10-python.tar.gz")]
    assert_loaded(data.load_cifar10(urls=urls, progress=False), arrays)
    assert (tmp_path / "xdg" / "sgdjax" / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar10_download_into_a_given_folder(server, archive, tmp_path):
    _, arrays = archive
    url = server.url("cifar-10-python.tar.gz")
    with pytest.raises(data.DataError, match="no such directory"):  # no surprise downloads
        data.load_cifar10(tmp_path / "mine", urls=url, progress=False)
    assert server.requests == []
    loaded = data.load_cifar10(tmp_path / "mine", download=True, urls=url, progress=False)
    assert_loaded(loaded, arrays)
    assert leftovers(tmp_path / "mine") == ["cifar-10-batches-py"]
    assert not (tmp_path / "home").exists()


def test_cifar10_download_resumes_a_dropped_connection(server, archive, tmp_path):
    body, arrays = archive
    server.drops["cifar-10-python.tar.gz"] = [len(body) // 3]
    loaded = data.load_cifar10(urls=server.url("cifar-10-python.tar.gz"), progress=False)
    assert_loaded(loaded, arrays)
    assert [r for _, r in server.requests] == [None, f"bytes={len(body) // 3}-"]


@pytest.mark.parametrize("fault", ["wrong_checksum", "404", "absent", "dropped"])
def test_cifar10_download_failures_are_one_line_and_leave_nothing(
    server, archive, tmp_path, monkeypatch, fault
):
    url = server.url("cifar-10-python.tar.gz")
    expected = {
        "wrong_checksum": "checksum mismatch",
        "404": "HTTP 404",
        "absent": "connection refused",
        "dropped": "connection dropped after 100 of",
    }[fault]
    if fault == "wrong_checksum":
        monkeypatch.setattr(_cifar, "CIFAR10_MD5", "c58f30108f718f92721af3b95e74349a")
    elif fault == "404":
        url = server.url("elsewhere.tar.gz")
    elif fault == "absent":
        url = f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz"
    else:
        server.drops["cifar-10-python.tar.gz"] = [100, 0, 0, 0]
    with pytest.raises(data.DataError) as raised:
        data.load_cifar10(urls=url, progress=False)
    message = str(raised.value)
    assert expected in message and "\n" not in message
    assert "needs a network connection" in message and "--data-dir" in message
    home = tmp_path / "home"
    assert leftovers(home) == (["cifar-10-python.tar.gz.part"] if fault == "dropped" else [])
    assert not (home / "cifar-10-batches-py").exists()


def test_offline_without_data_is_one_line(archive, monkeypatch):
    # What a machine without a network sees: the home page's host does not resolve.
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(data.DataError) as raised:
        data.load_cifar10(progress=False)
    message = str(raised.value)
    assert message.startswith("cannot download cifar-10-python.tar.gz: https://www.cs.toronto")
    assert "cannot resolve the host" in message and "\n" not in message
    assert "needs a network connection" in message and "give --data-dir a local copy" in message


def test_download_false_never_touches_the_network(archive, monkeypatch):
    monkeypatch.setattr(_cifar, "fetch_file", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(data.DataError, match="not downloaded there and download=False"):
        data.load_cifar10(download=False)
    with pytest.raises(ValueError, match="download must be None, True or False, got 'yes'"):
        data.load_cifar10(download="yes")


def test_stale_unpack_folder_is_removed(server, archive, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    stale = _cache.make_temporary(home, "cifar-10-batches-py")
    (stale / "cifar-10-batches-py").mkdir()
    (stale / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    dead = stale.with_name(stale.name.replace(f"-{os.getpid()}-", "-999999999-"))
    stale.rename(dead)
    data.load_cifar10(urls=server.url("cifar-10-python.tar.gz"), progress=False)
    assert leftovers(home) == ["cifar-10-batches-py"]
