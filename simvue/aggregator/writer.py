"""Where a run's batches go: the local store, followed by whoever reads it back.

The store is the run's one destination; an uploader to a server is a ``Follower`` of it,
woken when the run's status changes and given time to catch up when the run ends.  A batch
the store refuses is kept and tried again with the next commits, then counted as lost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Protocol

from ..losses import LossCounter, LossReason
from ..store import Store, StoreBatch

MAX_COMMIT_ATTEMPTS = 5
log = logging.getLogger(__name__)


class Follower(Protocol):
    """Reads the run back from the store as it is written (the uploader to a server)."""

    def wake(self) -> None:
        """The run's status changed in the store: act on it now."""

    def finish(self, timeout_s: float) -> bool:
        """The run has ended in the store; returns whether it caught up within ``timeout_s``."""


class RunWriter:
    """Writes run ``run_id``'s batches to ``store``, one transaction each; owns the store
    connection from here on."""

    def __init__(self, store: Store, run_id: str, losses: LossCounter, followers: Sequence[Follower] = ()) -> None:
        self.store = store
        self.run_id = run_id
        self.losses = losses
        self.followers = list(followers)
        self._failed: list[tuple[StoreBatch, int]] = []  # batches to try again, with their attempts

    def write(self, batch: StoreBatch) -> None:
        """Write ``batch`` (after any batch that failed before it); never raises."""
        pending = [*self._failed, (batch, 0)]
        self._failed = []
        for item, attempts in pending:
            try:
                self.store.write(self.run_id, item)
            except Exception as exc:  # noqa: BLE001 - keep the data and try again
                if attempts + 1 >= MAX_COMMIT_ATTEMPTS:
                    self.losses.record(LossReason.STORE_FAILED, item.point_count + len(item.events))
                    os.write(2, f"simvue: could not write to {self.store.path}: {exc!r}; data dropped\n".encode())
                else:
                    self._failed.append((item, attempts + 1))
                continue
            if log.isEnabledFor(logging.DEBUG):
                for _, message, level in item.events:
                    if level in ("error", "warning"):
                        log.debug("run %s: %s", self.run_id, message)
            if item.status is not None or item.ended is not None:
                for follower in self.followers:
                    follower.wake()

    def close(self, timeout_s: float) -> None:
        """Close the store, then give each follower ``timeout_s`` to catch up."""
        self.store.close()
        for follower in self.followers:
            follower.finish(timeout_s)
