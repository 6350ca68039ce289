"""TensorBoard event files without TensorFlow: TFRecord framing and a few protobuf fields.

An event file is a sequence of TFRecords, each holding one serialized ``tensorflow.Event``:

    record  = length (uint64 LE) | masked_crc32c(length) (uint32 LE)
              | payload (length bytes) | masked_crc32c(payload) (uint32 LE)
    masked_crc32c(b) = ((c >> 15) | (c << 17)) + 0xA282EAD8  (mod 2**32), c = crc32c(b)

CRC32C is the Castagnoli CRC (reflected polynomial 0x82F63B78; ``crc32c(b"123456789") ==
0xE3069283``). The protobuf messages written (field number, wire type):

    Event       wall_time 1 double | step 2 int64 | file_version 3 string
                | summary 5 Summary | session_log 7 SessionLog
    Summary     value 1 repeated Summary.Value
    Value       tag 1 string | simple_value 2 float
    SessionLog  status 1 enum (START = 1)

The first record of a file is ``Event(wall_time, file_version="brain.Event:2")``. A
``SessionLog.START`` event at step s tells TensorBoard that the run restarted at s: it drops
the events with step >= s that it read before (a killed run's orphans).

    with EventFileWriter(logdir) as events:
        events.write_scalars(10, {"loss": 0.25})
    for event in read_events(events.path):
        print(event["step"], event.get("scalars"))
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping

__all__ = ["EventFileWriter", "crc32c", "decode_event", "encode_event", "read_events"]

FILE_VERSION = "brain.Event:2"
SESSION_START = 1


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """The CRC32C (Castagnoli) checksum of `data` (a table: event records are small)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of `data` (the formula in the module docstring)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, the payload's masked CRC."""
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite but beyond float32: what a float32 cast gives
        return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(
    *,
    wall_time: float,
    step: int = 0,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
    session_start: bool = False,
) -> bytes:
    """A serialized ``Event`` with the given fields (scalars as ``simple_value`` float32)."""
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + _float32(value))
            for tag, value in scalars.items()
        )
        out += _bytes_field(5, summary)
    if session_start:
        out += _bytes_field(7, _key(1, 0) + _varint(SESSION_START))
    return out


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field, wire type, value) of a protobuf message; value is an int or the raw bytes."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(data):
        key = varint()
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield field, wire_type, varint()
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            yield field, wire_type, data[pos : pos + size]
            pos += size
        elif wire_type == 2:
            size = varint()
            yield field, wire_type, data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def decode_event(payload: bytes) -> dict:
    """The fields of a serialized ``Event`` that `encode_event` writes, as a dict.

    Keys: 'wall_time', 'step', and when present 'file_version', 'scalars' ({tag: value}),
    'session_log_status'. Other fields are ignored.
    """
    event: dict = {"wall_time": 0.0, "step": 0}
    for field, _, value in _fields(payload):
        if field == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 5:
            scalars = event.setdefault("scalars", {})
            for _, _, entry in _fields(value):
                parts = {f: v for f, _, v in _fields(entry)}
                if 2 in parts:
                    scalars[parts[1].decode()] = struct.unpack("<f", parts[2])[0]
        elif field == 7:
            event["session_log_status"] = dict((f, v) for f, _, v in _fields(value)).get(1, 0)
    return event


def read_records(path: str) -> Iterator[bytes]:
    """The payloads of a TFRecord file; a truncated last record (a killed writer) ends it.

    Raises ValueError on a CRC mismatch.
    """
    with open(path, "rb") as file:
        while True:
            header = file.read(12)
            if len(header) < 12:
                return
            length = header[:8]
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(length):
                raise ValueError(f"{path}: corrupt record length (CRC mismatch)")
            size = struct.unpack("<Q", length)[0]
            payload, footer = file.read(size), file.read(4)
            if len(payload) < size or len(footer) < 4:
                return
            if struct.unpack("<I", footer)[0] != masked_crc32c(payload):
                raise ValueError(f"{path}: corrupt record payload (CRC mismatch)")
            yield payload


def read_events(path: str) -> Iterator[dict]:
    """The events of an event file, decoded by `decode_event`."""
    for payload in read_records(path):
        yield decode_event(payload)


class EventFileWriter:
    """Appends scalar events to a new ``events.out.tfevents.*`` file in `logdir`.

    Every writer opens a new file, named so that files sort in creation order (a killed
    writer's file may end in a partial record, which readers skip). Each write is flushed to
    the OS; `flush` also fsyncs.
    """

    _last_ns = 0

    def __init__(self, logdir: str, *, filename_suffix: str = ".v2"):
        os.makedirs(logdir, exist_ok=True)
        # TensorBoard reads a directory's files in name order: seconds, then nanoseconds.
        now = EventFileWriter._last_ns = max(time.time_ns(), EventFileWriter._last_ns + 1)
        name = (
            f"events.out.tfevents.{now // 10**9:010d}.{now % 10**9:09d}"
            f".{socket.gethostname()}.{os.getpid()}{filename_suffix}"
        )
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._write(encode_event(wall_time=time.time(), file_version=FILE_VERSION))

    def _write(self, payload: bytes) -> None:
        self._file.write(frame_record(payload))
        self._file.flush()

    def write_scalars(
        self, step: int, scalars: Mapping[str, float], wall_time: float | None = None
    ) -> None:
        """One event holding `scalars` ({tag: float}) at `step`."""
        wall_time = time.time() if wall_time is None else wall_time
        self._write(encode_event(wall_time=wall_time, step=step, scalars=scalars))

    def write_session_start(self, step: int) -> None:
        """Marks a (re)start at `step`: TensorBoard discards older events with step >= `step`."""
        self._write(encode_event(wall_time=time.time(), step=step, session_start=True))

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def __enter__(self) -> EventFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
