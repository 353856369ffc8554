"""The aggregator's thread: the I/O shell around ``AggregatorState``.

It runs as a daemon thread, ``simvue-aggregator``, in the process that created the run
(rank 0, the pool's parent, or the only process), and joins three things that the state
itself never touches: the ``Receiver`` (the ROUTER socket senders connect to), the local
buffer (the deque this process's own ``Run`` appends to), and the store (one transaction
per commit).  Each loop it feeds the state what arrived, carries out the instructions the
state returns, and every ``commit_interval_s`` writes the state's batch (``writer``).  It also runs this
node's resource sampler and checks every ``liveness.PROBE_INTERVAL_S`` whether a sender's
process on this node has ended.

The run ends when the local process has closed and every other sender has said BYE, been
declared lost, or, for pool workers, drained on request; then the final batch is written,
the store is closed, and each follower (the uploader) is given ``close_timeout_s`` to catch
up.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from .._util import drain
from ..abort import AbortSignal
from ..config import Settings
from ..losses import LossCounter
from ..resources import NodeSampling, Proc
from ..store import Store, StoreBatch
from ..transport.protocol import BadFrame, VersionMismatch
from ..transport.rendezvous import AggregatorAddress
from . import liveness
from .instructions import Instruction, Notice, Reply, SampleHere
from .receiver import Binding, Receiver, make_room_for_connections
from .state import AggregatorState, Clock, SystemClock
from .writer import Follower, RunWriter

MAX_MESSAGES_PER_LOOP = 2000
MAX_POINTS_PER_COMMIT = 200_000
TICK_INTERVAL_S = 0.1
# A one-process run's sampler process starts this long after the run, from the aggregator's
# thread: not on ``init``'s path, and not at all for a run that ends sooner (starting it, about
# 0.2 s of a core, would cost more than the run itself; ``close`` would wait for its first
# sample).  A run of several processes starts it at once (an MPI job) or as soon as another
# process joins (a pool): each of them gets its join and leave samples, however short it is.
SAMPLER_START_DELAY_S = 0.1
log = logging.getLogger(__name__)


class Aggregator:
    """Runs one run's aggregation.  Construct it, then ``start()``; ``close()`` ends it.

    ``store`` holds the run ``run["id"]`` (``{"id", "name", "started", "status"}``), already
    created; the aggregator owns the connection from here on and closes it at the end.
    """

    def __init__(
        self,
        *,
        store: Store,
        run: Mapping[str, Any],
        settings: Settings,
        local_hello: Mapping[str, Any],
        expected_ranks: int,
        namespace_ranks: bool,
        key: bytes,
        abort: AbortSignal,
        binding: Binding | None = None,
        followers: Sequence[Follower] = (),
        losses: LossCounter | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.run_id: str = run["id"]
        self.run_name: str = run["name"]
        self.started: float = run["started"]
        self.losses = losses or LossCounter()
        self._expected_ranks = expected_ranks
        self.local_buffer: deque[tuple] = deque()
        self.blobs = store.blobs
        self._writer = RunWriter(store, self.run_id, self.losses, followers, run_name=self.run_name)
        self._key = key
        self._clock = clock or SystemClock()
        self.state = AggregatorState(
            run=run,
            settings=settings,
            local=local_hello,
            expected_ranks=expected_ranks,
            namespace_ranks=namespace_ranks,
            blobs=store.blobs,
            abort=abort,
            losses=self.losses,
            clock=self._clock,
            status=run.get("status", "running"),
        )
        short_of_files = make_room_for_connections(expected_ranks)
        if short_of_files:
            os.write(2, (short_of_files + "\n").encode())
        self._receiver = Receiver(key, binding or Binding())
        self._sampler: NodeSampling | None = None
        if settings.resources_interval_s > 0:
            local = self.state.table.local
            self._sampler = NodeSampling(
                self.state.host,
                settings.resources_interval_s,
                self.local_buffer.append,
                started=self.started,
                processes=[] if local.role == "host" else [Proc(local.label, os.getpid(), local.cuda)],
                plain_pid=os.getpid() if local.role == "process" else None,
            )
        self._close_status: str | None = None
        self._close_requested = threading.Event()
        self._stop_waiting = threading.Event()
        self._finished = threading.Event()
        self._bound = threading.Event()
        self._local_done = threading.Event()
        self._lock = threading.Condition()
        self._flush_requested = False
        self._flush_round = 0
        self._bind_error: BaseException | None = None
        self.address: AggregatorAddress | None = None
        self._thread = threading.Thread(target=self._run, name="simvue-aggregator", daemon=True)

    # -- called from the run's own threads ----------------------------------------------

    def start(self, timeout_s: float = 10.0) -> AggregatorAddress:
        """Start the thread and return the address senders connect to.  This node's
        resource sampler starts later, on the thread (``SAMPLER_START_DELAY_S``)."""
        self._thread.start()
        if not self._bound.wait(timeout_s) or self.address is None:
            raise RuntimeError(f"aggregator could not bind a socket: {self._bind_error!r}")
        return self.address

    def flush(self, timeout_s: float) -> bool:
        """Commit everything received so far, including the local buffer."""
        if self._finished.is_set():
            return not self.local_buffer
        deadline = self._clock.monotonic() + timeout_s
        with self._lock:
            start_round = self._flush_round
            self._flush_requested = True
            self._receiver.wake()
            while self._flush_round <= start_round:
                left = deadline - self._clock.monotonic()
                if left <= 0 or self._finished.is_set():
                    return False
                self._lock.wait(min(left, 0.05))
        return True

    def close(
        self,
        status: str | None,
        timeout_s: float | None = None,
        *,
        wait_for_ranks: bool = True,
        stop_waiting_after_s: float | None = None,
    ) -> bool:
        """End the local process's part and wait for the run to finish.

        With ``wait_for_ranks`` it blocks while other MPI ranks are still alive (they are
        part of the run); without, it returns once the local records are committed and
        every pool worker has drained, leaving the thread to finish when the ranks leave.
        Returns False if ``timeout_s`` passed first, or if data did not reach the store (the
        store refused it: it is still waiting in memory, was spilled or was lost; see
        ``RunWriter.complete``).
        """
        if not self._close_requested.is_set():
            self._close_status = status
            self._close_requested.set()
        self._receiver.wake()  # the loop acts on it now, not after its poll times out
        if stop_waiting_after_s is not None and not self._finished.wait(stop_waiting_after_s):
            self._stop_waiting.set()  # the job is being stopped: end the run with who has left
            self._receiver.wake()
        if wait_for_ranks:
            return self._finished.wait(timeout_s) and self._writer.complete
        # Set when only other ranks are left, and when the run has finished (see _run).
        return self._local_done.wait(timeout_s) and self._writer.complete

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` for the run to finish; whether it has."""
        return self._finished.wait(timeout_s)

    @property
    def final_status(self) -> str | None:
        return self.state.final_status

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            endpoint = self._receiver.open()
        except BaseException as exc:  # noqa: BLE001 - reported through start()
            self._bind_error = exc
            self._bound.set()
            return
        self.address = AggregatorAddress(
            address=endpoint, key=self._key, run_name=self.run_name, run_id=self.run_id, started=self.started,
            pid=os.getpid(), host=self.state.host or None,
        )
        self._bound.set()
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - never raise into the user's program
            os.write(2, ("simvue: aggregator failed:\n" + traceback.format_exc()).encode())
            try:
                self._finish(crashed=True)
            except Exception:  # noqa: BLE001
                os.write(2, ("simvue: aggregator could not finish the run:\n" + traceback.format_exc()).encode())
        finally:
            self._receiver.close()
            self._finished.set()
            self._local_done.set()
            with self._lock:
                self._lock.notify_all()

    def _loop(self) -> None:
        state, clock, settings = self.state, self._clock, self.settings
        poll_ms = max(1, int(settings.flush_interval_s * 1000))
        now = clock.monotonic()
        next_commit = now + settings.commit_interval_s
        next_tick = now
        next_probe = now + liveness.PROBE_INTERVAL_S
        sampler_start_at = None
        probed_at_close = False
        if self._sampler is not None:
            sampler_start_at = now + (0.0 if self._expected_ranks > 1 else SAMPLER_START_DELAY_S)
        while True:
            if self._receiver.poll(poll_ms):
                self._read_messages(next_commit)
            state.local_records(drain(self.local_buffer))
            now = clock.monotonic()
            if sampler_start_at is not None and (now >= sampler_start_at or state.table.by_id) and not state.can_finish():
                assert self._sampler is not None
                self._sampler.start()
                sampler_start_at = None
            if now >= next_probe:
                for sender in liveness.ended(state.senders_to_probe()):
                    state.process_gone(sender.sender_id)
                next_probe = now + liveness.PROBE_INTERVAL_S
            if now >= next_tick:
                self._carry_out(state.tick())
                next_tick = now + TICK_INTERVAL_S
            with self._lock:
                flush_requested, self._flush_requested = self._flush_requested, False
            if flush_requested or now >= next_commit or state.pending_points >= MAX_POINTS_PER_COMMIT:
                state.local_records(drain(self.local_buffer))
                self._commit(state.take_batch())
                next_commit = now + settings.commit_interval_s
                if flush_requested:
                    with self._lock:
                        self._flush_round += 1
                        self._lock.notify_all()
            if self._close_requested.is_set() and not state.closing:
                for sender in liveness.ended(state.senders_to_probe()):  # seen gone: lost now
                    state.process_gone(sender.sender_id)
                self._carry_out(state.close_local(self._close_status))
                state.local_records(drain(self.local_buffer))
                self._commit(state.take_batch())
            if state.closing:  # closed here, or by the run's owner (``host``)
                if not probed_at_close or self._stop_waiting.is_set():
                    # A process seen gone now is lost now: the run is ending (its owner's close
                    # is a message, so the probe before ``close_local`` above did not run).
                    probed_at_close = True
                    for sender in liveness.ended(state.senders_to_probe()):
                        state.process_gone(sender.sender_id)
                    state.lose_senders_seen_gone()
                if self._stop_waiting.is_set():
                    state.stop_waiting()
                if state.can_finish():
                    self._finish()
                    return
                if state.only_ranks_left():
                    self._local_done.set()

    def _read_messages(self, next_commit: float) -> None:
        for _ in range(MAX_MESSAGES_PER_LOOP):
            try:
                received = self._receiver.receive()
            except VersionMismatch as exc:
                self._carry_out(self.state.bad_frame(exc.version))
                continue
            except BadFrame:
                self.state.bad_frame()
                continue
            if received is None:
                return
            self._carry_out(self.state.receive(*received))
            if self._clock.monotonic() >= next_commit:
                return  # keep commits (and the local buffer's draining) on schedule

    def _carry_out(self, instructions: list[Instruction]) -> None:
        for instruction in instructions:
            if isinstance(instruction, Reply):
                self._receiver.send(instruction)
            elif isinstance(instruction, SampleHere) and self._sampler is not None:
                self._sampler.set_processes(instruction.processes, plain_pid=instruction.plain_pid)
            elif isinstance(instruction, Notice):
                os.write(2, (instruction.text + "\n").encode("utf-8", "backslashreplace"))

    def _commit(self, batch: StoreBatch) -> None:
        """Write ``batch``; once the store holds everything so far, acknowledge it to the
        senders (acknowledged means durable: see ``AggregatorState.committed``)."""
        self._writer.write(batch)
        if self._writer.holds_nothing:
            self._carry_out(self.state.committed())

    def _finish(self, crashed: bool = False) -> None:
        if self._sampler is not None:
            self._sampler.stop(min(5.0, self.settings.close_timeout_s))  # the last sample goes in too
        self.state.local_records(drain(self.local_buffer))
        self._commit(self.state.finish(crashed=crashed))
        if self._writer.holds_nothing:
            self._carry_out(self.state.farewell())
        log.debug(
            "run %r finished %s: %s; losses %s", self.run_name, self.state.final_status,
            ", ".join(f"{p.label} {p.presence.value}" for p in self.state.table.producers()),
            self.losses.snapshot() or "none",
        )
        self._writer.close(self.settings.close_timeout_s)
