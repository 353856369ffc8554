"""The composition root: decides which part this process plays in a run and wires it.

* The only process of a job, a pool's parent, or MPI rank 0 builds an ``Aggregator`` with
  the local store as its sink; its own records go straight into the aggregator's buffer.
* Every other rank, and every worker that inherited or was handed a ``Run``, builds a
  ``Sender`` to the aggregator found through ``transport.rendezvous``.
* A rank that cannot find its aggregator in ``rendezvous_timeout_s`` keeps its records in a
  spill file and says so in one warning; it never hangs the job.

This is the only module that imports the transport, the aggregator and the sinks together.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import itertools
import os
import threading
import weakref
import platform
import secrets
import socket
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from . import lifecycle
from .aggregator.service import Aggregator
from .api.config import ServerConfig
from .config import Settings
from .errors import SimvueWarning
from .losses import LossCounter
from .resources import SamplingRole
from .resources.facts import cpu_model
from .sinks.offline import OfflineSink
from .sinks.rest import RestSink
from .topology import Topology, initialised_mpi
from .transport import protocol, rendezvous
from .transport.rendezvous import AggregatorAddress
from .transport.sender import Sender
from .transport.spill import SpillFile
from .transport.transfer import CLOSE_TIMEOUT_S as ARTIFACTS_CLOSE_TIMEOUT_S
from .transport.transfer import ArtifactJob, ArtifactQueue, StreamToSender

SPILL_DIRECTORY = "spill"


class Pipe(Protocol):
    """Where a ``Run`` handle's records go in this process."""

    buffer: deque
    spill: SpillFile | None  # where undeliverable records went, if this pipe can spill

    def buffer_full(self, limit: int) -> None: ...

    def save_artifact(self, job: ArtifactJob) -> bool: ...

    def flush(self, timeout_s: float) -> bool: ...

    def close(self, status: str | None, dropped: dict[str, int], timeout_s: float | None) -> bool: ...


class Membership:
    """This process's part in one run, shared by every ``Run`` handle of that run here.

    Pool workers unpickle a fresh ``Run`` for every task; they all share one membership,
    so one sender, one step counter and one BYE per process.  Memberships are held by this
    module until closed, so a dropped ``Run`` handle still gets its final flush at exit.
    """

    def __init__(
        self,
        pipe: Pipe,
        *,
        name: str | None,
        run_id: str | None,
        started: float,
        address: AggregatorAddress | None,
        is_aggregator: bool,
        cleanup_path: Path | None = None,
    ) -> None:
        self.pipe = pipe
        self.name = name
        self.run_id = run_id
        self.started = started
        self.address = address
        self.is_aggregator = is_aggregator
        self.cleanup_path = cleanup_path
        self.steps = itertools.count()
        self.closed = False
        self.aborted = False
        self.handles: weakref.WeakSet = weakref.WeakSet()
        # Re-entrant: a SIGTERM handler may call close() on the thread already inside it.
        self._lock = threading.RLock()
        _active[self._key()] = self
        lifecycle.track(self)

    def _key(self) -> tuple[int, int]:
        return (os.getpid(), id(self))

    def close(self, status: str | None, dropped: dict[str, int]) -> bool:
        """End this process's part (flush, BYE, ACK); in the aggregator's process this also
        ends the run.  Idempotent; handles sharing the membership stop recording."""
        with self._lock:
            if self.closed:
                return True
            self.closed = True
        for handle in list(self.handles):
            handle._detach()
        done = self.pipe.close(status, dropped, None)
        if self.cleanup_path is not None and not (self.is_aggregator and not self.pipe.aggregator.finished):
            # Ranks still to start need the address: while the run goes on, the file stays
            # until the aggregator has finished (see _close_at_exit).
            rendezvous.remove_file(self.cleanup_path)
        if self.is_aggregator or rendezvous.inherited() == self.address:
            rendezvous.export(None)
        _active.pop(self._key(), None)
        for key, membership in list(_joined.items()):
            if membership is self:
                del _joined[key]
        return bool(done)

    def abort(self) -> None:
        """The server asked the run to stop.  Called on a transport thread: the handles'
        callbacks and the configured action run on a thread of their own."""
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
        threading.Thread(target=self._act_on_abort, name="simvue-abort", daemon=True).start()

    def _act_on_abort(self) -> None:
        handles = list(self.handles)
        for handle in handles:
            handle._on_abort()
        action = handles[0]._abort_action() if handles else "terminate"
        if action == "ignore":
            return
        if handles:
            handles[0]._record_status("terminated")
        if action == "run":
            for handle in handles:
                handle._end_quietly()
        elif not lifecycle.in_worker_process():
            lifecycle.interrupt_main()  # the pool's parent (or each rank) stops its workers

    def _after_fork_in_child(self) -> None:
        # The parent's part, not this child's: never flushed, closed or waited for here.
        lifecycle.keep_inherited(self.pipe)
        self.closed = True
        self.is_aggregator = False

    def _close_at_exit(self, status: str | None) -> None:
        if not self.closed:
            self.close(status, {})
        if self.is_aggregator:
            self.pipe.aggregator.close(status, None)  # wait for ranks still running
            if self.cleanup_path is not None:
                rendezvous.remove_file(self.cleanup_path)


