"""The composition root: decides which part this process plays in a run and wires it.

* The only process of a job, a pool's parent, or MPI rank 0 creates the run in the local
  store and builds an ``Aggregator`` that writes it there; its own records go straight into
  the aggregator's buffer.  When a server is configured, an ``Uploader`` follows the store
  and copies the run to the server.  Where ``aggregate_in`` says so (rank 0 of an MPI job by
  default), all this happens in a process of its own (``aggregator.host``), which this
  process then joins as the run's owner, through a ``Sender`` like any other rank.
* Every other rank, and every worker that inherited or was handed a ``Run``, builds a
  ``Sender`` to the aggregator found through ``transport.rendezvous``.
* A rank that cannot find its aggregator in ``rendezvous_timeout_s`` keeps its records in a
  spill file and says so in one warning; it never hangs the job.

Each process has one ``AbortSignal`` per run, made here and handed to every part that can
raise or act on a request to stop.  This is the only module that imports the transport, the
aggregator and the uploader together.
"""

from __future__ import annotations

import dataclasses
import getpass
import itertools
import logging
import os
import platform
import secrets
import socket
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import lifecycle
from ._util import drain, merge_dicts, safe_filename
from .abort import AbortSignal
from .aggregator.host import HostConfig, HostedAggregator, aggregates_apart
from .aggregator.liveness import own_start_time, pid_namespace
from .aggregator.receiver import Binding
from .aggregator.service import Aggregator
from .api.config import ServerConfig
from .config import Settings
from .errors import SimvueWarning
from .losses import LossCounter
from .resources import SamplingRole
from .resources.facts import cpu_model, initialised_library
from .store import SPILL_DIRECTORY, Store, StoreBatch
from .topology import Topology, elastic_attempt, initialised_mpi
from .transport import rendezvous
from .transport.protocol import ArtifactRecord, MetadataRecord, RecordKind
from .transport.rendezvous import AggregatorAddress
from .transport.sender import Sender
from .transport.spill import SpillFile
from .transport.transfer import CLOSE_TIMEOUT_S as ARTIFACTS_CLOSE_TIMEOUT_S
from .transport.transfer import ArtifactJob, ArtifactQueue, StreamToSender
from .validation import format_timestamp

if TYPE_CHECKING:
    from .transport.relay import Endpoint
    from .upload import Uploader  # imported when a server is configured: it needs requests

log = logging.getLogger(__name__)

# How long a pool worker's first use of a run waits for the aggregator's welcome (``join``):
# a round trip normally; the bound matters only when the aggregator cannot be reached.
WORKER_WELCOME_WAIT_S = 5.0


