"""Where the aggregator's merged data goes.  A sink is anything with this shape."""

from __future__ import annotations

from typing import Any, Protocol

from ..store import StoreBatch


class Sink(Protocol):
    """Receives one run's merged data from the aggregator thread.

    ``start_run`` is called once, on the thread that calls ``init``, and may raise to reject
    the run; for a resumed run (``resume_id``) it fills in the stored name and folder.
    ``write`` is called on the aggregator thread with one commit's worth of data;
    each write is durable in the local store when it returns.  ``close`` blocks for at most
    ``timeout_s`` and returns whether everything written reached its destination.
    """

    location: str

    def start_run(self, run: dict[str, Any]) -> str: ...

    def write(self, batch: StoreBatch) -> None: ...

    def close(self, timeout_s: float) -> bool: ...
