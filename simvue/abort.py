"""A run's request to stop, shared by whatever raises it and whatever acts on it.

Raised by the server (the uploader's abort poll), by a critical alert that asks for it, or,
in a process that is not the aggregator, by an ABORT message.  Acted on by this process's
``Run`` handles (callback, then the ``abort_on_alert`` action) and, in the aggregator, by
telling every other process.  One object per run and process, made by ``session`` and given
to each part when it is built.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[str], None]


class AbortSignal:
    """Set once, with a reason; each listener is called once, on the thread that set it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._listeners: list[Listener] = []

    @property
    def is_set(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def request(self, reason: str) -> bool:
        """Ask the run to stop; returns False if it had been asked already.  Listeners must
        not block: they run on the caller's thread (a transport or upload thread)."""
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(reason)
        return True

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(reason)`` when the run is asked to stop (at once if it has been)."""
        with self._lock:
            if self._reason is None:
                self._listeners.append(listener)
                return
            reason = self._reason
        listener(reason)
