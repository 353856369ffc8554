"""Counting what could not be delivered, in one place.

Every drop goes through ``LossCounter.record(reason, n)``; totals are reported in the run's
metadata (``simvue.losses``) and in one warning at close.  Nothing is dropped silently.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter


class LossReason(str, enum.Enum):
    SPILLED = "spilled"  # written to a local spill file instead of reaching the aggregator
    BAD_FRAME = "bad_frame"  # unauthenticated or undecodable message at the aggregator
    PROTOCOL_VERSION = "protocol_version"  # an authentic message in another protocol version (another simvue)
    BAD_MESSAGE = "bad_message"  # an authentic message whose body has the wrong shape
    DUPLICATE = "duplicate"  # a message seen twice (dropped, nothing lost)
    GAP = "gap"  # messages a sender sent that never arrived
    LATE_STEP = "late_step"  # a value for a reduced step that had already been written
    UNKNOWN_SENDER = "unknown_sender"  # data from a sender that never said hello
    STORE_FAILED = "store_failed"  # records the store refused, and that could not be spilled either
    STORE_SPILLED = "store_spilled"  # records the store refused (a full disk), kept in its spill/ directory instead
    BAD_RECORD = "bad_record"  # a record the aggregator could not interpret
    ARTIFACT_FAILED = "artifact_failed"  # a saved file or object that could not be stored


class LossCounter:
    """Thread-safe counts of lost or diverted records by reason."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, reason: LossReason, count: int = 1) -> None:
        if count:
            with self._lock:
                self._counts[reason.value] += count

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