class Pipe(Protocol):
    """Where a ``Run`` handle's records go in this process."""

    buffer: deque

    @property
    def spill(self) -> SpillFile | None:
        """Where undeliverable records went, if this pipe can spill."""

    def buffer_full(self, limit: int, wait_s: float | None) -> None:
        """The buffer holds ``limit`` records: wait up to ``wait_s`` (None: the pipe's own
        short wait) for room, then keep the rest elsewhere if the pipe can."""

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
        abort: AbortSignal,
        aggregator: Aggregator | HostedAggregator | None = None,
        uploader: Uploader | None = None,
        cleanup_path: Path | None = None,
    ) -> None:
        self.pipe = pipe
        self.name = name
        self.run_id = run_id
        self.started = started
        self.address = address
        self.aggregator = aggregator  # in the process that aggregates the run
        self.uploader = uploader  # when the run is also sent to a server
        self.cleanup_path = cleanup_path
        self.steps = itertools.count()
        self.closed = False
        self.handles: weakref.WeakSet = weakref.WeakSet()
        # Re-entrant: a SIGTERM handler may call close() on the thread already inside it.
        self._lock = threading.RLock()
        _active[self._key()] = self
        lifecycle.track(self)
        abort.subscribe(self._on_abort)

    @property
    def is_aggregator(self) -> bool:
        return self.aggregator is not None

    @property
    def upload_error(self) -> Exception | None:
        """What the server refused, if it stopped the upload (e.g. a 4xx)."""
        return self.uploader.error if self.uploader is not None else None

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
        spill = self.pipe.spill
        if spill is not None and spill.records:  # also at exit, where no Run.close() reports it
            warnings.warn(
                f"simvue: {spill.records} records of run {self.name!r} could not reach the aggregator and were"
                f" written to {spill.path}; `simvue spill import` adds them to the run",
                SimvueWarning,
                stacklevel=4,
            )
        if self.cleanup_path is not None and not (self.aggregator is not None and not self.aggregator.finished):
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

    def _on_abort(self, reason: str) -> None:
        """The run was asked to stop (``AbortSignal``).  Called on a transport or upload
        thread: the handles' callbacks and the configured action run on a thread of their own."""
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

    def _note_signal(self, name: str, when: float) -> None:
        """A warning signal this process was sent and kept from ending it (lifecycle)."""
        for handle in list(self.handles)[:1]:
            handle.log_event(
                f"{name} received: Slurm's warning that the job will soon be stopped (--signal); the job goes on",
                timestamp=format_timestamp(when),
                log_level="warning",
            )

    def _after_fork_in_child(self) -> None:
        # The parent's part, not this child's: never flushed, closed or waited for here.
        lifecycle.keep_inherited(self.pipe)
        self.closed = True
        self.aggregator = None

    def _close_at_exit(self, status: str | None, stop_waiting_after_s: float | None = None) -> None:
        if not self.closed:
            self.close(status, {})
        if self.aggregator is not None:
            # Wait for ranks still running; when the job is being stopped, not for long.
            self.aggregator.close(status, None, stop_waiting_after_s=stop_waiting_after_s)
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

    def buffer_full(self, limit: int, wait_s: float | None) -> None:
        deadline = time.monotonic() + (1.0 if wait_s is None else wait_s)
        while len(self.buffer) >= limit and time.monotonic() < deadline and not self.aggregator.finished:
            time.sleep(0.005)

    def save_artifact(self, job: ArtifactJob) -> bool:
        self.artifacts.put(job)
        return True

    def _copy_into_store(self, job: ArtifactJob) -> None:
        """No socket in this process: the content goes straight into the store's blobs."""
        blobs = self.aggregator.blobs
        checksum, size = blobs.put_file(job.path) if job.path is not None else blobs.put_bytes(job.data or b"")
        info = {**job.info, "size": size, "checksum": checksum, "transfer": None}
        self.buffer.append(ArtifactRecord(RecordKind.ARTIFACT, info))

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        copied = self.artifacts.wait(timeout_s)
        return self.aggregator.flush(max(0.0, deadline - time.monotonic())) and copied

    def close(self, status: str | None, dropped: dict[str, int], timeout_s: float | None) -> bool:
        self.artifacts.wait(ARTIFACTS_CLOSE_TIMEOUT_S if timeout_s is None else timeout_s)
        if dropped:
            label = self.aggregator.state.table.local.label
            self.buffer.append(MetadataRecord(RecordKind.METADATA, {"simvue": {"dropped_calls": {label: dropped}}}))
        return self.aggregator.close(status, timeout_s, wait_for_ranks=False)


class SenderPipe:
    """A process that is not the aggregator: records travel through a ``Sender``."""

    def __init__(self, sender: Sender, losses: LossCounter, sampling: SamplingRole) -> None:
        self.sender = sender
        self.buffer = sender.buffer
        self.spill = sender.spill
        self.artifacts = ArtifactQueue(StreamToSender(sender), losses)
        self.sampling = sampling

    def buffer_full(self, limit: int, wait_s: float | None) -> None:
        self.sender.buffer_full(limit, wait_s)

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
        return self.sender.close(status, dropped, timeout_s)


