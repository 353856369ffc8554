"""Errors and warnings raised by simvue, and the policy that decides between them.

A tracking problem must never crash the user's program unless the user asked for that with
``run.config(suppress_errors=False)``.  Every public call that rejects its input goes through
:class:`ErrorPolicy`, which either raises or emits one :class:`SimvueWarning` per kind of
problem and counts the rest.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter


class SimvueError(Exception):
    """Base class of every exception simvue raises on purpose."""


class SimvueRunError(SimvueError, RuntimeError):
    """A call was made in the wrong state: before ``init``, after ``close``, or while the
    run could not be created."""


class SimvueValueError(SimvueError, ValueError):
    """A call was given a value simvue cannot record (bad name, non-finite number, ...)."""


class SimvueTypeError(SimvueError, TypeError):
    """A call was given an argument of the wrong type."""


class SimvueWarning(UserWarning):
    """A tracking problem that was reported and skipped instead of raised."""


class ErrorPolicy:
    """Raises, or warns once per kind and counts, depending on ``suppress_errors``.

    Thread-safe.  ``kind`` is a short stable label (``"log_metrics"``, ``"closed"``) used both
    to warn once and to report counts at close.
    """

    def __init__(self, suppress_errors: bool = True) -> None:
        self.suppress_errors = suppress_errors
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def report(self, kind: str, error: SimvueError) -> None:
        """Raise ``error``, or warn (first time for ``kind``) and count it."""
        if not self.suppress_errors:
            raise error
        with self._lock:
            first = kind not in self.dropped
            self.dropped[kind] += 1
        if first:
            warnings.warn(
                f"simvue: {error} (call ignored; further problems of this kind are counted)",
                SimvueWarning,
                stacklevel=4,
            )
