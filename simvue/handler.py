"""``simvue.Handler``: Python ``logging`` records as events of a run.

    logger.addHandler(simvue.Handler(run))

Each record becomes ``run.log_event(formatted message, log_level=...)``: the cost of a
``logging`` call is the formatting plus one buffer append, no I/O.  A handler can be used
from every MPI rank and pool worker (it only calls the ``Run``'s methods, which join the run
on first use) and pickled to ``spawn`` workers with its run.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .validation import MAX_EVENT_LENGTH

# ``logging`` level (lowest number of the band) -> simvue event level; levels in between
# (custom ones) take the band they fall in.
_LEVEL_BANDS = (
    (logging.CRITICAL, "critical"),
    (logging.ERROR, "error"),
    (logging.WARNING, "warning"),
    (logging.INFO, "info"),
)
_TRUNCATED = "\n... [truncated by simvue.Handler]"
_OWN_LOGGER = "simvue"


def event_level(levelno: int) -> str:
    """The simvue event level of a ``logging`` level number."""
    for floor, name in _LEVEL_BANDS:
        if levelno >= floor:
            return name
    return "debug"


class Handler(logging.Handler):
    """A ``logging.Handler`` that records every record it handles as an event of ``run``.

    Never raises into the logging call: a problem (for example a closed run with
    ``suppress_errors=False``) goes to ``handleError``, as for any ``logging`` handler.
    Records of simvue's own loggers and records emitted while this handler is already
    recording (re-entrancy) are skipped, so that the handler cannot loop.
    """

    def __init__(self, run: Any, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.run = run
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "active", False) or record.name.partition(".")[0] == _OWN_LOGGER:
            return
        self._busy.active = True
        try:
            message = self.format(record)
            if len(message) > MAX_EVENT_LENGTH:
                message = message[: MAX_EVENT_LENGTH - len(_TRUNCATED)] + _TRUNCATED
            self.run.log_event(message, log_level=event_level(record.levelno))
        except RecursionError:  # as logging.StreamHandler does
            raise
        except Exception:  # noqa: BLE001 - logging's own policy: report on stderr, never raise
            self.handleError(record)
        finally:
            self._busy.active = False

    def __reduce__(self):
        # The lock and the thread-local cannot be pickled: rebuild them in the worker.
        return _rebuild, (self.__class__, self.run, self.level, self.formatter, list(self.filters))

    def __repr__(self) -> str:
        return f"<simvue.Handler run={getattr(self.run, 'name', None)!r} ({logging.getLevelName(self.level)})>"


def _rebuild(cls: type, run: Any, level: int, formatter: logging.Formatter | None, filters: list) -> Handler:
    handler = cls(run, level)
    handler.setFormatter(formatter)
    for item in filters:
        handler.addFilter(item)
    return handler