class SpillPipe:
    """No aggregator could be found: records go to a spill file on the local disk."""

    def __init__(self, spill: SpillFile) -> None:
        self.spill = spill
        self.buffer: deque = deque()

    def buffer_full(self, limit: int, wait_s: float | None) -> None:
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
        records = drain(self.buffer)
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
    # The run's key is a random secret: given with an explicit address, or made by rank 0 and
    # shared only through MPI (if the user initialised it) or the private rendezvous file.
    explicit = rendezvous.explicit()
    if topology.rank == 0:
        membership = _aggregate(
            run_fields, settings, topology, server, expected_ranks=topology.size, namespace=True, role="rank",
            explicit_address=explicit[0] if explicit else None,
            key=explicit[1] if explicit else None,
        )
        if explicit is None or explicit[1] is None:
            assert membership.address is not None  # an aggregator always has one
            if initialised_mpi() is not None:
                rendezvous.broadcast_mpi(membership.address, settings.rendezvous_timeout_s)
            else:
                path = rendezvous.file_for(topology, ordinal)
                try:
                    rendezvous.publish_file(path, membership.address)
                    membership.cleanup_path = path
                except (rendezvous.RendezvousRefused, OSError) as exc:
                    warnings.warn(f"simvue: the other ranks cannot join this run: {exc}", SimvueWarning, stacklevel=4)
        return membership
    address: AggregatorAddress | None = None
    refused = None
    if explicit is not None and explicit[1] is not None:
        address = AggregatorAddress(address=explicit[0], key=explicit[1])
    elif initialised_mpi() is not None:
        address = rendezvous.broadcast_mpi(None, settings.rendezvous_timeout_s)
    else:
        try:
            address = rendezvous.find_file(rendezvous.file_for(topology, ordinal), settings.rendezvous_timeout_s)
        except (rendezvous.RendezvousRefused, OSError) as exc:
            refused = str(exc)
    if address is None:
        return _spill_only(run_fields.get("name"), settings, topology, refused)
    return join(address, settings, topology, role="rank")