_active: dict[tuple[int, int], Membership] = {}
_joined: dict[tuple[str, str | None], Membership] = {}


def _forget_in_child() -> None:
    _active.clear()
    _joined.clear()


lifecycle.on_fork_in_child(_forget_in_child)


class LocalPipe:
    """The aggregator process's own records: appended to the aggregator's local buffer."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.buffer = aggregator.local_buffer
        self.spill = None
        self.artifacts = ArtifactQueue(self._copy_into_store, aggregator.losses)

    def buffer_full(self, limit: int) -> None:
        deadline = time.monotonic() + 1.0
        while len(self.buffer) >= limit and time.monotonic() < deadline and not self.aggregator.finished:
            time.sleep(0.005)

    def save_artifact(self, job: ArtifactJob) -> bool:
        self.artifacts.put(job)
        return True

    def _copy_into_store(self, job: ArtifactJob) -> None:
        """No socket in this process: the content goes straight into the store's blobs."""
        blobs = self.aggregator.blobs
        checksum, size = blobs.put_file(job.path) if job.path is not None else blobs.put_bytes(job.data or b"")
        self.buffer.append((protocol.ARTIFACT, {**job.info, "size": size, "checksum": checksum, "transfer": None}))

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        copied = self.artifacts.wait(timeout_s)
        return self.aggregator.flush(max(0.0, deadline - time.monotonic())) and copied

    def close(self, status: str | None, dropped: dict[str, int], timeout_s: float | None) -> bool:
        self.artifacts.wait(ARTIFACTS_CLOSE_TIMEOUT_S if timeout_s is None else timeout_s)
        if dropped:
            self.buffer.append((2, {"simvue": {"dropped_calls": {"main": dropped}}}))
        return self.aggregator.close(status, timeout_s, wait_for_ranks=False)


class SenderPipe:
    """A process that is not the aggregator: records travel through a ``Sender``."""

    def __init__(self, sender: Sender, losses: LossCounter, sampling: SamplingRole) -> None:
        self.sender = sender
        self.buffer = sender.buffer
        self.spill = sender.spill
        self.artifacts = ArtifactQueue(StreamToSender(sender), losses)
        self.sampling = sampling
        sender.on_sample = sampling.configure

    def buffer_full(self, limit: int) -> None:
        self.sender.buffer_full(limit)

    def save_artifact(self, job: ArtifactJob) -> bool:
        self.artifacts.put(job)
        return True

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        sent = self.artifacts.wait(timeout_s)
        return self.sender.flush(max(0.0, deadline - time.monotonic())) and sent

    def close(self, status: str | None, dropped: dict[str, int], timeout_s: float | None) -> bool:
        self.sampling.stop(5.0 if timeout_s is None else min(timeout_s, 5.0))  # its last sample goes with the rest
        self.artifacts.wait(ARTIFACTS_CLOSE_TIMEOUT_S if timeout_s is None else timeout_s)
        return self.sender.close(status, dropped, 30.0 if timeout_s is None else timeout_s)


