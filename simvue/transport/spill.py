"""Spill files: records that could not reach the aggregator, kept on local disk.

A spill file is a sequence of message payloads exactly as they travel on the wire (one
msgpack array ``[version, kind, seq, body]`` each), so ``simvue`` can read them back with
the same decoder.  Writing one is always counted as ``LossReason.SPILLED``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from ..losses import LossCounter, LossReason
from . import protocol


class SpillFile:
    """Appends payloads to one file; safe to call from several threads."""

    def __init__(self, path: Path, losses: LossCounter) -> None:
        self.path = path
        self._losses = losses
        self._lock = threading.Lock()
        self.records = 0

    def write_records(self, records: list) -> None:
        self.write_payloads([msgpack.packb((protocol.PROTOCOL_VERSION, protocol.MessageKind.DATA, 0, records))], len(records))

    def write_payloads(self, payloads: list[bytes], records: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock, open(self.path, "ab") as spill:
                for payload in payloads:
                    spill.write(payload)
        except OSError as exc:
            os.write(2, f"simvue: could not write spill file {self.path}: {exc}\n".encode())
        self.records += records
        self._losses.record(LossReason.SPILLED, records)


def read(path: Path) -> Iterator[tuple[int, int, Any]]:
    """``(kind, seq, body)`` of every message in a spill file."""
    with open(path, "rb") as spill:
        for version, kind, seq, body in msgpack.Unpacker(spill, strict_map_key=False):
            if version == protocol.PROTOCOL_VERSION:
                yield kind, seq, body


def data_records(payload: bytes) -> int:
    """How many records a DATA payload carries (0 for other kinds)."""
    _, kind, _, body = msgpack.unpackb(payload, strict_map_key=False)
    return len(body) if kind == protocol.MessageKind.DATA else 0
