"""Moving saved files and objects (artifacts) to the run's store, off the caller's thread.

``Run.save_file`` and friends check their arguments and hand an ``ArtifactJob`` to the
process's ``ArtifactQueue``; one daemon thread per process, ``simvue-artifacts``, does the
slow part: in the aggregator's process it copies the content into the store's blobs, in any
other process it streams it to the aggregator in chunks (``stream_to_sender``; the wire format
is in ``protocol.py``).  Metrics logged meanwhile are not held up: chunks travel as separate
messages beside them, and at most ``protocol.MAX_ARTIFACT_BYTES_IN_FLIGHT`` bytes are held in
memory.  A job that fails (the file vanished, the aggregator stopped answering) is counted as
``artifact_failed`` and reported on stderr, never raised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..losses import LossCounter, LossReason
from . import protocol
from .protocol import ArtifactChunkRecord, ArtifactRecord, RecordKind

# How long a transfer may wait for room to send its next chunk before it is given up.
STALL_TIMEOUT_S = 60.0
# How long closing a run waits for artifacts still being copied or sent.
CLOSE_TIMEOUT_S = 600.0


@dataclasses.dataclass
class ArtifactJob:
    """One artifact to store: its description and either a file path or the bytes."""

    info: dict[str, Any]  # name, category, mime_type, original_path, metadata, created
    path: str | None = None
    data: bytes | None = None

    def open(self) -> io.BufferedIOBase:
        return open(self.path, "rb") if self.path is not None else io.BytesIO(self.data or b"")


class ArtifactQueue:
    """Runs ``deliver(job)`` for each job in order, on one background thread."""

    def __init__(self, deliver: Callable[[ArtifactJob], None], losses: LossCounter) -> None:
        self._deliver = deliver
        self._losses = losses
        self._jobs: deque[ArtifactJob] = deque()
        self._pending = 0
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, job: ArtifactJob) -> None:
        with self._done:
            self._jobs.append(job)
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="simvue-artifacts", daemon=True)
                self._thread.start()
            self._done.notify_all()

    def wait(self, timeout_s: float) -> bool:
        """Wait until every job put so far is finished; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._done:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._done:
                while not self._jobs:
                    self._done.wait()
                job = self._jobs.popleft()
            try:
                self._deliver(job)
            except Exception as exc:  # noqa: BLE001 - never raised into the user's program
                self._losses.record(LossReason.ARTIFACT_FAILED)
                os.write(2, f"simvue: artifact {job.info.get('name')!r} was not saved: {exc}\n".encode())
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()


class TransferFailed(Exception):
    """The aggregator did not take the content in time, or the sender has stopped."""


class StreamToSender:
    """``deliver`` for a process that is not the aggregator: chunks through its ``Sender``."""

    def __init__(self, sender: Any) -> None:
        self._sender = sender
        self._next_transfer = 0

    def __call__(self, job: ArtifactJob) -> None:
        put = self._sender.put_bulk
        self._next_transfer += 1
        transfer = self._next_transfer
        info = {**job.info, "transfer": transfer}
        digest = hashlib.sha256()
        offset = 0
        try:
            with job.open() as source:
                while chunk := source.read(protocol.ARTIFACT_CHUNK_BYTES):
                    digest.update(chunk)
                    if not put(ArtifactChunkRecord(RecordKind.ARTIFACT_CHUNK, transfer, offset, chunk), len(chunk), STALL_TIMEOUT_S):
                        raise TransferFailed(f"the aggregator did not take it within {STALL_TIMEOUT_S:g} s")
                    offset += len(chunk)
        except OSError as exc:
            put(ArtifactRecord(RecordKind.ARTIFACT, {**info, "error": f"could not read {job.path}: {exc}"}), 0, STALL_TIMEOUT_S)
            raise
        info.update(size=offset, checksum=digest.hexdigest())
        if not put(ArtifactRecord(RecordKind.ARTIFACT, info), 0, STALL_TIMEOUT_S):
            raise TransferFailed(f"the aggregator did not take it within {STALL_TIMEOUT_S:g} s")
