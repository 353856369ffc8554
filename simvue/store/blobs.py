"""Artifact content in a store directory: ``artifacts/<sha256>``, one file per distinct content.

Files are named by the sha256 of their content, so identical content is stored once however
many artifacts (or runs) share it.  Content is first written to a scratch file
(``artifacts/.incoming-*``) while its checksum is computed, then moved into place atomically:
a blob file that exists is always complete.

A store holds a user's data: its directories are created 0700 and its files 0600, whatever
the umask (``private_directory``, ``open_private``); a store made before that is tightened
when its owner opens it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO

from .._util import PRIVATE_DIRECTORY_MODE, open_private, private_directory, tighten

ARTIFACTS_DIRECTORY = "artifacts"
COPY_CHUNK_BYTES = 1 << 20
CHECKSUM = re.compile(r"^[0-9a-f]{64}$")
_SCRATCH_PREFIX = ".incoming-"


class BlobWriter:
    """Content being written: ``write`` chunks, then ``BlobStore.commit`` or ``discard``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._digest = hashlib.sha256()
        self._file: BinaryIO | None = os.fdopen(open_private(path, os.O_WRONLY | os.O_EXCL), "wb")

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._digest.update(data)
        self._file.write(data)
        self.size += len(data)

    def checksum(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    """The content-addressed blobs of one store directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        tighten(self.root, PRIVATE_DIRECTORY_MODE)  # one made by an older simvue

    def path(self, checksum: str) -> Path:
        if not CHECKSUM.match(checksum):  # the checksum becomes a file name
            raise ValueError(f"not a sha256 hex digest: {checksum!r}")
        return self.root / checksum

    def has(self, checksum: str) -> bool:
        return self.path(checksum).exists()

    def writer(self) -> BlobWriter:
        private_directory(self.root)
        return BlobWriter(self.root / f"{_SCRATCH_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")

    def commit(self, writer: BlobWriter) -> str:
        """Move finished content into place (or drop it if that content is already stored);
        returns its checksum."""
        writer.close()
        checksum = writer.checksum()
        target = self.path(checksum)
        if target.exists():
            writer.path.unlink(missing_ok=True)
        else:
            os.replace(writer.path, target)
        return checksum

    def put_file(self, source: str | os.PathLike) -> tuple[str, int]:
        """Copy a file in; ``(checksum, size)``."""
        writer = self.writer()
        try:
            with open(source, "rb") as handle:
                while chunk := handle.read(COPY_CHUNK_BYTES):
                    writer.write(chunk)
            return self.commit(writer), writer.size
        except BaseException:
            writer.discard()
            raise

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        writer = self.writer()
        try:
            writer.write(data)
            return self.commit(writer), writer.size
        except BaseException:
            writer.discard()
            raise

    def read(self, checksum: str) -> bytes:
        return self.path(checksum).read_bytes()

    def remove_scratch(self, pid: int | None = None) -> None:
        """Delete scratch files left by transfers that never finished (of ``pid``, or all)."""
        pattern = f"{_SCRATCH_PREFIX}{'' if pid is None else f'{pid}-'}*"
        if self.root.exists():
            for scratch in self.root.glob(pattern):
                scratch.unlink(missing_ok=True)
