"""Read the history an offline wandb run logged, straight from its ``run-<id>.wandb`` file.

wandb >= 0.2x no longer ships a Python reader, and an offline run writes no summary file, so the
test decodes the transaction log itself: a 7-byte ``:W&B`` header, then LevelDB-log framing
(32 KiB blocks; records of crc32 (4) + length (2, LE) + type (1: full, 2: first, 3: middle,
4: last)) around protobuf ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:  # zero-filled space after the last record
            break
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _records(run_file: Path, kind: str):
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == kind:
            yield getattr(record, kind)


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def history(run_file: Path) -> list[dict]:
    """Every logged history row, as {key: value} including ``_step``."""
    return [{"_step": h.step.num, **_items(h.item)} for h in _records(run_file, "history")]


def config(run_file: Path) -> dict:
    """The run's config, merged over all config records."""
    merged: dict = {}
    for c in _records(run_file, "config"):
        merged.update(_items(c.update))
    return merged
