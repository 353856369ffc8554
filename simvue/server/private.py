"""The server's data directory is its owner's alone: 0700 directories, 0600 files.

It holds the token signing secret (whoever reads it can mint tokens), and every run, metric
and artifact the server was sent.  ``simvue server`` and ``simvue server token`` therefore set
the process umask to 077 before they create anything, so that every file they (or SQLite, for
its ``-wal`` and ``-shm`` files) write is private whatever umask they were started with, and
tighten what an older server may have left readable in the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._util import PRIVATE_DIRECTORY_MODE, PRIVATE_FILE_MODE, private_directory, tighten

PRIVATE_UMASK = 0o077


def keep_private() -> None:
    """Make every file and directory this process creates from now on private to its owner.

    For the server's own processes only: the umask is process-wide."""
    os.umask(PRIVATE_UMASK)


def make_private(directory: Path) -> None:
    """Create ``directory`` if needed, and make it and everything in it that this user owns
    private (symbolic links, and what someone else owns, are left alone)."""
    private_directory(directory)
    for root, directories, files in os.walk(directory):
        for name in directories:
            tighten(Path(root, name), PRIVATE_DIRECTORY_MODE)
        for name in files:
            tighten(Path(root, name), PRIVATE_FILE_MODE)
