"""Spill files: records that could not reach the aggregator, kept on local disk.

A spill file is a sequence of message payloads exactly as they travel on the wire (one
msgpack array ``[version, kind, seq, body]`` each), so they are read back with the same
decoder.  Its first entry is a HELLO whose body says who wrote it and for which run
(``{run_id, run_name, sender, label, hello}``); then DATA messages, with the sequence number
they had (0 for records spilled before they were ever sent).  ``simvue spill import`` puts
them into their run, skipping what the run already holds (``simvue.cli.spill``).  Writing
one is always counted as ``LossReason.SPILLED``.  Files are readable by their owner only.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from .._util import open_private, private_directory
from ..losses import LossCounter, LossReason
from . import protocol
from .columns import record_count
from .protocol import MessageKind


class SpillFile:
    """Appends payloads to one file; safe to call from several threads.  ``header()`` gives
    the body of the file's first entry, when the first records are written."""

    def __init__(self, path: Path, losses: LossCounter, header: Callable[[], dict[str, Any]] | None = None) -> None:
        self.path = path
        self._losses = losses
        self._header = header or dict
        self._lock = threading.Lock()
        self.records = 0

    def write_records(self, records: list) -> None:
        """Records never sent (no sequence number)."""
        self.write_payloads([_payload(MessageKind.DATA, 0, records)], len(records))

    def write_payloads(self, payloads: list[bytes], records: int) -> None:
        try:
            private_directory(self.path.parent)
            with self._lock:
                fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
                with os.fdopen(fd, "ab") as spill:
                    if spill.tell() == 0:
                        spill.write(_payload(MessageKind.HELLO, 0, self._header()))
                    for payload in payloads:
                        spill.write(payload)
        except OSError as exc:
            os.write(2, f"simvue: could not write spill file {self.path}: {exc}\n".encode())
        self.records += records
        self._losses.record(LossReason.SPILLED, records)


def _payload(kind: MessageKind, seq: int, body: Any) -> bytes:
    return msgpack.packb((protocol.PROTOCOL_VERSION, kind, seq, body))


def read(path: Path, unreadable: Counter[Any] | None = None) -> Iterator[tuple[int, int, Any]]:
    """``(kind, seq, body)`` of every entry of a spill file, the header first.  Files written
    by an earlier protocol version (``protocol.READABLE_VERSIONS``) read the same; an entry of
    any other version (a later simvue's) is skipped and counted in ``unreadable`` by version."""
    with open(path, "rb") as spill:
        for entry in msgpack.Unpacker(spill, strict_map_key=False):
            if isinstance(entry, list) and len(entry) == 4 and entry[0] in protocol.READABLE_VERSIONS:
                yield entry[1], entry[2], entry[3]
            elif unreadable is not None:
                unreadable[entry[0] if isinstance(entry, list) and entry else None] += 1


def data_records(payload: bytes) -> int:
    """How many records a DATA payload carries (0 for other kinds); a METRIC_COLUMNS record
    counts as the records it holds."""
    _, kind, _, body = msgpack.unpackb(payload, strict_map_key=False)
    return record_count(body) if kind == MessageKind.DATA else 0
