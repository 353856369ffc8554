"""Bookkeeping of every process whose records go into a run: hello, heartbeat, bye, lost.

Two kinds of producer:

* the **local producer**, the aggregating process itself (rank 0, the pool's parent, or the
  only process).  Its records come straight from its buffer; it cannot go silent, and it
  leaves only when it closes its part of the run;
* **senders**, every other process, known by their socket id.  A sender is live from its
  HELLO until its BYE, or until it is declared lost: silent for longer than ``timeout_s``
  (any node), or its process seen gone (the aggregator's own node, see ``liveness``).

Pure logic: time comes in as ``now`` arguments, so many-rank scenarios (late joiners,
silent ranks, duplicates) are tested in one process without sleeping.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal, cast

from ..losses import LossCounter, LossReason

# "host": the aggregator's own process when it runs apart from the job's processes
# (``simvue.aggregator.host``); it logs nothing of its own and is not a rank.
Role = Literal["rank", "worker", "process", "host"]
ROLES: tuple[Role, ...] = ("rank", "worker", "process", "host")

# A process on the aggregator's node that was seen gone is declared lost this long after,
# so that what it sent just before it ended is still read from the socket first.
GONE_GRACE_S = 1.0


class Presence(str, enum.Enum):
    """Where a producer stands in the run."""

    LIVE = "live"  # part of the run; the run waits for it
    DONE = "done"  # said goodbye (or, a pool worker, drained and then ended)
    LOST = "lost"  # silent too long or ended without goodbye; no longer waited for


LIVE, DONE, LOST = Presence.LIVE, Presence.DONE, Presence.LOST


@dataclasses.dataclass(eq=False, kw_only=True)
class Producer:
    """A process whose records go into the run, as the aggregator sees it."""

    label: str  # rank3, worker0, main
    prefix: str  # what its metric names get: "rank3/", "worker0/", ""
    role: Role
    rank: int | None
    pid: int | None
    host: str | None
    cuda: str | None = None  # its CUDA_VISIBLE_DEVICES, for the node's resource sampler
    pid_namespace: str | None = None  # whose pids it shares (see ``liveness.pid_namespace``)
    sample_pid: int | None = None  # the process its resource figures follow (``Run.set_pid``); None: its own
    presence: Presence = LIVE
    exit_status: str | None = None  # the final status it reported with its goodbye
    reason: str | None = None  # why it was lost
    # Per-commit cache of metric name -> ingest target, owned by the aggregator state.
    series: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def live(self) -> bool:
        return self.presence is LIVE

    def describe(self) -> dict[str, Any]:
        described = {"pid": self.pid, "host": self.host, "role": self.role, "state": self.presence.value}
        if self.sample_pid is not None:
            described["sampled_pid"] = self.sample_pid
        return described


@dataclasses.dataclass(eq=False, kw_only=True)
class SenderState(Producer):
    """A producer in another process, reached through the aggregator's socket."""

    sender_id: bytes
    last_seen: float
    last_seq: int = 0
    created: float | None = None  # its process's start time, from HELLO (liveness checks)
    gone_since: float | None = None  # when its process was first seen gone
    drain_requested_at: float | None = None
    drained: bool = False
    # Acknowledged means durable: messages up to ``covered_seq`` are in a batch handed to
    # the store, up to ``committed_seq`` in the store; only the latter is acknowledged.
    covered_seq: int = 0
    committed_seq: int = 0
    # The process that started the run, when the aggregator runs in a process of its own:
    # its goodbye (or its loss) is the run's close, as the local producer's is otherwise.
    owner: bool = False
    # A sender whose relay died says HELLO again directly and sends every message it has
    # not had acknowledged: those up to ``resend_upto`` may have arrived already, and are
    # counted as ``resent``, not as duplicates (nothing was lost or doubled).
    resend_upto: int = 0
    resent: int = 0

    def describe(self) -> dict[str, Any]:
        # ``sender`` and ``last_seq`` say which of its messages the store holds, so that
        # importing its spill file (``simvue spill import``) adds only the rest.
        described = {**super().describe(), "sender": self.sender_id.hex(), "last_seq": self.last_seq}
        if self.resent:
            described["resent"] = self.resent
        return described


