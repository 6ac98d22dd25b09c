"""Reads back what an offline W&B run wrote: the records of its ``run-<id>.wandb`` file.

The file is a 7-byte W&B header (``":W&B"``, magic ``0xBEE1``, version 0) followed by a
LevelDB-style log: 32 KiB blocks of records, each a 7-byte header (CRC-32 of the type byte
and the data, length, type: FULL, FIRST, MIDDLE or LAST) and its data; a block's tail too
short for a header is zero padding. The data of a whole record is a serialized protobuf
``wandb_internal_pb2.Record``.
"""

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in order; checks each chunk's CRC."""
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B run file"
    records, parts, offset = [], [], HEADER
    while offset + HEADER <= len(data):
        if BLOCK - offset % BLOCK < HEADER:  # a block's padding: records start a new block
            offset += BLOCK - offset % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        chunk = data[offset + HEADER : offset + HEADER + length]
        if len(chunk) < length:
            break  # a record still being written
        offset += HEADER + length
        if kind == 0 and length == 0:
            continue  # zeros written ahead of a record that was never finished
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, "corrupt record"
        parts = [chunk] if kind in (FULL, FIRST) else [*parts, chunk]
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records once the run's exit record is written (W&B writes after ``finish``)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.2)


def history(records: list[wandb_internal_pb2.Record]) -> list[dict[str, object]]:
    """The history rows (one ``run.log`` each), keys joined with ``/``, values decoded."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
