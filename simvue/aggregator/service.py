"""The aggregator thread: receives every sender's records, merges them and writes the sink.

It runs as a daemon thread, ``simvue-aggregator``, in the process that created the run
(rank 0, the pool's parent, or the only process).  It owns the ROUTER socket and the sink;
nothing else touches them.  The local process's own records skip the socket: its ``Run``
appends to ``local_buffer`` and the thread drains that deque directly.

The run ends when the local process has closed and every other sender has said BYE, been
declared lost (silent longer than ``sender_timeout_s``), or, for pool workers, drained
their buffers on request.  Then the aggregator writes the final status and stops.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping
from typing import Any

import zmq

from ..config import Settings
from ..losses import LossCounter, LossReason
from ..resources import NodeSampling, Proc
from ..store import SeriesChunk, StoreBatch
from ..store.blobs import ARTIFACTS_DIRECTORY, BlobStore, BlobWriter
from ..store.sqlite import _merge as merge_dicts
from ..transport import protocol
from ..transport.rendezvous import AggregatorAddress
from ..sinks import Sink
from .alerts import CRITICAL, AlertEngine, AlertSpec, Transition
from .merge import Reducer
from .senders import LOST, SenderState, SenderTable

LOCAL_SENDER_ID = b"\0local"
MAX_MESSAGES_PER_LOOP = 2000
MAX_POINTS_PER_COMMIT = 200_000
TICK_INTERVAL_S = 0.1
RUN_HEARTBEAT_INTERVAL_S = 1.0
MAX_COMMIT_ATTEMPTS = 5
RCV_HWM_MESSAGES = 10_000
FINAL_STATUSES = ("completed", "failed", "terminated", "lost")


class _Reduced:
    """Stands in for a series in the ingest loop: a point added here goes to the reducer."""

    __slots__ = ("reducer", "label", "name", "also")

    def __init__(self, reducer: Reducer, label: str, name: str, also: SeriesChunk | None) -> None:
        self.reducer, self.label, self.name, self.also = reducer, label, name, also

    def add(self, step: int, t: float, ts: float, value: float) -> None:
        self.reducer.add(self.label, self.name, step, t, ts, value, time.monotonic())
        if self.also is not None:
            self.also.append(step, t, ts, value)


class Aggregator:
    """Runs one run's aggregation.  Construct it, then ``start()``; ``close()`` ends it."""

    def __init__(
        self,
        *,
        sink: Sink,
        run_fields: dict[str, Any],
        settings: Settings,
        local_hello: dict[str, Any],
        expected_ranks: int,
        namespace_ranks: bool,
        bind_host: str,
        advertise_host: str,
        key: bytes,
        bind_address: str | None = None,
    ) -> None:
        self.settings = settings
        self.losses = LossCounter()
        self._sink = sink
        self.run_id = sink.start_run(run_fields)
        self.run_name: str = run_fields["name"]
        self.started: float = run_fields["now"]
        self._key = key
        self._bind_host = bind_host
        self._advertise_host = advertise_host
        self._bind_address = bind_address
        self.local_buffer: deque[tuple] = deque()
        self.blobs = BlobStore(settings.store_path() / ARTIFACTS_DIRECTORY)
        # Artifact transfers from senders, by (sender id, transfer id); None once broken.
        self._transfers: dict[tuple[bytes, int], BlobWriter | None] = {}
        self._table = SenderTable(
            expected_ranks=expected_ranks,
            namespace_ranks=namespace_ranks,
            timeout_s=settings.sender_timeout_s,
            losses=self.losses,
            now=time.monotonic(),
        )
        self._reducer = Reducer(
            settings.reduce,
            wait_s=settings.reduce_wait_s,
            live_labels=self._table.live_labels,
            missing=self._table.missing_ranks_count,
            emit=self._emit_reduced,
            losses=self.losses,
        )
        self._alerts = AlertEngine()
        self._local = self._table.hello(LOCAL_SENDER_ID, local_hello, time.monotonic())
        # Resource sampling (see simvue.resources): this node's sampler runs here; each other
        # node's is the sender last sent a SAMPLE plan, by host.
        self._host: str = local_hello.get("host") or ""
        self._sampler: NodeSampling | None = None
        if settings.resources_interval_s > 0:
            self._sampler = NodeSampling(
                self._host,
                settings.resources_interval_s,
                self.local_buffer.append,
                started=self.started,
                processes=[Proc(self._local.label, os.getpid(), self._local.cuda)],
                plain_pid=os.getpid() if self._local.role == "process" else None,
            )
        self._sampling_plans: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self._sampling_changed = False
        self._resource_steps: dict[str, int] = {}
        self._batch = StoreBatch()
        self._batch.metadata = {"simvue": {"processes": {self._local.label: self._local.describe()}}}
        self._user_status: str | None = None
        self._status: str = run_fields.get("status", "running")  # the latest non-final status
        self._local_status: str | None = None
        self._close_requested = threading.Event()
        self._finished = threading.Event()
        self._bound = threading.Event()
        self._local_done = threading.Event()
        self._lock = threading.Condition()
        self._flush_requested = False
        self._flush_round = 0
        self._failed_batches: list[tuple[StoreBatch, int]] = []
        self._bind_error: BaseException | None = None
        self.final_status: str | None = None
        self.address: AggregatorAddress | None = None
        self.aborted = False
        self._abort_announced = False
        self.on_abort: Any = None  # called once when the server asks the run to stop
        self._thread = threading.Thread(target=self._run, name="simvue-aggregator", daemon=True)

    # -- called from the run's own threads ----------------------------------------------

    def start(self, timeout_s: float = 10.0) -> AggregatorAddress:
        """Start the thread and return the address senders connect to."""
        self._thread.start()
        if not self._bound.wait(timeout_s) or self.address is None:
            raise RuntimeError(f"aggregator could not bind a socket: {self._bind_error!r}")
        if self._sampler is not None:
            self._sampler.start()
        return self.address

    def flush(self, timeout_s: float) -> bool:
        """Commit everything received so far, including the local buffer."""
        if self._finished.is_set():
            return not self.local_buffer
        deadline = time.monotonic() + timeout_s
        with self._lock:
            start_round = self._flush_round
            self._flush_requested = True
            while self._flush_round <= start_round:
                left = deadline - time.monotonic()
                if left <= 0 or self._finished.is_set():
                    return False
                self._lock.wait(min(left, 0.05))
        return True

    def close(self, status: str | None, timeout_s: float | None = None, *, wait_for_ranks: bool = True) -> bool:
        """End the local process's part and wait for the run to finish.

        With ``wait_for_ranks`` it blocks while other MPI ranks are still alive (they are
        part of the run); without, it returns once the local records are committed and
        every pool worker has drained, leaving the thread to finish when the ranks leave.
        Returns False if ``timeout_s`` passed first.
        """
        if not self._close_requested.is_set():
            self._local_status = status
            self._close_requested.set()
        if wait_for_ranks:
            return self._finished.wait(timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._finished.is_set():
            if self._local_done.wait(0.05):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def abort(self) -> None:
        """The server asked the run to stop: tell this process now, and every other process
        from the aggregator thread (an ABORT message)."""
        if self.aborted:
            return
        self.aborted = True
        if self.on_abort is not None:
            self.on_abort()

    @property
    def sink_error(self) -> Exception | None:
        """What the sink's destination refused, if anything (e.g. a server's 4xx)."""
        return getattr(self._sink, "error", None)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.RCVHWM, RCV_HWM_MESSAGES)
            sock.setsockopt(zmq.LINGER, 0)
            if self._bind_address:
                sock.bind(self._bind_address)
                endpoint = self._bind_address
            else:
                port = sock.bind_to_random_port(f"tcp://{self._bind_host}")
                endpoint = f"tcp://{self._advertise_host}:{port}"
            self.address = AggregatorAddress(
                address=endpoint,
                key=self._key,
                run_name=self.run_name,
                run_id=self.run_id,
                started=self.started,
                pid=os.getpid(),
            )
        except BaseException as exc:  # noqa: BLE001 - reported through start()
            self._bind_error = exc
            self._bound.set()
            sock.close(0)
            context.term()
            return
        self._bound.set()
        try:
            self._loop(sock)
        except Exception:  # noqa: BLE001 - never raise into the user's program
            os.write(2, ("simvue: aggregator failed:\n" + traceback.format_exc()).encode())
            self._finish(crashed=True)
        finally:
            sock.close(0)
            context.term()
            self._finished.set()
            with self._lock:
                self._lock.notify_all()

    def _loop(self, sock: zmq.Socket) -> None:
        poll_ms = max(1, int(self.settings.flush_interval_s * 1000))
        now = time.monotonic()
        next_commit = now + self.settings.commit_interval_s
        next_tick = now + TICK_INTERVAL_S
        last_heartbeat = 0.0
        closing_since: float | None = None
        while True:
            if sock.poll(poll_ms, zmq.POLLIN):
                for _ in range(MAX_MESSAGES_PER_LOOP):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(sock, frames)
                    if time.monotonic() >= next_commit:
                        break  # keep commits (and the local buffer's draining) on schedule
            if self.local_buffer:
                self._ingest(self._local, _drain(self.local_buffer))
            if self.aborted and not self._abort_announced:
                self._announce_abort(sock)
            if self._sampling_changed:
                try:
                    self._plan_sampling(sock)
                except Exception as exc:  # noqa: BLE001 - sampling must never end the run
                    os.write(2, f"simvue: resource sampling plan failed: {exc!r}\n".encode())
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + TICK_INTERVAL_S
            with self._lock:
                flush_requested, self._flush_requested = self._flush_requested, False
            if flush_requested or now >= next_commit or self._batch.point_count >= MAX_POINTS_PER_COMMIT:
                if self.local_buffer:
                    self._ingest(self._local, _drain(self.local_buffer))
                if time.time() - last_heartbeat >= RUN_HEARTBEAT_INTERVAL_S:
                    last_heartbeat = self._batch.heartbeat = time.time()
                self._commit()
                next_commit = now + self.settings.commit_interval_s
                if flush_requested:
                    with self._lock:
                        self._flush_round += 1
                        self._lock.notify_all()
            if self._close_requested.is_set():
                if closing_since is None:
                    closing_since = now
                    self._table.bye(self._local, self._local_status, now)
                    self._request_drains(sock, now)
                    self._ingest(self._local, _drain(self.local_buffer))
                    self._commit()
                if self._ready_to_finish(now, closing_since):
                    self._finish()
                    return
                if not self._local_done.is_set() and all(
                    state.role == "rank" for state in self._table.waiting_for(workers_drained_ok=True)
                ):
                    self._local_done.set()

    def _ready_to_finish(self, now: float, closing_since: float) -> bool:
        if self._table.missing_ranks_count():
            return False
        drains_timed_out = now - closing_since > self.settings.close_timeout_s
        for state in self._table.waiting_for(workers_drained_ok=True):
            if state.role == "worker" and drains_timed_out:
                self._lose(state, f"did not drain within {self.settings.close_timeout_s:g} s of the run's end")
                continue
            return False
        return True

    def _announce_abort(self, sock: zmq.Socket) -> None:
        self._abort_announced = True
        self._batch.events.append((time.time(), "this run was asked to stop (abort, from the server or an alert)", "warning"))
        for state in self._table.live():
            if state.sender_id != LOCAL_SENDER_ID:
                self._reply(sock, state.sender_id, protocol.ABORT, None)

    def _request_drains(self, sock: zmq.Socket, now: float) -> None:
        for state in self._table.live():
            if state.role == "worker":
                state.drain_requested_at = now
                self._reply(sock, state.sender_id, protocol.DRAIN, None)

    # -- messages -----------------------------------------------------------------------

    def _on_message(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.losses.record(LossReason.BAD_FRAME)
            return
        sender_id = frames[0]
        try:
            kind, seq, body = protocol.decode(self._key, frames[1:])
        except protocol.BadFrame:
            self.losses.record(LossReason.BAD_FRAME)
            return
        now = time.monotonic()
        if kind == protocol.HELLO:
            state = self._table.hello(sender_id, body if isinstance(body, dict) else {}, now)
            self._table.accept(state, seq, now)
            self._batch.metadata = merge_dicts(
                self._batch.metadata, {"simvue": {"processes": {state.label: state.describe()}}}
            )
            run = {"name": self.run_name, "id": self.run_id, "started": self.started, "label": state.label}
            self._reply(sock, sender_id, protocol.ACK, {"seq": state.last_seq, "closed": False, "run": run})
            if self._abort_announced:
                self._reply(sock, sender_id, protocol.ABORT, None)
            self._sampling_changed = True
            return
        state = self._table.by_id.get(sender_id)
        if state is None:
            self.losses.record(LossReason.UNKNOWN_SENDER, len(body) if kind == protocol.DATA else 1)
            return
        if kind == protocol.DATA:
            if self._table.accept(state, seq, now):
                self._ingest(state, body)
        elif kind == protocol.HEARTBEAT:
            state.last_seen = now
            if state.drain_requested_at is not None:
                state.drained = True
            self._ack(sock, state)
        elif kind == protocol.BYE:
            if self._table.accept(state, seq, now) or state.state != "done":
                body = body if isinstance(body, dict) else {}
                status = body.get("status")
                self._table.bye(state, status if status in FINAL_STATUSES else None, now)
                self._sampling_changed = True
                dropped = body.get("dropped")
                if isinstance(dropped, dict) and dropped:
                    self._merge_metadata({"simvue": {"dropped_calls": {state.label: dropped}}})
            self._ack(sock, state)

    def _plan_sampling(self, sock: zmq.Socket) -> None:
        """Tell each node's sampler which of the run's processes live there (see
        simvue.resources): this node's was started by this process, every other node's is
        the live process with the lowest rank there."""
        self._sampling_changed = False
        if self._sampler is None:
            return
        by_host: dict[str, list[SenderState]] = {}
        for state in self._table.live():
            by_host.setdefault(state.host or "", []).append(state)
        here = [s for s in by_host.pop(self._host, []) if s is not self._local]
        self._sampler.set_processes(_procs([self._local, *here]))  # this process: sampled to the end
        for host, states in by_host.items():
            states.sort(key=lambda s: (s.rank if s.rank is not None else 1 << 30, s.label))
            chosen = states[0]
            plan = {"interval_s": self.settings.resources_interval_s, "processes": [p.wire() for p in _procs(states)]}
            previous = self._sampling_plans.get(host)
            if previous == (chosen.sender_id, plan):
                continue
            if previous is not None and previous[0] != chosen.sender_id:
                self._reply(sock, previous[0], protocol.SAMPLE, {})
            self._reply(sock, chosen.sender_id, protocol.SAMPLE, plan)
            self._sampling_plans[host] = (chosen.sender_id, plan)
        for host in list(self._sampling_plans):
            if host not in by_host:
                del self._sampling_plans[host]  # its processes have all left

    def _ack(self, sock: zmq.Socket, state: SenderState) -> None:
        self._reply(sock, state.sender_id, protocol.ACK, {"seq": state.last_seq, "closed": self._close_requested.is_set()})

    def _reply(self, sock: zmq.Socket, sender_id: bytes, kind: int, body: Any) -> None:
        try:
            sock.send_multipart([sender_id, *protocol.encode(self._key, kind, 0, body)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the sender is gone or its queue is full; it will ask again

    # -- records ------------------------------------------------------------------------

    def _ingest(self, state: SenderState, records: list) -> None:
        # The per-point work: one cache lookup and four array appends through bound methods.
        series = state.series
        for record in records:
            try:
                if record[0] == protocol.METRICS:
                    _, step, t, ts, values = record
                    for name, value in values.items():
                        target = series.get(name)
                        if target is None:
                            target = self._series_for(state, name)
                        if target.__class__ is tuple:
                            add_step, add_time, add_timestamp, add_value = target
                            add_step(step)
                            add_time(t)
                            add_timestamp(ts)
                            add_value(value)
                        else:
                            target.add(step, t, ts, value)
                else:
                    self._control(state, record)
            except Exception:  # noqa: BLE001 - one bad record must not stop the others
                self.losses.record(LossReason.BAD_RECORD)
                for chunk in self._batch.metrics.values():
                    chunk.repair()

    def _series_for(self, state: SenderState, name: str) -> Any:
        """The ingest target of ``name`` from ``state`` until the next commit: the appenders
        of its namespaced series, or a ``_Reduced``."""
        ops = self._reducer.ops_for(name)
        full_name = state.prefix + name
        if ops is None:
            target: Any = self._chunk(full_name).appenders()
        else:
            also = self._chunk(full_name) if "namespace" in ops and state.prefix else None
            target = _Reduced(self._reducer, state.label, name, also)
        state.series[name] = target
        return target

    def _chunk(self, full_name: str) -> SeriesChunk:
        chunk = self._batch.metrics.get(full_name)
        if chunk is None:
            chunk = self._batch.metrics[full_name] = SeriesChunk()
        return chunk

    def _emit_reduced(self, name: str, step: int, t: float, ts: float, value: float) -> None:
        self._chunk(name).append(step, t, ts, value)

    def _control(self, state: SenderState, record: list) -> None:
        kind = record[0]
        if kind == protocol.EVENT:
            _, ts, message, level = record
            if state.prefix:
                message = f"[{state.label}] {message}"
            self._batch.events.append((ts, message, level))
        elif kind == protocol.METADATA:
            self._merge_metadata(record[1])
        elif kind == protocol.TAGS:
            self._batch.tags.extend(record[1])
        elif kind == protocol.STATUS:
            status = record[1]
            if status in FINAL_STATUSES:
                self._user_status = status
            else:
                self._batch.status = self._status = status
        elif kind == protocol.FOLDER:
            _, path, metadata, tags, description = record
            self._batch.folders.append((path, metadata, tags, description))
        elif kind == protocol.ALERT:
            spec = AlertSpec.from_dict(record[1])
            if self._alerts.add(spec, time.time()):
                self._batch.alerts[spec.name] = _alert_row(self._alerts, spec.name)
        elif kind == protocol.ARTIFACT_CHUNK:
            self._artifact_chunk(state, record)
        elif kind == protocol.ARTIFACT:
            self._artifact(state, record[1])
        elif kind == protocol.RESOURCES:
            _, host, t, ts, values = record
            step = self._resource_steps.get(host, 0)
            self._resource_steps[host] = step + 1
            for name, value in values.items():
                if isinstance(name, str) and name.startswith("resources/"):
                    self._chunk(name).append(step, float(t), float(ts), float(value))
        elif kind == protocol.ALERT_STATE:
            _, name, status = record
            change = self._alerts.set_status(name, status, time.time())
            if change is not None:
                self._on_alert(change)
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    # -- artifacts (see protocol.py) ----------------------------------------------------

    def _artifact_chunk(self, state: SenderState, record: list) -> None:
        _, transfer, offset, data = record
        key = (state.sender_id, transfer)
        writer = self._transfers.get(key, ...)
        if writer is ...:
            writer = self._transfers[key] = self.blobs.writer() if offset == 0 else None
        if writer is None:
            return
        if offset != writer.size:  # a chunk went missing: the content cannot be trusted
            writer.discard()
            self._transfers[key] = None
            return
        writer.write(data)

    def _artifact(self, state: SenderState, info: dict) -> None:
        name = state.prefix + str(info["name"])
        transfer = info.get("transfer")
        if transfer is not None:
            writer = self._transfers.pop((state.sender_id, transfer), None)
            if info.get("size") == 0 and writer is None:
                writer = self.blobs.writer()  # empty content comes with no chunk
            problem = info.get("error")
            if problem is None and (
                writer is None or writer.size != info.get("size") or writer.checksum() != info.get("checksum")
            ):
                problem = "its content arrived incomplete"
            if problem is not None:
                if writer is not None:
                    writer.discard()
                self._artifact_failed(state, name, problem)
                return
            self.blobs.commit(writer)
        row = {key: info.get(key) for key in ("category", "size", "checksum", "mime_type", "original_path", "metadata", "created")}
        row["name"] = name
        self._batch.artifacts.append(row)

    def _artifact_failed(self, state: SenderState, name: str, problem: str) -> None:
        self.losses.record(LossReason.ARTIFACT_FAILED)
        self._batch.events.append((time.time(), f"artifact {name!r} from {state.label} was not saved: {problem}", "error"))

    def _drop_unfinished_transfers(self) -> None:
        for (sender_id, _), writer in list(self._transfers.items()):
            if writer is not None:
                writer.discard()
            state = self._table.by_id.get(sender_id)
            label = state.label if state is not None else "a sender"
            self.losses.record(LossReason.ARTIFACT_FAILED)
            self._batch.events.append((time.time(), f"an artifact from {label} never finished arriving", "error"))
        self._transfers.clear()

    def _merge_metadata(self, update: Mapping[str, Any]) -> None:
        self._batch.metadata = merge_dicts(self._batch.metadata, dict(update))

    # -- time-driven work ---------------------------------------------------------------

    def _tick(self, now: float) -> None:
        for state in self._table.tick(now):
            self._report_lost(state)
        for rank in self._table.give_up_on_missing_ranks(now):
            self._batch.events.append(
                (time.time(), f"rank{rank} never joined the run within {self._table.timeout_s:g} s", "error")
            )
            self._merge_metadata({"simvue": {"lost": {f"rank{rank}": "never joined"}}})
        self._reducer.tick(now)

    def _lose(self, state: SenderState, reason: str) -> None:
        self._table.mark_lost(state, reason)
        self._report_lost(state)

    def _report_lost(self, state: SenderState) -> None:
        self._sampling_changed = True
        where = f"pid {state.pid} on {state.host}"
        self._batch.events.append((time.time(), f"{state.label} ({where}) lost: {state.reason}", "error"))
        self._merge_metadata(
            {"simvue": {"lost": {state.label: state.reason}, "processes": {state.label: state.describe()}}}
        )

    def _evaluate_alerts(self, *, final: bool = False) -> None:
        """Feed the batch about to be committed to the alerts, then evaluate those due."""
        batch = self._batch
        for metric in self._alerts.watched_metrics:
            chunk = batch.metrics.get(metric)
            if chunk:
                self._alerts.observe_values(metric, chunk.values)
        for _, message, _ in batch.events:
            self._alerts.observe_event(message)
        for change in self._alerts.evaluate(time.time(), final=final):
            self._on_alert(change)

    def _on_alert(self, change: Transition) -> None:
        level = "error" if change.status == CRITICAL else "info"
        self._batch.events.append((change.at, change.message(), level))
        self._batch.alerts[change.spec.name] = _alert_row(self._alerts, change.spec.name)
        if change.status == CRITICAL and change.spec.trigger_abort:
            self.abort()

    def _commit(self, *, final: bool = False) -> None:
        if self._alerts.alerts:
            self._evaluate_alerts(final=final)
        batch, self._batch = self._batch, StoreBatch()
        for state in self._table.by_id.values():
            state.series.clear()
        pending = self._failed_batches + [(batch, 0)]
        self._failed_batches = []
        for item, attempts in pending:
            try:
                self._sink.write(item)
            except Exception as exc:  # noqa: BLE001 - keep the data and try again
                if attempts + 1 >= MAX_COMMIT_ATTEMPTS:
                    self.losses.record(LossReason.STORE_FAILED, item.point_count + len(item.events))
                    os.write(2, f"simvue: could not write to {self._sink.location}: {exc!r}; data dropped\n".encode())
                else:
                    self._failed_batches.append((item, attempts + 1))

    def _finish(self, crashed: bool = False) -> None:
        if self._sampler is not None:
            self._sampler.stop(min(5.0, self.settings.close_timeout_s))  # the last sample goes in too
            self._ingest(self._local, _drain(self.local_buffer))
        self._reducer.finish()
        self._drop_unfinished_transfers()
        lost = [s.label for s in self._table.by_id.values() if s.state == LOST] + [
            f"rank{r}" for r in self._table.never_joined
        ]
        statuses = {s.exit_status for s in self._table.by_id.values()}
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
        self._merge_metadata(
            {"simvue": {"processes": {s.label: s.describe() for s in self._table.by_id.values()}}}
        )
        losses = self.losses.snapshot()
        if losses:
            self._merge_metadata({"simvue": {"losses": losses}})
        now = time.time()
        self._batch.status = status
        self._batch.ended = now
        self._batch.heartbeat = now
        self.final_status = status
        self._commit(final=True)
        self._sink.close(self.settings.close_timeout_s)


def _procs(states: list[SenderState]) -> list[Proc]:
    return [Proc(s.label, s.pid, s.cuda) for s in states if isinstance(s.pid, int)]


def _alert_row(engine: AlertEngine, name: str) -> dict[str, Any]:
    state = engine.alerts[name]
    return {"definition": state.spec.to_dict(), "status": state.status, "fired_at": state.fired_at}


def _drain(buffer: deque) -> list:
    popleft = buffer.popleft
    return [popleft() for _ in range(len(buffer))]
