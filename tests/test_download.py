"""fetch_file and CIFAR-10's download against a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

from sgdjax import data


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
