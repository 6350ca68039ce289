"""TFRecord framing, CRC32C and the Event protobuf, read back by our reader and TensorBoard's."""

import math
import struct

import pytest

from bnjax.train import event_file as ef


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),  # RFC 3720 (iSCSI) B.4 vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data, expected):
    assert ef.crc32c(data) == expected


def test_record_framing_layout():
    record = ef.frame_record(b"abc")
    assert struct.unpack("<Q", record[:8])[0] == 3
    assert struct.unpack("<I", record[8:12])[0] == ef.masked_crc32c(record[:8])
    assert record[12:15] == b"abc"
    assert struct.unpack("<I", record[15:])[0] == ef.masked_crc32c(b"abc")
    crc = ef.crc32c(b"abc")
    assert ef.masked_crc32c(b"abc") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def test_event_round_trip(tmp_path):
    with ef.EventFileWriter(str(tmp_path)) as writer:
        writer.write_scalars(0, {"loss": 1.5})
        writer.write_scalars(2**40, {"loss": 0.25, "acc": 0.75, "big": 1e300, "bad": math.nan})
        writer.write_session_start(7)
    assert writer.path.startswith(str(tmp_path / "events.out.tfevents."))
    events = list(ef.read_events(writer.path))
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[1]["step"] == 0 and events[1]["scalars"] == {"loss": 1.5}
    last = events[2]["scalars"]
    assert events[2]["step"] == 2**40
    assert (last["loss"], last["acc"], last["big"]) == (0.25, 0.75, math.inf)
    assert math.isnan(last["bad"])
    assert events[3]["step"] == 7 and events[3]["session_log_status"] == ef.SESSION_START
    assert all(event["wall_time"] > 1e9 for event in events)


def test_negative_step_varint():
    assert ef.decode_event(ef.encode_event(wall_time=1.0, step=-3))["step"] == -3


def test_truncated_tail_is_skipped_and_bad_crc_raises(tmp_path):
    path = tmp_path / "events.out.tfevents.test"
    records = [ef.frame_record(ef.encode_event(wall_time=1.0, step=s)) for s in (1, 2, 3)]
    data = b"".join(records)
    path.write_bytes(data[:-5])  # a writer killed in the middle of the last record
    assert [e["step"] for e in ef.read_events(str(path))] == [1, 2]
    corrupt = bytearray(data)
    corrupt[len(records[0]) + 14] ^= 0x01  # a payload byte of the second record
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="CRC mismatch"):
        list(ef.read_events(str(path)))


def test_protobuf_runtime_parses_our_events():
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    payload = ef.encode_event(wall_time=12.5, step=42, scalars={"loss": 0.5, "acc": 1.0})
    event = event_pb2.Event.FromString(payload)
    assert (event.wall_time, event.step) == (12.5, 42)
    assert [(v.tag, v.simple_value) for v in event.summary.value] == [("loss", 0.5), ("acc", 1.0)]
    version = event_pb2.Event.FromString(ef.encode_event(wall_time=1.0, file_version="x"))
    assert version.file_version == "x"
    start = event_pb2.Event.FromString(ef.encode_event(wall_time=1.0, step=3, session_start=True))
    assert start.session_log.status == event_pb2.SessionLog.START
