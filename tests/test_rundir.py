"""The run folder: the lock on --out, atomic writes and reading a damaged metrics.jsonl."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from sgdjax.training import _rundir
from sgdjax.training._rundir import (
    RunDirectoryLocked,
    RunLock,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_a_second_writer_in_the_same_process_is_refused_with_one_line(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryLocked) as caught:
            RunLock(tmp_path).acquire()
    message = str(caught.value)
    assert "\n" not in message
    assert f"process {os.getpid()}" in message and str(tmp_path) in message
    assert not (tmp_path / ".lock").exists()  # released on exit
    RunLock(tmp_path).acquire().release()  # and free again


def test_a_live_process_elsewhere_holds_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from sgdjax.training._rundir import RunLock
            RunLock({str(tmp_path)!r}).acquire()
            print("held", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryLocked, match=f"process {holder.pid} on"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The holder was killed without releasing: its lock is stale now and taken over.
    lock = RunLock(tmp_path).acquire()
    assert lock.note is not None and f"process {holder.pid}" in lock.note
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def _write_lock(directory, **record):
    (directory / ".lock").write_text(json.dumps(record))


def test_a_lock_whose_pid_was_reused_by_a_newer_process_is_stale(tmp_path):
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), start_time="-1", since="x")
    with RunLock(tmp_path) as lock:
        assert "no longer runs" in lock.note


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    _write_lock(tmp_path, host="elsewhere.invalid", pid=1, start_time=None, since="x")
    with pytest.raises(RunDirectoryLocked, match="elsewhere.invalid"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "elsewhere.invalid"


def test_an_unreadable_lock_is_refused_and_named(tmp_path):
    (tmp_path / ".lock").write_text("{half")
    with pytest.raises(RunDirectoryLocked, match="unreadable lock.*delete"):
        RunLock(tmp_path).acquire()


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"accuracy": 0.5})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}

    def crash(*args):
        raise KeyboardInterrupt  # a signal arriving between the write and the rename

    monkeypatch.setattr(_rundir.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"accuracy": 0.9})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporaries


def test_metrics_round_trip(tmp_path):
    rows = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    write_jsonl_atomic(tmp_path / "metrics.jsonl", rows)
    assert read_jsonl(tmp_path / "metrics.jsonl") == (rows, [])
    assert read_jsonl(tmp_path / "missing.jsonl") == ([], [])


def test_a_damaged_metrics_file_keeps_what_is_readable_and_says_what_was_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"epoch": 1, "loss": 2.0}\n'
        '["a", "list"]\n'
        '{"note": "a foreign row"}\n'
        '{"epoch": 2, "loss": 1.5}\n'
        '{"epoch": 2, "loss": 1.4}\n'  # a second writer's duplicate
        '{"epoch": "3"}\n'
        "\n"
        '{"epoch": 3, "lo'  # cut short by a crash
    )
    rows, dropped = read_jsonl(path)
    assert rows == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    assert dropped == [
        "line 2: not a metrics row (no epoch)",
        "line 3: not a metrics row (no epoch)",
        "line 5: epoch 2 repeats or goes back",
        "line 6: epoch '3' is not an integer",
        "line 8: not JSON (cut short?)",
    ]
