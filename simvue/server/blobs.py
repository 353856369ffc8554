"""Artifact content on disk: ``DIR/artifacts/<sha256>``, one file per distinct content.

Files are named by their checksum, so identical content is stored once however many artifacts
share it, and an artifact has content exactly when the file for its checksum exists.  An upload
is written to a scratch file while its sha256 is computed, and moved into place only if it
matches the checksum the artifact was declared with.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

CHECKSUM = re.compile(r"^[0-9a-f]{64}$")
_SCRATCH_PREFIX = ".incoming-"


class ChecksumMismatch(ValueError):
    """Uploaded content does not have the checksum its artifact declared."""


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for scratch in self.root.glob(_SCRATCH_PREFIX + "*"):  # uploads cut off by a previous stop
            scratch.unlink(missing_ok=True)

    def path(self, checksum: str) -> Path:
        if not CHECKSUM.match(checksum):  # the checksum becomes a file name
            raise ValueError(f"not a sha256 hex digest: {checksum!r}")
        return self.root / checksum

    def has(self, checksum: str) -> bool:
        return self.path(checksum).exists()

    async def receive(self, chunks: AsyncIterator[bytes], checksum: str) -> int:
        """Store the streamed content if its sha256 is ``checksum``; the number of bytes."""
        target = self.path(checksum)
        scratch = self.root / f"{_SCRATCH_PREFIX}{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(scratch, "wb") as out:
                async for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if digest.hexdigest() != checksum:
                raise ChecksumMismatch(
                    f"uploaded content ({size} bytes) has sha256 {digest.hexdigest()}, "
                    f"but the artifact was created with checksum {checksum}"
                )
            os.replace(scratch, target)
        finally:
            scratch.unlink(missing_ok=True)
        return size
