"""The sending side of the transport, one per process that is not the aggregator.

The caller's thread only appends records to ``Sender.buffer`` (a deque).  A daemon thread,
``simvue-sender``, wakes every ``flush_interval_s``, packs everything buffered into one DATA
message (its metric points in columns, ``columns.to_columns``) and sends it without blocking.  Messages are kept until the aggregator acknowledges
them; a tail that cannot be delivered is written to a spill file (the same payloads, one
msgpack array each) and counted, so nothing vanishes silently.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from .._util import drain
from ..abort import AbortSignal
from ..losses import LossCounter, LossReason
from . import protocol, security
from .columns import to_columns
from .protocol import MessageKind
from .spill import SpillFile, data_records

SEND_HWM_MESSAGES = 1000
MAX_BATCH_RECORDS = 20_000
MAX_UNACKED_MESSAGES = 4000
# And at most this many bytes of them (a message of array metrics holds up to 32 MiB): past
# either bound, the older half goes to the spill file, so a stalled aggregator costs a sender
# bounded memory.
MAX_UNACKED_BYTES = 256 << 20
LINGER_MS = 0
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
BULK_POLL_MS = 5
# How long closing waits, beyond the wait for BYE's acknowledgement, for the unacknowledged
# tail to be written to the spill file: the sender thread is a daemon, and at exit it would
# be killed before it could spill.
SPILL_GRACE_S = 10.0


class Sender:
    """Delivers one process's records to the aggregator at ``address``.

    ``flush`` and ``close`` block for at most their ``timeout_s`` and return whether every
    record so far was acknowledged.  Nothing here raises into the caller.
    """

    def __init__(
        self,
        address: str,
        key: bytes,
        hello: dict[str, Any],
        *,
        flush_interval_s: float,
        heartbeat_interval_s: float,
        close_timeout_s: float,
        spill: SpillFile,
        losses: LossCounter,
        abort: AbortSignal,
        buffer: deque[tuple] | None = None,
        on_sample: Callable[[Any], None] = lambda plan: None,
        relay_alive: Callable[[], bool] | None = None,
        direct_address: str | None = None,
    ) -> None:
        """``abort`` is requested when the aggregator sends ABORT; ``on_sample(plan)`` is
        called with each SAMPLE body, on the sender's thread; ``buffer`` is where the
        process's records are appended (a new deque by default).

        With ``relay_alive``, ``address`` is this node's relay (``transport.relay``):
        every heartbeat interval the sender asks ``relay_alive()`` and, once the relay has
        ended, connects to ``direct_address`` (the aggregator) instead, says HELLO again
        and sends every message not yet acknowledged, oldest first."""
        self.buffer: deque[tuple] = deque() if buffer is None else buffer
        self.sender_id = uuid.uuid4().bytes
        self._address = address
        self._relay_alive = relay_alive
        self._direct_address = direct_address
        self._context: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._next_relay_check = 0.0
        self._key = key
        self._hello = hello
        self._flush_interval_s = flush_interval_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._close_timeout_s = close_timeout_s
        self.spill = spill
        self._losses = losses
        self._wake = threading.Event()
        self._close_status: str | None = None
        self._closing = threading.Event()
        self._finished = threading.Event()
        self._acked = threading.Condition()
        self._flush_requested = False
        self._flush_round = 0
        self._flush_target = 0
        self._acked_seq = 0
        self._sent_seq = 0
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._unacked_bytes = 0
        # Artifact chunks (see protocol.py): queued, then in flight until acknowledged; both
        # together stay under MAX_ARTIFACT_BYTES_IN_FLIGHT (``put_bulk`` waits for room).
        self._bulk: deque[tuple[tuple, int]] = deque()
        self._bulk_queued_bytes = 0
        self._bulk_unacked: deque[tuple[int, int]] = deque()
        self._bulk_unacked_bytes = 0
        self._outbox: deque[tuple[int, list[bytes]]] = deque()
        self._dropped_at_close: dict[str, int] = {}
        self.welcome: dict[str, Any] | None = None
        self.welcomed = threading.Event()
        # The aggregator has stored the run's final batch (a drained pool worker outlives the
        # run): nothing will answer any more, so closing does not wait for it.
        self.run_finished = threading.Event()
        self._abort = abort
        self._on_sample = on_sample
        self._warned_bad_record = False
        self._warned_version = False
        self._bye_timeout_s = close_timeout_s
        self._thread = threading.Thread(target=self._run, name="simvue-sender", daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def buffer_full(self, limit: int, wait_s: float | None = None) -> None:
        """Called on the caller's thread when the buffer reached ``limit``: give the sender
        ``wait_s`` (default: four flush intervals) to catch up, then spill what is still
        buffered."""
        self._wake.set()
        deadline = time.monotonic() + (4 * self._flush_interval_s if wait_s is None else wait_s)
        while len(self.buffer) >= limit and time.monotonic() < deadline:
            time.sleep(self._flush_interval_s / 4)
        if len(self.buffer) >= limit:
            self.spill.write_records(drain(self.buffer))

    def put_bulk(self, record: tuple, nbytes: int, timeout_s: float) -> bool:
        """Queue one large record (an artifact chunk) to travel in a DATA message of its own.

        Blocks while ``MAX_ARTIFACT_BYTES_IN_FLIGHT`` bytes are queued or unacknowledged, for
        at most ``timeout_s``; returns False if it timed out or the sender has stopped.
        Called from an artifact reader thread, never from the caller's hot path."""
        deadline = time.monotonic() + timeout_s
        with self._acked:
            while (
                self._bulk_queued_bytes + self._bulk_unacked_bytes > 0
                and self._bulk_queued_bytes + self._bulk_unacked_bytes + nbytes > protocol.MAX_ARTIFACT_BYTES_IN_FLIGHT
            ):
                left = deadline - time.monotonic()
                if left <= 0 or self._finished.is_set() or self.run_finished.is_set():
                    return False  # (once the run is over nothing is acknowledged any more)
                self._acked.wait(min(left, 0.5))
            if self._finished.is_set():
                return False
            self._bulk.append((record, nbytes))
            self._bulk_queued_bytes += nbytes
        self._wake.set()
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything buffered before this call is acknowledged."""
        with self._acked:
            start_round = self._flush_round
            self._flush_requested = True
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        with self._acked:
            while not (self._flush_round > start_round and self._acked_seq >= self._flush_target):
                left = deadline - time.monotonic()
                if self.run_finished.is_set():  # nothing is acknowledged any more
                    return not self.buffer and self._acked_seq >= self._sent_seq
                if left <= 0 or self._finished.is_set():
                    return False
                self._acked.wait(left)
        return True

    def close(self, status: str | None, dropped: dict[str, int], timeout_s: float | None = None) -> bool:
        """Send everything, say BYE with ``status`` and wait up to ``timeout_s`` (default:
        ``close_timeout_s``) for its acknowledgement; what is still unacknowledged then is
        spilled before this returns (``SPILL_GRACE_S`` more at most).  Returns whether
        everything was acknowledged."""
        if not self._closing.is_set():
            self._close_status = status
            self._dropped_at_close = dropped
            if timeout_s is not None:
                self._bye_timeout_s = timeout_s
            self._closing.set()
            self._wake.set()
        self._thread.join(self._bye_timeout_s + SPILL_GRACE_S)
        return self._finished.is_set() and not self._unacked and self._acked_seq >= self._sent_seq

    # -- flush thread -------------------------------------------------------------------

    def _connect(self, context: zmq.Context, address: str) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.sender_id)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM_MESSAGES)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        self._sock = sock
        if security.encrypted(address):
            security.connect(sock, self._key)
        sock.connect(address)
        return sock

    def _check_relay(self, now: float) -> zmq.Socket:
        """The socket to use: a new one, straight to the aggregator, once the relay this
        sender goes through has ended (checked every heartbeat interval)."""
        assert self._sock is not None and self._context is not None
        if self._relay_alive is None or now < self._next_relay_check:
            return self._sock
        self._next_relay_check = now + self._heartbeat_interval_s
        try:
            alive = self._relay_alive()
        except Exception:  # noqa: BLE001 - a failed check is no proof of death
            alive = True
        if alive or self._direct_address is None:
            return self._sock
        self._relay_alive = None
        self._sock.close(linger=0)
        self._address = self._direct_address
        sock = self._connect(self._context, self._address)
        # What was queued for the relay is among the unacknowledged messages (or was a
        # heartbeat): HELLO first, then every one of them, oldest first; the aggregator
        # skips those it has already and counts them as resent, not as duplicates.
        self._outbox.clear()
        self._outbox.append((1, protocol.encode(self._key, MessageKind.HELLO, 1, self._hello)))
        for seq, payload in self._unacked:
            self._outbox.append((seq, protocol.sign(self._key, payload)))
        self._outbox.append((self._sent_seq, self._frames(MessageKind.HEARTBEAT, self._sent_seq, None)))
        os.write(2, f"simvue: this node's relay has ended; sending to the aggregator at {self._address} directly,"
                 f" {len(self._unacked)} unacknowledged message(s) again\n".encode())
        return sock

    def _run(self) -> None:
        context = self._context = zmq.Context()
        sock = self._connect(context, self._address)
        try:
            self._next_relay_check = time.monotonic() + self._heartbeat_interval_s
            self._queue(MessageKind.HELLO, self._hello)
            last_heartbeat = time.monotonic()
            while True:
                closing = self._closing.is_set()
                if not closing:
                    if self._bulk or self._bulk_unacked:
                        # A transfer is under way: listen for the ACKs that make room for it.
                        self._read_acks(sock, BULK_POLL_MS)
                    else:
                        self._wake.wait(self._flush_interval_s)
                    self._wake.clear()
                sock = self._check_relay(time.monotonic())
                with self._acked:
                    flush_requested, self._flush_requested = self._flush_requested, False
                sent_bulk = self._send_buffered()
                if sent_bulk or flush_requested or time.monotonic() - last_heartbeat >= self._heartbeat_interval_s:
                    # A heartbeat is answered with an ACK of everything processed so far, so a
                    # sender that never falls silent still gets its messages acknowledged.
                    self._outbox.append((self._sent_seq, self._frames(MessageKind.HEARTBEAT, self._sent_seq, None)))
                    last_heartbeat = time.monotonic()
                if flush_requested:
                    with self._acked:
                        self._flush_target = self._sent_seq
                        self._flush_round += 1
                self._pump(sock)
                self._read_acks(sock, 0)
                if closing:
                    self._say_bye(sock)
                    return
                if len(self._unacked) > MAX_UNACKED_MESSAGES or self._unacked_bytes > MAX_UNACKED_BYTES:
                    self._spill_unacked(max(1, len(self._unacked) // 2))
        except Exception as exc:  # noqa: BLE001 - a transport failure must not reach the user
            os.write(2, f"simvue: sender stopped after an error: {exc!r}\n".encode())
        finally:
            # Oldest first, so that a spill import keeps every series in logging order.
            if self._unacked:
                self._spill_unacked(len(self._unacked))
            if self._bulk:
                self.spill.write_records([record for record, _ in self._bulk])
                self._bulk.clear()
            if self.buffer:
                self.spill.write_records(drain(self.buffer))
            if self._sock is not None:
                self._sock.close(linger=0)
            context.term()
            self._finished.set()
            with self._acked:
                self._acked.notify_all()

    def _frames(self, kind: MessageKind, seq: int, body: Any) -> list[bytes]:
        return protocol.encode(self._key, kind, seq, body)

    def _queue(self, kind: MessageKind, body: Any) -> None:
        self._queue_packed(kind, msgpack.packb(body))

    def _queue_packed(self, kind: MessageKind, packed_body: bytes) -> None:
        self._sent_seq += 1
        frames = protocol.encode_packed(self._key, kind, self._sent_seq, packed_body)
        self._unacked.append((self._sent_seq, frames[1]))
        self._unacked_bytes += len(frames[1])
        self._outbox.append((self._sent_seq, frames))

    def _queue_records(self, records: list) -> None:
        """Queue ``records`` as DATA messages of at most ``MAX_PAYLOAD_BYTES``, their metric
        points in columns.  A record that cannot be packed (a value the Run API let through,
        or a bug) or is too large on its own is dropped and counted; the others go on."""
        try:
            body_records = to_columns(records)
        except Exception:  # noqa: BLE001 - a record of an unexpected shape: send them as they are
            body_records = records
        try:
            body = msgpack.packb(body_records)
        except Exception:  # noqa: BLE001 - find the bad records, keep the rest
            body_records = [record for record in body_records if self._packable(record)]
            if not body_records:
                return
            body = msgpack.packb(body_records)
        if len(body) > protocol.MAX_PAYLOAD_BYTES:
            if len(records) == 1:
                self._drop(f"a record of {len(body):,} bytes, above the {protocol.MAX_PAYLOAD_BYTES:,}-byte limit")
                return
            half = len(records) // 2
            self._queue_records(records[:half])
            self._queue_records(records[half:])
            return
        self._queue_packed(MessageKind.DATA, body)

    def _packable(self, record: Any) -> bool:
        try:
            msgpack.packb(record)
        except Exception as exc:  # noqa: BLE001 - any packing failure drops this record only
            self._drop(f"a record that cannot be sent ({exc!r}): {str(record)[:80]}")
            return False
        return True

    def _drop(self, what: str) -> None:
        self._losses.record(LossReason.BAD_RECORD)
        if not self._warned_bad_record:
            self._warned_bad_record = True
            os.write(2, f"simvue: dropped {what}; further such records are counted\n".encode())

    def _send_buffered(self) -> bool:
        """Queue everything buffered; returns whether artifact chunks were among it."""
        while self.buffer:
            self._queue_records(drain(self.buffer, MAX_BATCH_RECORDS))
        sent_bulk = False
        while self._bulk:
            with self._acked:
                record, nbytes = self._bulk.popleft()
                self._bulk_queued_bytes -= nbytes
                self._bulk_unacked_bytes += nbytes
            self._queue(MessageKind.DATA, [record])
            self._bulk_unacked.append((self._sent_seq, nbytes))
            sent_bulk = True
        return sent_bulk

    def _pump(self, sock: zmq.Socket) -> None:
        while self._outbox:
            seq, frames = self._outbox[0]
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return  # the queue to the aggregator is full: retry on the next tick
            self._outbox.popleft()

    def _read_acks(self, sock: zmq.Socket, timeout_ms: int) -> bool:
        got = False
        while sock.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            try:
                kind, _, body = protocol.decode(self._key, sock.recv_multipart(zmq.NOBLOCK))
            except protocol.VersionMismatch as exc:
                if not self._warned_version:
                    self._warned_version = True
                    os.write(2, f"simvue: the run's aggregator speaks message protocol version {exc.version}, this"
                             f" process {protocol.PROTOCOL_VERSION} (two versions of simvue in one job): nothing"
                             " this process logs reaches the run; it is kept in a spill file\n".encode())
                continue
            except (protocol.BadFrame, zmq.Again):
                continue
            if kind is MessageKind.ABORT:
                self._abort.request("the run's aggregator asked every process to stop")
                continue
            if kind is MessageKind.SAMPLE:
                self._on_sample(body)
                continue
            if kind is MessageKind.DRAIN:
                with self._acked:
                    self._flush_requested = True
                self._wake.set()
                continue
            if kind is not MessageKind.ACK or not isinstance(body, dict):
                continue
            if isinstance(body.get("run"), dict):
                self.welcome = body["run"]
                self.welcomed.set()
            if body.get("finished") is True:
                self.run_finished.set()
            seq = int(body.get("seq", 0))
            while self._unacked and self._unacked[0][0] <= seq:
                self._unacked_bytes -= len(self._unacked.popleft()[1])
            with self._acked:
                self._acked_seq = max(self._acked_seq, seq)
                while self._bulk_unacked and self._bulk_unacked[0][0] <= seq:
                    self._bulk_unacked_bytes -= self._bulk_unacked.popleft()[1]
                self._acked.notify_all()
            got = True
        return got

    def _say_bye(self, sock: zmq.Socket) -> None:
        self._send_buffered()
        if self.run_finished.is_set():
            return  # no one to say it to: what is unacknowledged is spilled
        self._queue(
            MessageKind.BYE,
            {"status": self._close_status, "dropped": self._dropped_at_close, "losses": self._losses.snapshot()},
        )
        bye_seq = self._sent_seq
        deadline = time.monotonic() + self._bye_timeout_s
        while time.monotonic() < deadline:
            sock = self._check_relay(time.monotonic())
            self._pump(sock)
            self._read_acks(sock, 20)
            if self._acked_seq >= bye_seq or self.run_finished.is_set():
                return  # (the run ended meanwhile: no one will acknowledge it; the rest is spilled)

    def _spill_unacked(self, count: int) -> None:
        payloads = [self._unacked.popleft()[1] for _ in range(min(count, len(self._unacked)))]
        self._unacked_bytes -= sum(len(payload) for payload in payloads)
        data = [p for p in payloads if data_records(p)]  # HELLO and BYE carry no records
        self.spill.write_payloads(data, sum(data_records(p) for p in data))