class SpillPipe:
    """No aggregator could be found: records go to a spill file on the local disk."""

    def __init__(self, spill: SpillFile) -> None:
        self.spill = spill
        self.buffer: deque = deque()

    def buffer_full(self, limit: int) -> None:
        self._write()

    def save_artifact(self, job: ArtifactJob) -> bool:
        return False  # no aggregator to send the content to

    def flush(self, timeout_s: float) -> bool:
        self._write()
        return False

    def close(self, status: str | None, dropped: dict[str, int], timeout_s: float | None) -> bool:
        self._write()
        return False

    def _write(self) -> None:
        records = [self.buffer.popleft() for _ in range(len(self.buffer))]
        if records:
            self.spill.write_records(records)


_ordinal = 0


def _next_ordinal() -> int:
    global _ordinal
    _ordinal += 1
    return _ordinal


def open_run(
    run_fields: dict[str, Any], settings: Settings, topology: Topology, server: ServerConfig | None = None
) -> Membership:
    """Create the run (aggregator) or join it (sender), as this process's place dictates.
    ``server``, when online, is where the aggregator sends the run besides the local store."""
    ordinal = _next_ordinal()
    inherited = rendezvous.inherited()
    if inherited is not None:
        return join(inherited, settings, topology, role="worker")
    if not topology.is_mpi:
        return _aggregate(
            run_fields, settings, topology, server, expected_ranks=1, namespace=False, role="process"
        )
    explicit = rendezvous.explicit()
    if topology.rank == 0:
        membership = _aggregate(
            run_fields, settings, topology, server, expected_ranks=topology.size, namespace=True, role="rank",
            bind_address=_bind_address(explicit[0]) if explicit else None,
            key=_explicit_key(explicit) if explicit else None,
        )
        if explicit is None:
            if initialised_mpi() is not None:
                rendezvous.broadcast_mpi(membership.address, settings.rendezvous_timeout_s)
            else:
                path = rendezvous.file_for(topology, ordinal)
                rendezvous.publish_file(path, membership.address)
                membership.cleanup_path = path
        return membership
    if explicit is not None:
        address: AggregatorAddress | None = AggregatorAddress(address=explicit[0], key=_explicit_key(explicit))
    elif initialised_mpi() is not None:
        address = rendezvous.broadcast_mpi(None, settings.rendezvous_timeout_s)
    else:
        address = rendezvous.find_file(rendezvous.file_for(topology, ordinal), settings.rendezvous_timeout_s)
    if address is None:
        return _spill_only(run_fields.get("name"), settings, topology)
    return join(address, settings, topology, role="rank")


def join(address: AggregatorAddress, settings: Settings, topology: Topology, *, role: str) -> Membership:
    """Connect this process to an existing run's aggregator (once per process and run)."""
    key = (address.address, address.run_id)
    known = _joined.get(key)
    if known is not None and not known.closed:
        return known
    if role == "rank" and lifecycle.in_worker_process():
        role = "worker"
    losses = LossCounter()
    label = f"rank{topology.rank}" if role == "rank" else f"pid{os.getpid()}"
    spill = SpillFile(_spill_path(settings, address.run_name or "run", label), losses)
    sender = Sender(
        address.address,
        address.key,
        hello=_hello(topology, role, address.started),
        flush_interval_s=settings.flush_interval_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        close_timeout_s=settings.close_timeout_s,
        spill=spill,
        losses=losses,
    )
    if address.run_name is None:  # explicit address: the name comes with the first ACK
        if sender.welcomed.wait(settings.rendezvous_timeout_s) and sender.welcome:
            address = dataclasses.replace(
                address,
                run_name=sender.welcome.get("name"),
                run_id=sender.welcome.get("id"),
                started=sender.welcome.get("started"),
            )
        else:
            warnings.warn(
                f"simvue: no aggregator answered at {address.address} within "
                f"{settings.rendezvous_timeout_s:g} s; records will be kept until it does or spilled to {spill.path}",
                SimvueWarning,
                stacklevel=4,
            )
    rendezvous.export(address)
    sampling = SamplingRole(topology.host, address.started or time.time(), sender.buffer.append)
    membership = Membership(
        SenderPipe(sender, losses, sampling),
        name=address.run_name,
        run_id=address.run_id,
        started=address.started or time.time(),
        address=address,
        is_aggregator=False,
    )
    sender.on_abort = membership.abort
    if sender.aborted:  # the ABORT came with the welcome, before the line above
        membership.abort()
    _joined[key] = membership
    return membership


