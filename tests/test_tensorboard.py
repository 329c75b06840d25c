"""ScalarWriter: the event files it writes are read back record by record."""

import glob
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from sgdjax.training import ScalarWriter


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C: rotate right by 15 bits, add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(logdir):
    """Every Event in the one event file in ``logdir``, checking the TFRecord framing.

    A record is: uint64 length, uint32 masked CRC of the length bytes, the data,
    uint32 masked CRC of the data (all little-endian).
    """
    (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    return _read_event_file(path)


def _read_event_file(path):
    """Every Event in the file at ``path``, checking the TFRecord framing."""
    with open(path, "rb") as file:
        data = file.read()
    events, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert length_crc == _masked_crc(header)
        body = data[offset + 12 : offset + 12 + length]
        (body_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert body_crc == _masked_crc(body)
        events.append(event_pb2.Event.FromString(body))
        offset += 16 + length
    assert offset == len(data)
    return events


def _scalars(logdir, events=None):
    """{tag: [(step, value), ...]} from the event file in ``logdir`` (or ``events``)."""
    result = {}
    for event in _read_events(logdir) if events is None else events:
        for value in event.summary.value:
            result.setdefault(value.tag, []).append((event.step, value.simple_value))
    return result


def test_crc32c_matches_its_published_check_value():
    # The CRC-32C (Castagnoli) check value of b"123456789" is 0xE3069283 (RFC 3720, B.4).
    assert crc32c(b"123456789") == 0xE3069283


def test_scalars_read_back_with_their_steps(tmp_path):
    logdir = tmp_path / "tb"
    writer = ScalarWriter(logdir)
    writer.scalars(0, {"train/loss": 2.5, "train/accuracy": 0.125})
    writer.scalars(10, {"train/loss": 1.75, "learning_rate": np.float32(0.05)})
    writer.scalars(20, {"train/loss": jnp.asarray(0.5), "images_per_second": 1234})
    writer.close()

    events = _read_events(logdir)
    assert events[0].file_version == "brain.Event:2"
    assert _scalars(logdir) == {
        "train/loss": [(0, 2.5), (10, 1.75), (20, 0.5)],
        "train/accuracy": [(0, 0.125)],
        "learning_rate": [(10, pytest.approx(0.05, rel=1e-7))],
        "images_per_second": [(20, 1234.0)],
    }


def test_each_call_is_flushed_before_close(tmp_path):
    writer = ScalarWriter(tmp_path)
    writer.scalars(3, {"loss": 0.25})
    assert _scalars(tmp_path) == {"loss": [(3, 0.25)]}
    writer.scalars(4, {"loss": 0.125})
    assert _scalars(tmp_path) == {"loss": [(3, 0.25), (4, 0.125)]}
    writer.close()
    writer.close()  # a second close does nothing


def test_non_finite_values_are_written_as_they_are(tmp_path):
    with ScalarWriter(tmp_path) as writer:
        writer.scalars(1, {"loss": float("nan"), "grad_norm": float("inf")})
    values = _scalars(tmp_path)
    assert math.isnan(values["loss"][0][1])
    assert values["grad_norm"] == [(1, math.inf)]


@pytest.mark.parametrize(
    "step, values, match",
    [
        (-1, {"loss": 1.0}, "step"),
        (1.5, {"loss": 1.0}, "step"),
        (True, {"loss": 1.0}, "step"),
        (1, {"": 1.0}, "tags"),
        (1, {3: 1.0}, "tags"),
        (1, {"loss": np.ones(2)}, "'loss'"),
        (1, {"loss": "high"}, "'loss'"),
        (1, {"loss": 1 + 2j}, "'loss'"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(tmp_path, step, values, match):
    writer = ScalarWriter(tmp_path)
    with pytest.raises(ValueError, match=match):
        writer.scalars(step, {"ok": 1.0, **values})
    writer.close()
    assert _scalars(tmp_path) == {}


def test_closed_writer_and_bad_logdir_raise(tmp_path):
    writer = ScalarWriter(tmp_path / "tb")
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(0, {"loss": 1.0})
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="logdir"):
        ScalarWriter(tmp_path / "file")
    with pytest.raises(ValueError, match="logdir"):
        ScalarWriter("")


def test_two_writers_in_one_folder_keep_separate_files(tmp_path):
    first, second = ScalarWriter(tmp_path), ScalarWriter(tmp_path)
    first.scalars(0, {"loss": 1.0})
    second.scalars(0, {"loss": 2.0})
    first.close()
    second.close()
    paths = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    assert len(paths) == 2
    found = sorted(_scalars(None, _read_event_file(path))["loss"][0][1] for path in paths)
    assert found == [1.0, 2.0]


def test_purge_step_writes_a_session_start_at_that_step(tmp_path):
    with ScalarWriter(tmp_path, purge_step=7) as writer:
        writer.scalars(7, {"loss": 0.5})
    events = _read_events(tmp_path)
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7
    assert events[1].session_log.status == event_pb2.SessionLog.START
    assert _scalars(tmp_path) == {"loss": [(7, 0.5)]}
    with pytest.raises(ValueError, match="purge_step"):
        ScalarWriter(tmp_path, purge_step=-1)
