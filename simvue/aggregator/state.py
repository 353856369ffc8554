"""The aggregator's logic as a state machine: stimuli in, instructions and store batches out.

``AggregatorState`` holds everything one run's aggregation knows: the producers (the local
one and every sender), the reducer, the alerts, artifacts being put together, who samples
which node, and the batch that the next commit writes.  It does no socket I/O, starts no
thread and never sleeps; time comes from an injected ``Clock``.  So hours of a run, with
many ranks joining, idling, going silent and leaving, are tested in milliseconds
(tests/unit/test_aggregator_state.py).

The stimuli, each called by the I/O shell (``service.Aggregator``) on its one thread:

* ``receive(sender_id, message)``: a decoded message from a sender;
* ``bad_frame(version)``: a frame that failed authentication or decoding, or an authentic
  one in another protocol ``version``;
* ``local_records(records)``: what the aggregating process itself recorded;
* ``process_gone(sender_id)``: a sender's process on this node has ended;
* ``close_local(status)``: the aggregating process closed its part of the run;
* ``tick()``: the clock moved on (timeouts, waits, plans).

Each returns the instructions for the shell (``Reply``, ``SampleHere``).  ``take_batch()``
hands over what the next commit writes; ``finish()`` the last batch, with the final status.
Nothing a sender sends can raise out of ``receive``: a malformed message or record is
dropped and counted.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .._util import merge_dicts
from ..abort import AbortSignal
from ..config import REDUCERS, Settings
from ..losses import LossCounter, LossReason
from ..resources.emissions import EmissionEstimate
from ..store import STOPPING, SeriesChunk, StoreBatch
from ..store.blobs import BlobStore
from ..transport.columns import read_columns, record_count
from ..transport.protocol import (
    PROTOCOL_VERSION,
    RECORD_TYPES,
    AlertAttachRecord,
    AlertRecord,
    AlertStateRecord,
    ArtifactChunkRecord,
    ArtifactRecord,
    EventRecord,
    FolderRecord,
    GridRecord,
    Message,
    MessageKind,
    MetadataRecord,
    MetricColumnsRecord,
    RecordKind,
    ResourcesRecord,
    SamplePidRecord,
    StatusRecord,
    TagsRecord,
    TagsSetRecord,
    TensorRecord,
)
from ..validation import EVENT_LEVELS, FINAL_STATUSES, INT64_MAX, RUN_STATUSES
from .alerts import CRITICAL, AlertEngine, AlertSpec, Transition
from .arrays import GridBook, checked_value, combine_arrays
from .artifacts import ArtifactAssembly
from .instructions import Instruction, Notice, Reply
from .merge import Reducer
from .sampling import SamplingPlanner
from .senders import LOST, Producer, SenderState, SenderTable

RUN_HEARTBEAT_INTERVAL_S = 1.0  # how often the run's heartbeat in the store is refreshed
# Ranks that have not joined this long after the run's start are named on stderr at once.
JOIN_WARNING_S = 5.0
# Rank 0 stops waiting for a rank that never joined this long after the ranks themselves
# give up looking for it (rendezvous_timeout_s): they have spilled and gone by then.
JOIN_GRACE_S = 10.0
_LOSS_REASONS = {reason.value for reason in LossReason}
_METRICS = RecordKind.METRICS


class Clock(Protocol):
    """Where the state reads the time: ``monotonic()`` for intervals and timeouts,
    ``time()`` (epoch seconds) for what is stored."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


class _Reduced:
    """Stands in for a series in the ingest loop: a point added here goes to the reducer
    (and, with ``namespace``, to the producer's own series too)."""

    __slots__ = ("also", "clock", "label", "name", "reducer")

    def __init__(self, reducer: Reducer, label: str, name: str, also: SeriesChunk | None, clock: Clock) -> None:
        self.reducer, self.label, self.name, self.also, self.clock = reducer, label, name, also, clock

    def add(self, step: int, t: float, ts: float, value: float) -> None:
        self.reducer.add(self.label, self.name, step, t, ts, value, self.clock.monotonic())
        if self.also is not None:
            self.also.append(step, t, ts, value)

    def add_columns(
        self, steps: array, times: array, timestamps: array, values: array, step_min: int, step_max: int
    ) -> None:
        self.reducer.add_points(self.label, self.name, steps, times, timestamps, values, self.clock.monotonic())
        if self.also is not None:
            self.also.extend_columns(steps, times, timestamps, values, step_min, step_max)