def join(
    address: AggregatorAddress, settings: Settings, topology: Topology, *, role: str, owner: bool = False
) -> Membership:
    """Connect this process to an existing run's aggregator (once per process and run);
    ``owner``: this process started the run, whose aggregator runs in a process of its own."""
    key = (address.address, address.run_id)
    known = _joined.get(key)
    if known is not None and not known.closed:
        return known
    if role == "rank" and lifecycle.in_worker_process():
        role = "worker"
    losses = LossCounter()
    label = f"rank{topology.rank}" if role == "rank" else f"pid{os.getpid()}"
    hello = {**_hello(topology, role, address.started), **({"owner": True} if owner else {})}

    def spill_header() -> dict[str, Any]:
        """Who writes the spill file, for which run (read by ``simvue spill import``)."""
        welcome = sender.welcome or {}
        return {
            "run_id": welcome.get("id") or address.run_id,
            "run_name": welcome.get("name") or address.run_name,
            "sender": sender.sender_id.hex(),
            "label": welcome.get("label") or (label if role == "rank" else None),
            "hello": hello,
        }

    spill = SpillFile(_spill_path(settings, address.run_name or "run", label), losses, spill_header)
    abort = AbortSignal()
    buffer: deque[tuple] = deque()
    # The run's start time is known once the aggregator has answered (explicit addresses).
    sampling = SamplingRole(topology.host, lambda: address.started or time.time(), buffer.append)
    via = _relay_for(address, settings, topology) if role == "rank" else None
    sender = Sender(
        via.endpoint if via is not None else address.address,
        address.key,
        hello=hello,
        flush_interval_s=settings.flush_interval_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        close_timeout_s=settings.close_timeout_s,
        spill=spill,
        losses=losses,
        abort=abort,
        buffer=buffer,
        on_sample=sampling.configure,
        relay_alive=_relay_alive(via) if via is not None else None,
        direct_address=address.address,
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
    elif role == "worker" and not sender.welcomed.wait(WORKER_WELCOME_WAIT_S):
        # A pool can hand back a task's result, and the run be closed, before this process's
        # sender has said hello; the close then drains only the workers the aggregator knows.
        # Waiting for the welcome (one round trip, once per process) makes this one known.
        log.debug("run %r: no welcome within %g s; this worker's records may arrive late", address.run_name,
                  WORKER_WELCOME_WAIT_S)
    rendezvous.export(address)
    log.debug("run %r: this process joins it as a %s, sending to %s", address.run_name, role, address.address)
    membership = Membership(
        SenderPipe(sender, losses, sampling),
        name=address.run_name,
        run_id=address.run_id,
        started=address.started or time.time(),
        address=address,
        abort=abort,
    )
    _joined[key] = membership
    return membership


def _relay_for(address: AggregatorAddress, settings: Settings, topology: Topology) -> Endpoint | None:
    """This node's relay for the run, when this rank should send through one (on another
    node than the aggregator's, as ``settings.relay`` says); None: connect directly."""
    from .transport import relay  # only ranks get here, not a run's start

    host = relay.aggregator_host(address.address, address.host)
    if not relay.wanted(settings.relay, topology, host):
        return None
    found = relay.attach(
        address.address, address.key, topology.host, settings.rendezvous_timeout_s,
        {"heartbeat_interval_s": settings.heartbeat_interval_s, "rendezvous_timeout_s": settings.rendezvous_timeout_s},
    )
    log.debug("rank %s on %s: %s", topology.rank, topology.host,
              f"sends through this node's relay at {found.endpoint}" if found else "no relay: connects directly")
    return found


def _relay_alive(via: Endpoint) -> Callable[[], bool]:
    from .transport import relay

    return lambda: relay.running(via)


def _aggregate(
    run_fields: dict[str, Any],
    settings: Settings,
    topology: Topology,
    server: ServerConfig | None,
    *,
    expected_ranks: int,
    namespace: bool,
    role: str,
    explicit_address: str | None = None,
    key: bytes | None = None,
) -> Membership:
    """Create (or resume) the run and start its aggregator: on a thread of this process, or
    in a process of its own (``host``) that this one then joins as the run's owner."""
    plan = HostConfig(
        run_fields=run_fields, settings=settings, topology=topology, server=server, expected_ranks=expected_ranks,
        namespace=namespace, explicit_address=explicit_address, key=key, owner_pid=os.getpid(),
        owner_created=own_start_time(), debug=log.isEnabledFor(logging.DEBUG),
    )
    if aggregates_apart(settings, topology):
        plan.mpi_library = initialised_library()
        hosted = HostedAggregator.launch(plan, settings.rendezvous_timeout_s)
        membership = join(hosted.address, settings, topology, role=role, owner=True)
        membership.aggregator = hosted
        return membership
    aggregator, uploader, address = start_aggregator(plan, role)
    rendezvous.export(address)
    return Membership(
        LocalPipe(aggregator),
        name=aggregator.run_name,
        run_id=aggregator.run_id,
        started=aggregator.started,
        address=address,
        abort=aggregator.state.abort,
        aggregator=aggregator,
        uploader=uploader,
    )


def start_aggregator(plan: HostConfig, role: str) -> tuple[Aggregator, Uploader | None, AggregatorAddress]:
    """Create (or resume) the run ``plan`` describes in the local store, start its
    aggregator (``role``: the HELLO role of the process it runs in) and, when a server is
    configured, the uploader that follows the store."""
    settings, topology, server = plan.settings, plan.topology, plan.server
    store = Store(settings.store_path())
    try:
        fields = {**plan.run_fields, "system": system_info(), "heartbeat_timeout_s": settings.run_heartbeat_timeout_s}
        elastic = elastic_attempt() if topology.launcher == "torchrun" else None
        if elastic is not None:
            fields = _elastic_fields(store, fields, *elastic)
        run = _start_run(store, fields)
        abort = AbortSignal()
        uploader = None
        if server is not None and server.online:
            from .upload import start_upload

            try:
                uploader = start_upload(store.directory, server, run["id"], run["name"], settings, abort)
            except Exception:
                store.write(run["id"], StoreBatch(status="failed", ended=time.time()))
                raise
        aggregator = Aggregator(
            store=store,
            run=run,
            settings=settings,
            local_hello=_hello(topology, role, run["started"]),
            expected_ranks=plan.expected_ranks,
            namespace_ranks=plan.namespace,
            key=plan.key or secrets.token_bytes(32),
            abort=abort,
            binding=_binding(topology, plan.explicit_address),
            followers=[uploader] if uploader is not None else [],
        )
        address = aggregator.start()
    except BaseException:
        store.close()
        raise
    log.debug(
        "run %r (%s): this process (%s %s) aggregates it at %s, expecting %d rank(s); store %s%s",
        run["name"], run["id"], role, topology.rank, address.address, plan.expected_ranks, store.directory,
        f"; uploading to {server.url}" if uploader is not None and server is not None else "",
    )
    return aggregator, uploader, address


def _start_run(store: Store, fields: dict[str, Any]) -> dict[str, Any]:
    """Create the run ``fields`` describe, or resume the stored one it names
    (``resume_id``, from ``Run.reconnect``: the stored name and folder stand; or
    ``continue_id``, an elastic job's next attempt: it goes on where it was, in any state)."""
    resume = fields.pop("resume_id", None)
    continued = fields.pop("continue_id", None)
    now = fields.pop("now")
    if continued is not None:
        stored = store.resume_run(continued, now, any_status=True)
        return {"id": stored["id"], "name": stored["name"], "started": stored["started"] or stored["created"],
                "status": stored["status"]}
    if resume is not None:
        stored = store.resume_run(resume, now)
        return {"id": stored["id"], "name": stored["name"], "started": now, "status": stored["status"]}
    run_id = store.create_run(**fields, now=now)
    return {"id": run_id, "name": fields["name"], "started": now, "status": fields["status"]}


def _elastic_fields(store: Store, fields: dict[str, Any], job: str, attempt: int) -> dict[str, Any]:
    """The fields of an elastic (torchrun) job's run: the first attempt makes it, marked
    with the job's run id; a later attempt goes on in the run of its earlier one, with the
    attempt counted in the metadata (``simvue.elastic``) and an event."""
    mark = {"run_id": job, "attempts": attempt + 1}
    metadata = merge_dicts(dict(fields["metadata"]), {"simvue": {"elastic": mark}})
    fields = {**fields, "metadata": metadata}
    if attempt == 0:
        return fields
    earlier = [r for r in store.runs() if r["metadata"].get("simvue", {}).get("elastic", {}).get("run_id") == job]
    if not earlier:
        return fields  # its first attempt wrote another store: a run of its own
    run_id = earlier[-1]["id"]
    store.write(run_id, StoreBatch(
        metadata={"simvue": {"elastic": mark}},
        events=[(fields["now"], f"elastic restart: attempt {attempt} of job {job} starts", "warning")],
    ))
    return {**fields, "continue_id": run_id}


def _spill_only(name: str | None, settings: Settings, topology: Topology, refused: str | None = None) -> Membership:
    label = f"rank{topology.rank}"
    header = {"run_id": None, "run_name": name, "sender": None, "label": label, "hello": _hello(topology, "rank", None)}
    spill = SpillFile(_spill_path(settings, name or "unknown-run", label), LossCounter(), lambda: header)
    log.debug("rank %s found no aggregator: records go to %s", topology.rank, spill.path)
    if refused is not None:
        why = f"refused the rendezvous: {refused}"
    else:
        why = f"could not find its run's aggregator within {settings.rendezvous_timeout_s:g} s"
        if rendezvous.explicit() is not None:
            why += f" (with {rendezvous.ADDRESS_ENV} set, set {rendezvous.KEY_ENV} too when the ranks share no directory)"
    warnings.warn(f"simvue: rank {topology.rank} {why}; its records are kept in {spill.path}", SimvueWarning, stacklevel=4)
    return Membership(SpillPipe(spill), name=name, run_id=None, started=time.time(), address=None, abort=AbortSignal())


def _spill_path(settings: Settings, run_name: str, label: str) -> Path:
    return settings.store_path() / SPILL_DIRECTORY / f"{safe_filename(run_name, distinct=True)}-{label}-{os.getpid()}.msgpack"


def _binding(topology: Topology, explicit_address: str | None) -> Binding:
    """Where the aggregator listens: loopback when the whole job is on this node; else the
    interface this host's name resolves to (all interfaces only if that cannot be bound);
    an explicit ``tcp://host:port`` the same way, on that port."""
    if explicit_address is not None:
        scheme, _, rest = explicit_address.partition("://")
        if scheme != "tcp":
            return Binding(address=explicit_address, advertise=explicit_address)
        host, _, port = rest.rpartition(":")
        return Binding(address=f"tcp://{_interface(host)}:{port}", advertise=explicit_address)
    if topology.single_node or not topology.is_mpi:
        return Binding(host="127.0.0.1", advertise_host="127.0.0.1")
    name = socket.getfqdn()
    return Binding(host=_interface(name), advertise_host=name)


def _interface(host: str) -> str:
    """The local address ``host`` resolves to, if this process can listen on it; else ``*``."""
    try:
        ip = socket.gethostbyname(host.strip("[]"))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return "*"
    return "*" if ip.startswith("127.") and not host.startswith("127.") and host != "localhost" else ip


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
        "created": own_start_time(),
        "pid_namespace": pid_namespace(),
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
