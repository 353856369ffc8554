"""Small helpers shared by several stages; each need has one home here."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import deque
from typing import Any, TypeVar

T = TypeVar("T")

_UNSAFE_IN_FILENAMES = re.compile(r"[^A-Za-z0-9._-]")


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
