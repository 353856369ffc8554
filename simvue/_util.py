"""Small helpers shared by several stages; each need has one home here."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import sys
from array import array
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_UNSAFE_IN_FILENAMES = re.compile(r"[^A-Za-z0-9._-]")
_LITTLE = sys.byteorder == "little"


def pack_column(column: array) -> bytes:
    """A column of int64 (``q``) or float64 (``d``) as little-endian bytes: the one packing of
    metric columns, on the wire, in the store and to a server."""
    if _LITTLE:
        return column.tobytes()
    swapped = array(column.typecode, column)
    swapped.byteswap()
    return swapped.tobytes()


def unpack_column(typecode: str, blob: bytes) -> array:
    """The column ``pack_column`` made (``typecode``: ``q`` or ``d``)."""
    values = array(typecode)
    values.frombytes(blob)
    if not _LITTLE:
        values.byteswap()
    return values


def drain(buffer: deque[T], limit: int | None = None) -> list[T]:
    """Pop up to ``limit`` items (default: all there are now) from the left of ``buffer``.

    Safe while other threads append: ``popleft`` is atomic, and items appended meanwhile
    stay for the next drain."""
    count = len(buffer) if limit is None else min(limit, len(buffer))
    popleft = buffer.popleft
    return [popleft() for _ in range(count)]


def safe_filename(text: str, fallback: str = "unknown", *, distinct: bool = False) -> str:
    """``text`` with every character but ASCII letters, digits, ``.``, ``_`` and ``-``
    replaced by ``_``: safe in a file name on any file system, never a path.  With
    ``distinct``, a changed name gets a short hash of the original, so that ``a/b`` and
    ``a_b`` (or ``résumé`` and ``r_sum_``) never share a file."""
    safe = _UNSAFE_IN_FILENAMES.sub("_", text)[:100]
    if safe in ("", ".", ".."):
        safe = fallback
    if distinct and safe != text:
        safe = f"{safe}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return safe


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base`` (which is changed and returned): nested dicts merge,
    every other value replaces.  The one rule for run and folder metadata."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = merge_dicts(base[key], value)
        else:
            base[key] = value
    return base


def log_debug_to_stderr() -> None:
    """``Run(debug=True)``: simvue's own ``logging`` records (logger ``simvue``), from DEBUG
    up, written to stderr.  Once per process, however many runs ask."""
    logger = logging.getLogger("simvue")
    logger.setLevel(logging.DEBUG)
    if not any(getattr(handler, "simvue_debug", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("simvue[%(process)d %(threadName)s] %(levelname)s: %(message)s"))
        handler.simvue_debug = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


# Files simvue writes (store, blobs, spill files, a server's data) are their owner's alone.
PRIVATE_DIRECTORY_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def tighten(path: Path, mode: int) -> None:
    """Take away every permission of ``path`` beyond ``mode`` if this user owns it (what
    someone else owns is left as it is, and so is what has vanished).  A no-op where there
    are no POSIX owners (Windows)."""
    if not hasattr(os, "getuid"):
        return
    try:
        status = os.lstat(path)
        if stat.S_ISLNK(status.st_mode):
            return
        if status.st_uid == os.getuid() and stat.S_IMODE(status.st_mode) & ~mode:
            os.chmod(path, stat.S_IMODE(status.st_mode) & mode)
    except OSError:
        pass


def private_directory(path: Path) -> None:
    """Create directory ``path`` (and its parents) readable only by its owner; an existing
    one this user owns is tightened to that.  Parents it creates keep the umask's mode: they
    are the user's directories, not simvue's."""
    path.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    tighten(path, PRIVATE_DIRECTORY_MODE)  # mkdir's mode is only a ceiling; an old one is looser


def open_private(path: Path, flags: int) -> int:
    """``os.open`` a file that is created readable and writable only by its owner (the umask
    can only take permissions away, so 0600 holds whatever it is)."""
    return os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)


def nested(values: Sequence[float], shape: Sequence[int]) -> list:
    """The flat ``values`` (C order) as nested lists of ``shape``."""
    flat: list[Any] = list(values)
    for length in reversed(shape[1:]):
        flat = [flat[i:i + length] for i in range(0, len(flat), length)]
    return flat