def _aggregate(
    run_fields: dict[str, Any],
    settings: Settings,
    topology: Topology,
    server: ServerConfig | None,
    *,
    expected_ranks: int,
    namespace: bool,
    role: str,
    bind_address: str | None = None,
    key: bytes | None = None,
) -> Membership:
    if server is not None and server.online:
        sink: OfflineSink | RestSink = RestSink(settings.store_path(), server, settings)
    else:
        sink = OfflineSink(settings.store_path())
    run_fields = {**run_fields, "system": system_info(), "heartbeat_timeout_s": settings.run_heartbeat_timeout_s}
    local = topology.single_node or not topology.is_mpi
    aggregator = Aggregator(
        sink=sink,
        run_fields=run_fields,
        settings=settings,
        local_hello=_hello(topology, role, run_fields["now"]),
        expected_ranks=expected_ranks,
        namespace_ranks=namespace,
        bind_host="127.0.0.1" if local else "*",
        advertise_host="127.0.0.1" if local else socket.getfqdn(),
        key=key or secrets.token_bytes(32),
        bind_address=bind_address,
    )
    address = aggregator.start()
    rendezvous.export(address)
    membership = Membership(
        LocalPipe(aggregator),
        name=aggregator.run_name,
        run_id=aggregator.run_id,
        started=aggregator.started,
        address=address,
        is_aggregator=True,
    )
    aggregator.on_abort = membership.abort
    if isinstance(sink, RestSink):
        sink.on_abort = aggregator.abort
        if sink.abort_requested:
            aggregator.abort()
    return membership


def _spill_only(name: str | None, settings: Settings, topology: Topology) -> Membership:
    spill = SpillFile(_spill_path(settings, name or "unknown-run", f"rank{topology.rank}"), LossCounter())
    warnings.warn(
        f"simvue: rank {topology.rank} could not find its run's aggregator within "
        f"{settings.rendezvous_timeout_s:g} s; its records are kept in {spill.path}",
        SimvueWarning,
        stacklevel=4,
    )
    return Membership(SpillPipe(spill), name=name, run_id=None, started=time.time(), address=None, is_aggregator=False)


def _spill_path(settings: Settings, run_name: str, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_name)
    return settings.store_path() / SPILL_DIRECTORY / f"{safe}-{label}-{os.getpid()}.msgpack"


def _explicit_key(explicit: tuple[str, bytes | None]) -> bytes:
    address, key = explicit
    # Without SIMVUE_AGGREGATOR_KEY the key is derived from the address: frames are still
    # checked for integrity, but anyone who knows the address can forge them.
    return key or hashlib.sha256(f"simvue:{address}".encode()).digest()


def _bind_address(address: str) -> str:
    scheme, _, rest = address.partition("://")
    port = rest.rsplit(":", 1)[-1]
    return f"{scheme}://*:{port}" if scheme == "tcp" else address


def _hello(topology: Topology, role: str, started: float | None) -> dict[str, Any]:
    return {
        "role": role,
        "rank": topology.rank,
        "size": topology.size,
        "local_rank": topology.local_rank,
        "pid": os.getpid(),
        "host": topology.host,
        "started": started,
        "python": platform.python_version(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def system_info() -> dict[str, Any]:
    """What the run records about the machine it started on (as Simvue clients do)."""
    uname = platform.uname()
    return {
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "pythonversion": platform.python_version(),
        "platform": {"system": uname.system, "release": uname.release, "version": uname.version},
        "cpu": {"arch": uname.machine, "processor": cpu_model()},
        "user": _user(),
        "executable": sys.executable,
        "argv": list(sys.argv),
    }


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not an error
        return None