class SenderTable:
    """The local producer and every sender of one run.

    ``expected_ranks`` is the MPI job size when known: the run is not over until each rank
    has joined and left (or was declared lost).  ``namespace_ranks`` says whether rank
    metrics get a ``rank<k>/`` prefix (every multi-rank job) or keep plain names.
    """

    def __init__(
        self,
        *,
        local: Mapping[str, Any],
        local_label: str | None = None,
        expected_ranks: int,
        namespace_ranks: bool,
        timeout_s: float,
        losses: LossCounter,
        now: float,
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
        self._owner_id: bytes | None = None
        identity = self._identity(local)
        if local_label is not None:  # the label another aggregator gave it (importing a spill file)
            identity.update(label=local_label, prefix="" if local_label == "main" else f"{local_label}/")
        self.local = Producer(**identity)
        if self.local.role != "host":
            self.live_labels.add(self.local.label)

    def _identity(self, info: Mapping[str, Any]) -> dict[str, Any]:
        """Label, prefix, role and process facts of a producer from its HELLO fields."""
        role = cast(Role, info.get("role") if info.get("role") in ROLES else "worker")
        rank = info.get("rank")
        if role == "rank" and rank.__class__ is int and rank >= 0:
            label = f"rank{rank}"
            prefix = f"{label}/" if self.namespace_ranks else ""
            self.ranks_seen.add(rank)
            if rank in self.never_joined:  # given up on, but here after all
                self.never_joined.remove(rank)
        elif role == "process":
            label, prefix, rank = "main", "", None
        elif role == "host":
            label, prefix, rank = "aggregator", "", None
        else:
            if rank.__class__ is int and 0 <= rank < self.expected_ranks:
                # A worker on one of the job's ranks (mpi4py.futures starts workers on ranks
                # 1..N-1 that never call init): that rank is here, only not as a rank of its own.
                self.ranks_seen.add(rank)
                if rank in self.never_joined:
                    self.never_joined.remove(rank)
            role, rank = "worker", None
            label = f"worker{self._workers}"
            prefix = f"{label}/"
            self._workers += 1
        return {
            "label": label,
            "prefix": prefix,
            "role": role,
            "rank": rank,
            "pid": _int_or_none(info.get("pid")),
            "host": info.get("host") if isinstance(info.get("host"), str) else None,
            "cuda": info.get("cuda") if isinstance(info.get("cuda"), str) else None,
            "pid_namespace": info.get("pid_namespace") if isinstance(info.get("pid_namespace"), str) else None,
        }

    def hello(self, sender_id: bytes, info: Mapping[str, Any], now: float) -> SenderState:
        """Register a sender; a repeated hello (reconnect) returns the existing state."""
        known = self.by_id.get(sender_id)
        if known is not None:
            known.last_seen = now
            return known
        created = info.get("created")
        state = SenderState(
            **self._identity(info),
            sender_id=sender_id,
            last_seen=now,
            created=float(created) if created.__class__ in (int, float) and math.isfinite(created) else None,
            owner=info.get("owner") is True and self.local.role == "host" and self.owner is None,
        )
        self.by_id[sender_id] = state
        self.live_labels.add(state.label)
        if state.owner:
            self._owner_id = sender_id
        return state

    def accept(self, state: SenderState, seq: int, now: float) -> bool:
        """Whether message ``seq`` from ``state`` is new; counts duplicates and gaps."""
        state.last_seen = now
        if seq <= state.last_seq:
            if seq <= state.resend_upto:
                state.resent += 1
            else:
                self.losses.record(LossReason.DUPLICATE)
            return False
        if seq > state.last_seq + 1:
            self.losses.record(LossReason.GAP, seq - state.last_seq - 1)
        state.last_seq = seq
        state.resend_upto = 0  # past what was sent again: a repeat from now on is a duplicate
        return True

    def seen_alive(self, sender_id: bytes, now: float) -> None:
        """A relay heard from ``sender_id`` recently (``NODE_HEARTBEAT``): as its heartbeat."""
        state = self.by_id.get(sender_id)
        if state is not None:
            state.last_seen = max(state.last_seen, now)

    def bye(self, producer: Producer, status: str | None) -> None:
        """``producer`` has left the run, reporting ``status`` (None: no opinion)."""
        producer.exit_status = status
        if producer.presence is LIVE:
            producer.presence = DONE
            self.live_labels.discard(producer.label)

    def mark_lost(self, state: SenderState, reason: str) -> bool:
        """Declare ``state`` lost; its further messages are still accepted, but it is no
        longer waited for.  Returns whether it was live until now."""
        if state.presence is not LIVE:
            return False
        state.presence = LOST
        state.reason = reason
        self.live_labels.discard(state.label)
        return True

    def process_gone(self, state: SenderState, now: float) -> None:
        """``state``'s process was seen to have ended (on the aggregator's node)."""
        if state.presence is LIVE and state.gone_since is None:
            state.gone_since = now

    def tick(self, now: float) -> list[SenderState]:
        """Senders lost as of ``now``: silent for longer than the timeout, or whose process
        was seen gone ``GONE_GRACE_S`` ago.  A gone pool worker that had drained has done
        its part: it leaves quietly."""
        lost = []
        for state in self.by_id.values():
            if state.presence is not LIVE:
                continue
            if state.gone_since is not None and now - state.gone_since >= GONE_GRACE_S:
                if state.drained:
                    self.bye(state, None)
                elif self.mark_lost(state, "its process ended without closing its part of the run"):
                    lost.append(state)
            elif now - state.last_seen > self.timeout_s:
                if self.mark_lost(state, f"silent for more than {self.timeout_s:g} s"):
                    lost.append(state)
        return lost

    def live(self) -> list[SenderState]:
        """Senders still part of the run (the local producer is not a sender)."""
        return [s for s in self.by_id.values() if s.presence is LIVE]

    def producers(self) -> Iterator[Producer]:
        """The local producer (unless it is a helper process, ``host``), then every sender."""
        if self.local.role != "host":
            yield self.local
        yield from self.by_id.values()

    @property
    def owner(self) -> SenderState | None:
        """The sender whose goodbye closes the run (see ``SenderState.owner``)."""
        return self.by_id.get(self._owner_id) if self._owner_id is not None else None

    def missing_ranks_count(self) -> int:
        if self.expected_ranks <= 1:
            return 0
        return max(0, self.expected_ranks - len(self.ranks_seen) - len(self.never_joined))

    def missing_ranks(self) -> list[int]:
        """Expected ranks that have not said hello and are not given up on."""
        if self.missing_ranks_count() == 0:
            return []
        return [r for r in range(self.expected_ranks) if r not in self.ranks_seen and r not in self.never_joined]

    def give_up_on_missing_ranks(self, now: float, join_timeout_s: float | None = None) -> list[int]:
        """Ranks that never said hello within ``join_timeout_s`` (default: the sender
        timeout) of the run's start."""
        limit = self.timeout_s if join_timeout_s is None else join_timeout_s
        if self.missing_ranks_count() == 0 or now - self.started <= limit:
            return []
        missing = [r for r in range(self.expected_ranks) if r not in self.ranks_seen and r not in self.never_joined]
        self.never_joined.extend(missing)
        return missing

    def waiting_for(self) -> list[Producer]:
        """Producers the run must still wait for before it can end (a pool worker that has
        drained is not waited for: a pool keeps its workers until it is closed)."""
        return [
            p for p in (self.local, *self.by_id.values())
            if p.presence is LIVE and not (isinstance(p, SenderState) and p.role == "worker" and p.drained)
        ]


def _int_or_none(value: Any) -> int | None:
    return value if value.__class__ is int else None
