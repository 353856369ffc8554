"""Receiving artifact uploads into the server's blob store (``simvue.store.blobs``).

An upload is written to a scratch file while its sha256 is computed, and moved into place
only if it matches the checksum the artifact was declared with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..store.blobs import CHECKSUM, BlobStore

__all__ = ["CHECKSUM", "BlobStore", "ChecksumMismatch", "receive"]


class ChecksumMismatch(ValueError):
    """Uploaded content does not have the checksum its artifact declared."""


async def receive(blobs: BlobStore, chunks: AsyncIterator[bytes], checksum: str) -> int:
    """Store the streamed content if its sha256 is ``checksum``; the number of bytes."""
    blobs.path(checksum)  # a malformed checksum fails before anything is written
    writer = blobs.writer()
    try:
        async for chunk in chunks:
            writer.write(chunk)
        writer.close()
        if writer.checksum() != checksum:
            raise ChecksumMismatch(  # the first sentence is object storage's, which clients match
                f"The SHA256 you specified did not match the calculated checksum. The uploaded content "
                f"({writer.size} bytes) has sha256 {writer.checksum()}; the artifact was created with {checksum}."
            )
        blobs.commit(writer)
    finally:
        writer.discard()  # nothing left behind: commit has moved the file, or it is unwanted
    return writer.size