class AggregatorState:
    """One run's aggregation.  ``run`` is ``{"name", "id", "started"}``; ``local`` is the
    HELLO fields of the aggregating process (``session._hello``), ``local_label`` the label
    it gets if not the one its fields give (a spill file's process, when it is imported)."""

    def __init__(
        self,
        *,
        run: Mapping[str, Any],
        settings: Settings,
        local: Mapping[str, Any],
        local_label: str | None = None,
        expected_ranks: int,
        namespace_ranks: bool,
        blobs: BlobStore,
        abort: AbortSignal,
        losses: LossCounter | None = None,
        clock: Clock | None = None,
        status: str = "running",
    ) -> None:
        self.run = {"name": run["name"], "id": run["id"], "started": run["started"]}
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.losses = losses or LossCounter()
        self.abort = abort
        self.table = SenderTable(
            local=local,
            local_label=local_label,
            expected_ranks=expected_ranks,
            namespace_ranks=namespace_ranks,
            timeout_s=settings.sender_timeout_s,
            losses=self.losses,
            now=self.clock.monotonic(),
        )
        self.host: str = self.table.local.host or ""
        self.reducer = Reducer(
            settings.reduce,
            wait_s=settings.reduce_wait_s,
            live_labels=self.table.live_labels,
            missing=self.table.missing_ranks_count,
            emit=self._emit_reduced,
            losses=self.losses,
        )
        self.grids = GridBook()
        self.array_reducer = Reducer(
            settings.reduce,
            wait_s=settings.reduce_wait_s,
            live_labels=self.table.live_labels,
            missing=self.table.missing_ranks_count,
            emit=self._emit_reduced_array,
            emit_count=self._emit_reduced,
            combine=combine_arrays,
            losses=self.losses,
        )
        self.alerts = AlertEngine()
        self.artifacts = ArtifactAssembly(blobs)
        self.sampling = SamplingPlanner(self.host, settings.resources_interval_s)
        self._sampling_changed = True
        self._resource_steps: dict[str, int] = {}
        self.emissions = (
            EmissionEstimate(settings.cpu_watts_per_core, settings.co2_grams_per_kwh)
            if settings.enable_emission_metrics else None
        )
        self._emission_step = 0
        self._batch = StoreBatch()
        self._batch.metadata = {"simvue": {"processes": {p.label: p.describe() for p in self.table.producers()}}}
        if local_label is None:  # (not a spill file's import) where the aggregator runs: ``aggregate_in``
            me = self.table.local
            self._batch.metadata["simvue"]["aggregator"] = {
                "pid": me.pid, "host": me.host, "in": "process" if me.role == "host" else "thread",
            }
        self._status = status  # the latest non-final status
        self._user_status: str | None = None  # a final status the user set
        self._closing_since: float | None = None
        self._abort_announced = False
        self._join_warned = False
        self._join_timeout_s = min(settings.sender_timeout_s, settings.rendezvous_timeout_s + JOIN_GRACE_S)
        self._last_heartbeat = float("-inf")
        self.final_status: str | None = None
        self._control: dict[RecordKind, Callable[[Producer, Any], None]] = {
            RecordKind.EVENT: self._on_event,
            RecordKind.METADATA: self._on_metadata,
            RecordKind.TAGS: self._on_tags,
            RecordKind.STATUS: self._on_status,
            RecordKind.FOLDER: self._on_folder,
            RecordKind.ALERT: self._on_alert,
            RecordKind.ALERT_STATE: self._on_alert_state,
            RecordKind.ARTIFACT: self._on_artifact,
            RecordKind.ARTIFACT_CHUNK: self._on_artifact_chunk,
            RecordKind.RESOURCES: self._on_resources,
            RecordKind.GRID: self._on_grid,
            RecordKind.TENSOR: self._on_tensor,
            RecordKind.TAGS_SET: self._on_tags_set,
            RecordKind.ALERT_ATTACH: self._on_alert_attach,
            RecordKind.SAMPLE_PID: self._on_sample_pid,
            RecordKind.METRIC_COLUMNS: self._on_metric_columns,
        }
        self._versions_warned: set[int] = set()

    # -- queries --------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing_since is not None

    def continue_resource_steps(self, next_steps: Mapping[str, int]) -> None:
        """Number each host's resource samples from ``next_steps[host]`` on (a run that
        already has samples of that host, when a spill file is imported into it)."""
        self._resource_steps.update(next_steps)

    @property
    def pending_points(self) -> int:
        """Metric points waiting for the next commit."""
        return self._batch.point_count

    def can_finish(self) -> bool:
        """The local producer has closed and nobody else is to be waited for."""
        return self.closing and not self.table.missing_ranks_count() and not self.table.waiting_for()

    def only_ranks_left(self) -> bool:
        """The local producer has closed and every pool worker has drained: what remains
        are other MPI ranks, which finish the run in their own time."""
        return self.closing and all(p.role == "rank" for p in self.table.waiting_for())

    def senders_to_probe(self) -> list[SenderState]:
        """Live senders whose process the aggregator can check by pid: those that share its
        pid namespace (``liveness``) and are not yet known to have ended."""
        namespace = self.table.local.pid_namespace
        return [
            s for s in self.table.live()
            if namespace is not None and s.pid_namespace == namespace and s.pid is not None and s.created is not None
            and s.gone_since is None
        ]

    # -- stimuli --------------------------------------------------------------------------

    def receive(self, sender_id: bytes, message: Message) -> list[Instruction]:
        """One authenticated message from ``sender_id``; never raises."""
        try:
            return self._receive(sender_id, message)
        except Exception:  # noqa: BLE001 - a signed but malformed message must not end the run
            self.losses.record(LossReason.BAD_MESSAGE)
            return []

    def bad_frame(self, version: int | None = None) -> list[Instruction]:
        """A frame that failed authentication or decoding; or, with ``version``, an authentic
        message in another protocol version, which is counted apart and named once per
        version (a process of the job runs another simvue)."""
        if version is None:
            self.losses.record(LossReason.BAD_FRAME)
            return []
        self.losses.record(LossReason.PROTOCOL_VERSION)
        if version in self._versions_warned:
            return []
        self._versions_warned.add(version)
        text = (
            f"a process sent messages in protocol version {version}; this aggregator speaks version"
            f" {PROTOCOL_VERSION} (two versions of simvue in one job): they are dropped and counted"
            " (simvue.losses.protocol_version); that process keeps what it logs in its spill file"
        )
        self._event(text, "error")
        return [Notice(f"simvue: {text}")]

    def local_records(self, records: Sequence[Any]) -> None:
        """Records of the aggregating process itself, in the order it made them."""
        if records:
            self._ingest(self.table.local, records)

    def process_gone(self, sender_id: bytes) -> None:
        """The process of ``sender_id`` (on this node) has ended; unless it said goodbye
        meanwhile, it is lost ``senders.GONE_GRACE_S`` from now."""
        state = self.table.by_id.get(sender_id)
        if state is not None:
            self.table.process_gone(state, self.clock.monotonic())

    def close_local(self, status: str | None) -> list[Instruction]:
        """The aggregating process (or, when the aggregator has a process of its own, the
        run's owner) has closed its part, with ``status`` (None: no opinion).
        Pool workers are asked to send what they hold (DRAIN): a pool keeps its workers
        until it is closed, so the run cannot wait for them to exit."""
        if self.closing:
            return []
        now = self.clock.monotonic()
        self._closing_since = now
        self.table.bye(self.table.local, status if status in FINAL_STATUSES else None)
        self.lose_senders_seen_gone()
        if status in ("failed", "terminated") and self._user_status is None:
            # Stored with the next commit, before waiting for anyone: if the job is killed
            # while the run finishes (a launcher's SIGKILL after SIGTERM), it still says so,
            # with when it ended and which processes had not finished then.  The final
            # commit replaces both once everyone has said goodbye.
            self._batch.status = status
            self._batch.ended = self.clock.time()
            self._merge_metadata({"simvue": {"processes": {
                p.label: {**p.describe(), **({"state": STOPPING} if p.live else {})} for p in self.table.producers()
            }}})
        # The abort first: the run may be closing because of it, before a tick announced it,
        # and drained workers must still hear it.
        out: list[Instruction] = self._announce_abort()
        for state in self.table.live():
            if state.role == "worker":
                state.drain_requested_at = now
                out.append(Reply(state.sender_id, MessageKind.DRAIN, None))
        return out

    def lose_senders_seen_gone(self) -> None:
        """The run is ending: senders whose process was seen gone are lost now, without the
        grace (``process_gone``) that lets their last messages arrive."""
        for sender in self.table.live():
            if sender.gone_since is not None and self.table.mark_lost(sender, "its process ended without closing its part of the run"):
                self._report_lost(sender)

    def stop_waiting(self) -> None:
        """The job is being stopped (a signal to every process): end the run with whoever
        has left; those seen gone are lost, those still live are counted as stopped with it
        (``terminated``)."""
        self.lose_senders_seen_gone()
        for sender in self.table.live():
            self._event(f"{sender.label} had not said goodbye when the job was stopped", "warning")
            self.table.bye(sender, "terminated")
        self.table.never_joined.extend(self.table.missing_ranks())

    def tick(self) -> list[Instruction]:
        """Time-driven work: lost senders, ranks that never joined, workers that did not
        drain, reduced steps that waited long enough, the abort, sampling plans."""
        now = self.clock.monotonic()
        out: list[Instruction] = []
        for state in self.table.tick(now):
            self._report_lost(state)
            if state.owner:
                out.extend(self.close_local("failed"))  # the run's owner died: the run ends
        if not self._join_warned and now - self.table.started >= JOIN_WARNING_S and self.table.missing_ranks():
            self._join_warned = True
            out.append(Notice(self._join_notice(self.table.missing_ranks())))
        for rank in self.table.give_up_on_missing_ranks(now, self._join_timeout_s):
            self._event(f"rank{rank} never joined the run within {self._join_timeout_s:g} s", "error")
            self._merge_metadata({"simvue": {"lost": {f"rank{rank}": "never joined"}}})
        if self._closing_since is not None and now - self._closing_since > self.settings.close_timeout_s:
            for state in self.table.live():
                if state.role == "worker" and not state.drained:
                    reason = f"did not drain within {self.settings.close_timeout_s:g} s of the run's end"
                    if self.table.mark_lost(state, reason):
                        self._report_lost(state)
        self.reducer.tick(now)
        self.array_reducer.tick(now)
        out.extend(self._announce_abort())
        if self._sampling_changed:
            out.extend(self._plan_sampling())
        return out

    def _announce_abort(self) -> list[Instruction]:
        """Once the run has been asked to stop: say so in the run and tell every live sender."""
        if not self.abort.is_set or self._abort_announced:
            return []
        self._abort_announced = True
        self._event(f"this run was asked to stop: {self.abort.reason}", "warning")
        return [Reply(s.sender_id, MessageKind.ABORT, None) for s in self.table.live()]

    def _join_notice(self, missing: list[int]) -> str:
        names = ", ".join(f"rank{r}" for r in missing[:8]) + (" ..." if len(missing) > 8 else "")
        text = (
            f"simvue: {len(missing)} of {self.table.expected_ranks} ranks have not joined run {self.run['name']!r}"
            f" after {JOIN_WARNING_S:g} s ({names}). A rank that cannot find rank 0 keeps its records in"
            f" .simvue/spill/ after rendezvous_timeout_s ({self.settings.rendezvous_timeout_s:g} s), and the run"
            f" waits {self._join_timeout_s:g} s in all for it. Likely causes: ranks on other nodes with no shared"
            " SIMVUE_RENDEZVOUS_DIR, or a launcher whose ranks share no job id. Fix: give every rank"
            " SIMVUE_AGGREGATOR_ADDRESS=tcp://<rank 0's host>:<port> and SIMVUE_AGGREGATOR_KEY, or import and"
            " initialise mpi4py before init() (docs/launchers.md)."
        )
        self._event(text.removeprefix("simvue: "), "warning")
        return text

    def _plan_sampling(self) -> list[Instruction]:
        self._sampling_changed = False
        return self.sampling.plan(self.table.local, self.table.live())

    def take_batch(self, *, final: bool = False) -> StoreBatch:
        """What the next commit writes (alerts evaluated on it first); a new batch starts."""
        wall = self.clock.time()
        if wall - self._last_heartbeat >= RUN_HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = self._batch.heartbeat = wall
        if self.alerts.alerts:
            self._evaluate_alerts(wall, final=final)
        progress = {
            s.label: {"sender": s.sender_id.hex(), "last_seq": s.last_seq}
            for s in self.table.by_id.values() if s.last_seq != s.covered_seq
        }
        if progress:  # written with the data it covers: what a spill import may skip
            self._merge_metadata({"simvue": {"processes": progress}})
            for sender in self.table.by_id.values():
                sender.covered_seq = sender.last_seq
        batch, self._batch = self._batch, StoreBatch()
        self.table.local.series.clear()
        for producer in self.table.by_id.values():
            producer.series.clear()
        return batch

    def committed(self) -> list[Instruction]:
        """Every batch taken so far is in the store: acknowledge what it covers to each
        sender whose messages it holds.  A sender keeps a message until then, so what it
        has had acknowledged survives the aggregator's death, and the rest it spills."""
        out: list[Instruction] = []
        for sender in self.table.by_id.values():
            if sender.covered_seq > sender.committed_seq:
                sender.committed_seq = sender.covered_seq
                out.append(self._ack(sender))
        return out

    def finish(self, *, crashed: bool = False) -> StoreBatch:
        """The run's last batch: pending reductions, the final status and what was lost."""
        self.reducer.finish()
        self.array_reducer.finish()
        for sender_id in self.artifacts.abandon():
            sender = self.table.by_id.get(sender_id)
            self.losses.record(LossReason.ARTIFACT_FAILED)
            self._event(f"an artifact from {sender.label if sender else 'a sender'} never finished arriving", "error")
        producers = list(self.table.producers())
        lost = [p.label for p in producers if p.presence is LOST] + [f"rank{r}" for r in self.table.never_joined]
        statuses = {p.exit_status for p in producers}
        if self._user_status is not None:
            status = self._user_status
        elif crashed or "failed" in statuses or lost:
            status = "failed"
        elif "terminated" in statuses:
            status = "terminated"
        elif self._status == "created":
            status = "created"  # never started: it stays ready for Run.reconnect
        else:
            status = "completed"
        self._merge_metadata({"simvue": {"processes": {p.label: p.describe() for p in producers}}})
        losses = self.losses.snapshot()
        if losses:
            self._merge_metadata({"simvue": {"losses": losses}})
        wall = self.clock.time()
        self._batch.status = status
        self._batch.ended = wall
        self._last_heartbeat = float("-inf")  # the final batch always carries a heartbeat
        self.final_status = status
        return self.take_batch(final=True)

    # -- messages -------------------------------------------------------------------------

    def _receive(self, sender_id: bytes, message: Message) -> list[Instruction]:
        kind, seq, body = message
        now = self.clock.monotonic()
        if kind is MessageKind.NODE_HEARTBEAT:
            return self._node_heartbeat(body, now)
        if kind is MessageKind.HELLO:
            if not isinstance(body, dict):
                raise ValueError("HELLO body is not a map")
            given_up = len(self.table.never_joined)
            new = sender_id not in self.table.by_id
            joined = self.table.hello(sender_id, body, now)
            if not new:  # again, after its relay died: what it sends next may have arrived already
                joined.resend_upto = joined.last_seq
            if len(self.table.never_joined) < given_up:
                hours = (now - self.table.started) / 3600
                self._event(f"{joined.label} joined the run after all, {hours:.2f} h after it started", "warning")
                self._merge_metadata({"simvue": {"lost": {joined.label: None}}})
            self.table.accept(joined, seq, now)
            if new:  # its HELLO holds no data: acknowledged at once, with the welcome
                joined.covered_seq = joined.committed_seq = joined.last_seq
            self._merge_metadata({"simvue": {"processes": {joined.label: joined.describe()}}})
            self._sampling_changed = True
            welcome = {"seq": joined.last_seq, "closed": False, "run": {**self.run, "label": joined.label}}
            out: list[Instruction] = [Reply(sender_id, MessageKind.ACK, welcome)]
            if self._abort_announced:
                out.append(Reply(sender_id, MessageKind.ABORT, None))
            if self.closing and joined.role == "worker" and joined.drain_requested_at is None:
                # Its HELLO was still queued when the run's owner closed: drain it as the others.
                joined.drain_requested_at = now
                out.append(Reply(sender_id, MessageKind.DRAIN, None))
            return out
        state = self.table.by_id.get(sender_id)
        if state is None:
            self.losses.record(
                LossReason.UNKNOWN_SENDER, record_count(body) if kind is MessageKind.DATA and isinstance(body, list) else 1
            )
            return []
        if kind is MessageKind.DATA:
            if not isinstance(body, list):
                raise ValueError("DATA body is not an array")
            if self.table.accept(state, seq, now):
                self._ingest(state, body)
            return []
        if kind is MessageKind.HEARTBEAT:
            state.last_seen = now
            if state.drain_requested_at is not None:
                state.drained = True
            return [self._ack(state)]
        if kind is MessageKind.BYE:
            out = []
            if self.table.accept(state, seq, now) or state.presence is not LOST:
                body = body if isinstance(body, dict) else {}
                status = body.get("status")
                self.table.bye(state, status if status in FINAL_STATUSES else None)
                # Planned now, not at the next tick: the node's sampler takes the process's
                # last sample before the process can have had its goodbye acknowledged.
                out = self._plan_sampling()
                dropped = body.get("dropped")
                if isinstance(dropped, dict) and dropped:
                    counts = {str(k): v for k, v in dropped.items() if v.__class__ is int}
                    self._merge_metadata({"simvue": {"dropped_calls": {state.label: counts}}})
                losses = body.get("losses")
                if isinstance(losses, dict):  # what the sender itself could not deliver
                    for reason, count in losses.items():
                        if reason in _LOSS_REASONS and count.__class__ is int and count > 0:
                            self.losses.record(LossReason(reason), count)
                if state.owner:  # the run's owner has closed: so has the run
                    out.extend(self.close_local(status))
            return [*out, self._ack(state)]
        raise ValueError(f"a sender does not send {kind.name}")

    def _node_heartbeat(self, body: Any, now: float) -> list[Instruction]:
        """A node's relay vouches for the senders it heard from recently (each as if it had
        sent a HEARTBEAT) and names those whose process it saw end (``process_gone``)."""
        if not isinstance(body, dict):
            raise ValueError("NODE_HEARTBEAT body is not a map")
        alive, gone = body.get("senders", []), body.get("gone", [])
        if not isinstance(alive, list) or not isinstance(gone, list):
            raise ValueError("NODE_HEARTBEAT lists are not arrays")
        if not all(isinstance(i, bytes) for i in alive) or not all(isinstance(i, bytes) for i in gone):
            raise ValueError("NODE_HEARTBEAT sender ids are not bytes")
        for sender_id in alive:
            self.table.seen_alive(sender_id, now)
        for sender_id in gone:
            self.process_gone(sender_id)
        return []

    def farewell(self) -> list[Instruction]:
        """Once the final batch is stored: tell every sender that may still be running (a
        drained pool worker outlives the run) that the run is over, so that it does not wait
        for an answer to its goodbye; anything it logs from now on goes to its spill file."""
        return [*self._announce_abort(), *(
            Reply(s.sender_id, MessageKind.ACK, {"seq": s.committed_seq, "closed": True, "finished": True})
            for s in self.table.live()
        )]

    def _ack(self, state: SenderState) -> Reply:
        return Reply(state.sender_id, MessageKind.ACK, {"seq": state.committed_seq, "closed": self.closing})

    # -- records --------------------------------------------------------------------------

    def _ingest(self, producer: Producer, records: Sequence[Any]) -> None:
        # The per-point work: one cache lookup and four array appends through bound methods.
        series = producer.series
        for record in records:
            try:
                if record[0] == _METRICS:
                    _, step, t, ts, values = record
                    for name, value in values.items():
                        target = series.get(name)
                        if target is None:
                            target = self._series_for(producer, name)
                        if target.__class__ is tuple:
                            add_step, add_time, add_timestamp, add_value = target
                            add_step(step)
                            add_time(t)
                            add_timestamp(ts)
                            add_value(value)
                        else:
                            target.add(step, t, ts, value)
                else:
                    kind = RecordKind(record[0])
                    self._control[kind](producer, RECORD_TYPES[kind]._make(record))
            except Exception:  # noqa: BLE001 - one bad record must not stop the others
                self.losses.record(LossReason.BAD_RECORD, record_count((record,)))
                for chunk in self._batch.metrics.values():
                    chunk.repair()

    def _series_for(self, producer: Producer, name: str) -> Any:
        """The ingest target of ``name`` from ``producer`` until the next commit: the
        appenders of its namespaced series, or a ``_Reduced``."""
        if name.__class__ is not str:
            raise TypeError("a metric name must be a str")
        ops = self.reducer.ops_for(name)
        full_name = producer.prefix + name
        if ops is None:
            target: Any = self._chunk(full_name).appenders()
        else:
            also = self._chunk(full_name) if "namespace" in ops and producer.prefix else None
            target = _Reduced(self.reducer, producer.label, name, also, self.clock)
        producer.series[name] = target
        return target

    def _chunk(self, full_name: str) -> SeriesChunk:
        chunk = self._batch.metrics.get(full_name)
        if chunk is None:
            chunk = self._batch.metrics[full_name] = SeriesChunk()
        return chunk

    def _on_metric_columns(self, producer: Producer, record: MetricColumnsRecord) -> None:
        # Checked whole before anything is added, so a malformed record leaves no trace.  A
        # namespaced metric takes one ``extend`` per column; a reduced one goes through the
        # reducer in one loop, which sees every point, in order, as from METRICS records.
        names, steps, step_min, step_max, times, timestamps, values = read_columns(record)
        series = producer.series
        for name, column in zip(names, values):
            target = series.get(name)
            if target is None:
                target = self._series_for(producer, name)
            if target.__class__ is tuple:
                self._batch.metrics[producer.prefix + name].extend_columns(
                    steps, times, timestamps, column, step_min, step_max
                )
            else:
                target.add_columns(steps, times, timestamps, column, step_min, step_max)

    def _emit_reduced(self, name: str, step: int, t: float, ts: float, value: float) -> None:
        self._chunk(name).append(step, t, ts, value)

    def _on_event(self, producer: Producer, record: EventRecord) -> None:
        _require(isinstance(record.message, str) and record.level in EVENT_LEVELS, "an event")
        message = f"[{producer.label}] {record.message}" if producer.prefix else record.message
        self._batch.events.append((float(record.timestamp), message, record.level))

    def _on_metadata(self, producer: Producer, record: MetadataRecord) -> None:
        _require(isinstance(record.metadata, dict), "metadata")
        self._merge_metadata(record.metadata)

    def _on_tags(self, producer: Producer, record: TagsRecord) -> None:
        _require(isinstance(record.tags, list) and all(isinstance(t, str) for t in record.tags), "tags")
        self._batch.tags.extend(record.tags)

    def _on_tags_set(self, producer: Producer, record: TagsSetRecord) -> None:
        _require(isinstance(record.tags, list) and all(isinstance(t, str) for t in record.tags), "tags")
        self._batch.tags_set = list(dict.fromkeys(record.tags))
        self._batch.tags = []  # tags added before the replacement in this batch are replaced too

    def _on_alert_attach(self, producer: Producer, record: AlertAttachRecord) -> None:
        _require(isinstance(record.names, list) and all(isinstance(n, str) for n in record.names), "alert names")
        for name in record.names:
            if self.alerts.attach(name):
                self._batch.alerts[name] = self._alert_row(name)
            elif name not in self.alerts.alerts:
                self._event(
                    f"add_alerts: no alert named {name!r} is defined on this run yet; it is attached when it is",
                    "warning",
                )

    def _on_sample_pid(self, producer: Producer, record: SamplePidRecord) -> None:
        _require(record.pid.__class__ is int and record.pid > 0, "a pid")
        producer.sample_pid = record.pid
        self._sampling_changed = True
        self._merge_metadata({"simvue": {"processes": {producer.label: producer.describe()}}})

    def _on_status(self, producer: Producer, record: StatusRecord) -> None:
        _require(record.status in RUN_STATUSES, "a status")
        if record.status in FINAL_STATUSES:
            self._user_status = record.status
        else:
            self._batch.status = self._status = record.status

    def _on_folder(self, producer: Producer, record: FolderRecord) -> None:
        _require(
            isinstance(record.path, str)
            and isinstance(record.metadata, (dict, type(None)))
            and isinstance(record.tags, (list, type(None)))
            and isinstance(record.description, (str, type(None))),
            "folder details",
        )
        self._batch.folders.append((record.path, record.metadata, record.tags, record.description))

    def _on_alert(self, producer: Producer, record: AlertRecord) -> None:
        spec = AlertSpec.from_dict(record.definition)
        if self.alerts.add(spec, self.clock.time()):
            self._batch.alerts[spec.name] = self._alert_row(spec.name)

    def _on_alert_state(self, producer: Producer, record: AlertStateRecord) -> None:
        change = self.alerts.set_status(record.name, record.status, self.clock.time())
        if change is not None:
            self._on_alert_change(change)

    def _on_artifact_chunk(self, producer: Producer, record: ArtifactChunkRecord) -> None:
        assert isinstance(producer, SenderState), "the local producer stores its artifacts directly"
        self.artifacts.chunk(producer.sender_id, record.transfer, record.offset, record.data)

    def _on_artifact(self, producer: Producer, record: ArtifactRecord) -> None:
        name = producer.prefix + str(record.info["name"])
        sender_id = producer.sender_id if isinstance(producer, SenderState) else b""
        row, problem = self.artifacts.complete(sender_id, name, record.info)
        if row is not None:
            self._batch.artifacts.append(row)
        else:
            self.losses.record(LossReason.ARTIFACT_FAILED)
            self._event(f"artifact {name!r} from {producer.label} was not saved: {problem}", "error")

    def _on_grid(self, producer: Producer, record: GridRecord) -> None:
        identity, new = self.grids.on_grid(producer.label, record.metric, record.grid, record.axes, record.labels)
        if new is not None:
            self._batch.grids[identity] = new
        self._batch.grid_metrics.update(self.grids.assign(self._array_series(producer, record.metric), identity))

    def _array_series(self, producer: Producer, metric: str) -> list[str]:
        """The names under which ``producer``'s array metric ``metric`` is stored."""
        ops = self.reducer.ops_for(metric)
        if ops is None:
            return [producer.prefix + metric]
        names = [f"{metric}.{op}" for op in ops if op in REDUCERS]
        if "namespace" in ops and producer.prefix:
            names.append(producer.prefix + metric)
        return names

    def _on_tensor(self, producer: Producer, record: TensorRecord) -> None:
        grid = self.grids.grid_of(producer.label, record.name) if isinstance(record.name, str) else None
        if grid is None or record.step.__class__ is not int or not 0 <= record.step <= INT64_MAX:
            raise ValueError("malformed array value record (or its metric's grid was never announced)")
        value = checked_value(record.shape, record.data, grid[1])
        t, ts = float(record.time), float(record.timestamp)
        ops = self.reducer.ops_for(record.name)
        if ops is not None:
            self.array_reducer.add(producer.label, record.name, record.step, t, ts, value, self.clock.monotonic())
        if ops is None or ("namespace" in ops and producer.prefix):
            self._batch.tensors.append((producer.prefix + record.name, record.step, t, ts, list(value[0]), value[1]))

    def _emit_reduced_array(self, name: str, step: int, t: float, ts: float, value: Any) -> None:
        shape, data = value
        self._batch.tensors.append((name, step, t, ts, list(shape), data))

    def _on_resources(self, producer: Producer, record: ResourcesRecord) -> None:
        host = str(record.host)
        t, ts = float(record.time), float(record.timestamp)
        values = {
            name: float(value) for name, value in record.values.items()
            if isinstance(name, str) and name.startswith("resources/")
        }
        step = self._resource_steps.get(host, 0)
        self._resource_steps[host] = step + 1
        for name, value in values.items():
            self._chunk(name).append(step, t, ts, value)
        if self.emissions is not None and (points := self.emissions.add(host, t, values)):
            step, self._emission_step = self._emission_step, self._emission_step + 1
            for name, value in points.items():
                self._chunk(name).append(step, t, ts, value)

    # -- helpers --------------------------------------------------------------------------

    def _event(self, message: str, level: str) -> None:
        self._batch.events.append((self.clock.time(), message, level))

    def _merge_metadata(self, update: Mapping[str, Any]) -> None:
        self._batch.metadata = merge_dicts(self._batch.metadata, dict(update))

    def _report_lost(self, state: SenderState) -> None:
        self._sampling_changed = True
        self._event(f"{state.label} (pid {state.pid} on {state.host}) lost: {state.reason}", "error")
        self._merge_metadata(
            {"simvue": {"lost": {state.label: state.reason}, "processes": {state.label: state.describe()}}}
        )

    def _alert_row(self, name: str) -> dict[str, Any]:
        alert = self.alerts.alerts[name]
        return {"definition": alert.spec.to_dict(), "status": alert.status, "fired_at": alert.fired_at}

    def _evaluate_alerts(self, wall: float, *, final: bool) -> None:
        """Feed the batch about to be committed to the alerts, then evaluate those due."""
        batch = self._batch
        for metric in self.alerts.watched_metrics:
            chunk = batch.metrics.get(metric)
            if chunk:
                self.alerts.observe_values(metric, chunk.values)
        for _, message, _ in batch.events:
            self.alerts.observe_event(message)
        for change in self.alerts.evaluate(wall, final=final):
            self._on_alert_change(change)

    def _on_alert_change(self, change: Transition) -> None:
        level = "error" if change.status == CRITICAL else "info"
        self._batch.events.append((change.at, change.message(), level))
        self._batch.alerts[change.spec.name] = self._alert_row(change.spec.name)
        if change.status == CRITICAL and change.spec.trigger_abort:
            self.abort.request(f"alert {change.spec.name!r} is critical")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"malformed {what} record")
