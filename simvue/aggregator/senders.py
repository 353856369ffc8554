"""Bookkeeping of every process that sends to a run: hello, heartbeat, bye, lost.

Pure logic: time comes in as ``now`` arguments, so many-rank scenarios (late joiners, silent
ranks, duplicates) are tested in one process without sleeping.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..losses import LossCounter, LossReason

LIVE, DONE, LOST = "live", "done", "lost"


@dataclasses.dataclass
class SenderState:
    """One sending process as the aggregator sees it."""

    sender_id: bytes
    label: str
    prefix: str
    role: str
    rank: int | None
    pid: int | None
    host: str | None
    last_seen: float
    state: str = LIVE
    last_seq: int = 0
    exit_status: str | None = None
    drain_requested_at: float | None = None
    drained: bool = False
    reason: str | None = None
    cuda: str | None = None  # its CUDA_VISIBLE_DEVICES, for the node's resource sampler
    # Per-commit cache of metric name -> output series, owned by the aggregator.
    series: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "role": self.role, "state": self.state}


class SenderTable:
    """Every sender of one run.

    ``expected_ranks`` is the MPI job size when known: the run is not over until each rank
    has joined and left (or was declared lost).  ``namespace_ranks`` says whether rank
    metrics get a ``rank<k>/`` prefix (every multi-rank job) or keep plain names.
    """

    def __init__(
        self, *, expected_ranks: int, namespace_ranks: bool, timeout_s: float, losses: LossCounter, now: float
    ) -> None:
        self.expected_ranks = expected_ranks
        self.namespace_ranks = namespace_ranks
        self.timeout_s = timeout_s
        self.losses = losses
        self.started = now
        self.by_id: dict[bytes, SenderState] = {}
        self.ranks_seen: set[int] = set()
        self.never_joined: list[int] = []
        self.live_labels: set[str] = set()  # updated in place; the reducer reads it
        self._workers = 0

    def hello(self, sender_id: bytes, info: dict[str, Any], now: float) -> SenderState:
        """Register a sender; a repeated hello (reconnect) returns the existing state."""
        known = self.by_id.get(sender_id)
        if known is not None:
            known.last_seen = now
            return known
        role = info.get("role") or "worker"
        rank = info.get("rank") if role == "rank" else None
        if role == "rank" and isinstance(rank, int):
            label = f"rank{rank}"
            prefix = f"{label}/" if self.namespace_ranks else ""
            self.ranks_seen.add(rank)
        elif role == "process":
            label, prefix = "main", ""
        else:
            label = f"worker{self._workers}"
            prefix = f"{label}/"
            self._workers += 1
        state = SenderState(
            sender_id=sender_id,
            label=label,
            prefix=prefix,
            role=role,
            rank=rank,
            pid=info.get("pid"),
            host=info.get("host"),
            last_seen=now,
            cuda=info.get("cuda") if isinstance(info.get("cuda"), str) else None,
        )
        self.by_id[sender_id] = state
        self.live_labels.add(label)
        return state

    def accept(self, state: SenderState, seq: int, now: float) -> bool:
        """Whether message ``seq`` from ``state`` is new; counts duplicates and gaps."""
        state.last_seen = now
        if seq <= state.last_seq:
            self.losses.record(LossReason.DUPLICATE)
            return False
        if seq > state.last_seq + 1:
            self.losses.record(LossReason.GAP, seq - state.last_seq - 1)
        state.last_seq = seq
        return True

    def bye(self, state: SenderState, status: str | None, now: float) -> None:
        state.last_seen = now
        state.exit_status = status
        if state.state == LIVE:
            state.state = DONE
            self.live_labels.discard(state.label)

    def mark_lost(self, state: SenderState, reason: str) -> None:
        """Declare ``state`` lost: its further messages are still accepted but it is no
        longer waited for."""
        if state.state == LIVE:
            state.state = LOST
            state.reason = reason
            self.live_labels.discard(state.label)

    def tick(self, now: float) -> list[SenderState]:
        """Senders that have just gone silent for longer than the timeout."""
        lost = []
        for state in self.by_id.values():
            if state.state == LIVE and now - state.last_seen > self.timeout_s:
                self.mark_lost(state, f"silent for more than {self.timeout_s:g} s")
                lost.append(state)
        return lost

    def live(self) -> list[SenderState]:
        return [s for s in self.by_id.values() if s.state == LIVE]

    def missing_ranks_count(self) -> int:
        if self.expected_ranks <= 1:
            return 0
        return max(0, self.expected_ranks - len(self.ranks_seen) - len(self.never_joined))

    def give_up_on_missing_ranks(self, now: float) -> list[int]:
        """Ranks that never said hello within the timeout of the run's start."""
        if self.missing_ranks_count() == 0 or now - self.started <= self.timeout_s:
            return []
        missing = [r for r in range(self.expected_ranks) if r not in self.ranks_seen and r not in self.never_joined]
        self.never_joined.extend(missing)
        return missing

    def waiting_for(self, *, workers_drained_ok: bool) -> list[SenderState]:
        """Senders the run must still wait for before it can end."""
        waiting = []
        for state in self.by_id.values():
            if state.state != LIVE:
                continue
            if state.role == "worker" and workers_drained_ok and state.drained:
                continue
            waiting.append(state)
        return waiting
