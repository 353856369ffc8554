"""Seeing at once that a process on the aggregator's node has ended.

A sender on another node is lost only after ``sender_timeout_s`` of silence.  On the
aggregator's own node there is no need to wait: a rank that calls ``os._exit`` or dies of a
signal is seen here within ``PROBE_INTERVAL_S``, by its pid and its start time (so a pid
reused by a new process is not mistaken for it).  A zombie counts as ended.
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil

from .senders import SenderState

PROBE_INTERVAL_S = 0.5
_CREATED_TOLERANCE_S = 0.05


class LivenessProbe:
    """Which senders' processes have ended.  A sender is checked only once its process has
    been seen running here: a pid that was never visible (another pid namespace, a host
    with the same name) says nothing, and that sender keeps the heartbeat timeout."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def ended(self, senders: Iterable[SenderState]) -> list[SenderState]:
        out = []
        for state in senders:
            assert state.pid is not None and state.created is not None
            running = process_running(state.pid, state.created)
            if running:
                self._seen.add(state.sender_id)
            elif state.sender_id in self._seen:
                self._seen.discard(state.sender_id)
                out.append(state)
        return out


def process_running(pid: int, created: float) -> bool:
    """Whether the process ``pid`` that started at ``created`` (epoch s) is still running."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if abs(process.create_time() - created) > _CREATED_TOLERANCE_S:
                return False  # the pid belongs to another process now
            return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def own_start_time() -> float | None:
    """This process's start time as ``process_running`` reads it, for its HELLO."""
    try:
        return psutil.Process().create_time()
    except (psutil.Error, OSError):
        return None
