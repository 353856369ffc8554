"""Putting together artifacts streamed by senders (the wire format is in ``protocol.py``).

Chunks of one transfer are appended to a scratch file in the store's blobs; the artifact is
kept only if its chunks arrived in order and its size and checksum match.  Content saved in
the aggregator's own process is already in the blobs (``transfer`` None).
"""

from __future__ import annotations

from typing import Any

from ..store.blobs import BlobStore, BlobWriter

ARTIFACT_FIELDS = ("category", "size", "checksum", "mime_type", "original_path", "metadata", "created")


class ArtifactAssembly:
    """Transfers under way, by (sender id, transfer id); None marks a broken one."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self._transfers: dict[tuple[bytes, int], BlobWriter | None] = {}

    def chunk(self, sender_id: bytes, transfer: int, offset: int, data: bytes) -> None:
        key = (sender_id, transfer)
        if key not in self._transfers:
            self._transfers[key] = self.blobs.writer() if offset == 0 else None
        writer = self._transfers[key]
        if writer is None:
            return
        if offset != writer.size or not isinstance(data, bytes):
            writer.discard()  # a chunk went missing: the content cannot be trusted
            self._transfers[key] = None
            return
        writer.write(data)

    def complete(self, sender_id: bytes, name: str, info: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """The store row of a finished artifact, or None and why it was not saved."""
        transfer = info.get("transfer")
        if transfer is not None:
            writer = self._transfers.pop((sender_id, transfer), None)
            if info.get("size") == 0 and writer is None:
                writer = self.blobs.writer()  # empty content comes with no chunk
            problem = info.get("error")
            if problem is None and (
                writer is None or writer.size != info.get("size") or writer.checksum() != info.get("checksum")
            ):
                problem = "its content arrived incomplete"
            if problem is not None or writer is None:
                if writer is not None:
                    writer.discard()
                return None, str(problem)
            self.blobs.commit(writer)
        row = {key: info.get(key) for key in ARTIFACT_FIELDS}
        row["name"] = name
        return row, None

    def abandon(self) -> list[bytes]:
        """Drop every unfinished transfer (the run is ending); their senders' ids."""
        senders = []
        for (sender_id, _), writer in self._transfers.items():
            if writer is not None:
                writer.discard()
            senders.append(sender_id)
        self._transfers.clear()
        return senders
