"""A node's relay: one connection to the aggregator for every rank of a node.

In a large job (docs/mpi.md, "Relays") the ranks on a node other than the aggregator's do
not each connect to rank 0: one of them, elected by a lock file, starts this program
(``python -m simvue.transport.relay``), and every rank of the node connects its ``Sender``
to the relay's ROUTER socket on ``ipc://`` instead.  The relay

* forwards each rank's frames to the aggregator as ``[sender id, mac, payload]`` over one
  DEALER socket (CURVE where the aggregator's address may leave the node, as a sender's),
  and the aggregator's replies back to that rank; it does not unpack data messages (the
  aggregator authenticates every frame);
* answers the ranks' HEARTBEATs itself from the latest ACK it forwarded to that rank, when
  that ACK covers what the heartbeat asks for; otherwise it forwards the heartbeat (at most
  one per rank per heartbeat interval), so that ``flush()`` still gets its acknowledgement;
* sends the aggregator one ``NODE_HEARTBEAT`` per heartbeat interval naming the ranks it
  heard from and those whose process it saw end (it reads their HELLOs, and checks their
  pids as ``simvue.aggregator.liveness`` does: it is on their node);
* ends when every rank it served has said goodbye (and had it acknowledged) or ended, or
  when no rank came within the rendezvous timeout.

The election: a lock file in this user's private runtime directory (``runtime_directory``),
named from a digest of the run's key and the node's name.  The rank that takes the lock
(``flock``, non-blocking) starts the relay and hands it the locked file, so the lock lives
exactly as long as the relay; the relay binds its socket, writes an address file (endpoint,
pid, start time) atomically, and says ``ready`` on its stdout.  The other ranks wait for that
file (bounded by the rendezvous timeout).  Anything that fails on the way leaves the rank
connected directly to the aggregator: ``attach`` never raises and never waits longer than
``timeout_s``.  A sender checks its relay's pid and start time every heartbeat interval and,
once it has ended, connects directly and sends again everything not yet acknowledged
(``Sender``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import zmq

from ..config import RELAY_MIN_RANKS
from ..topology import Topology, this_host
from . import protocol, security
from .protocol import MessageKind
from .rendezvous import RendezvousRefused, check_private_directory, write_private

log = logging.getLogger(__name__)

RUNTIME_DIR_ENV = "SIMVUE_RUNTIME_DIR"
# An ipc:// path is a Unix socket's: at most 107 bytes (sun_path, with its NUL).
MAX_IPC_PATH = 107
READY_TIMEOUT_S = 10.0
FRONT_HWM_MESSAGES = 100_000
BACK_HWM_MESSAGES = 100_000
PROBE_INTERVAL_S = 0.5
CLOSE_LINGER_MS = 2000
# Once every rank it served has finished, the relay waits this long (at least) for more.
IDLE_EXIT_MIN_S = 1.0


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a node's relay listens, and which process it is (to see that it ended)."""

    endpoint: str
    pid: int
    created: float


def runtime_directory() -> Path:
    """This user's private directory for relays' sockets and lock files: ``$SIMVUE_RUNTIME_DIR``,
    else ``$XDG_RUNTIME_DIR/simvue``, else ``/tmp/simvue-<uid>``; made with mode 0700.  Raises
    ``RendezvousRefused`` unless it is a directory of this user's (not a symbolic link) that
    nobody else can enter."""
    configured = os.environ.get(RUNTIME_DIR_ENV)
    if configured:
        path = Path(configured)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "simvue"
    else:
        path = Path(tempfile.gettempdir()) / f"simvue-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RendezvousRefused(f"the relay directory {path} is not a directory (a symbolic link?)")
    check_private_directory(path)
    if info.st_mode & 0o077:
        raise RendezvousRefused(f"the relay directory {path} is open to other users (mode {info.st_mode & 0o777:o})")
    return path


def digest(key: bytes, host: str) -> str:
    """The name of a run's relay on ``host``: nothing about the key can be read from it."""
    return hashlib.sha256(b"simvue relay\0" + key + b"\0" + host.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def aggregator_host(address: str, host: str | None) -> str | None:
    """The aggregator's node: ``host`` as it published it; for an explicit address without
    one, the host name in it (a loopback address is this node).  None where unknown."""
    if host:
        return host
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return None
    name = rest.rpartition(":")[0].strip("[]")
    if not name or name == "*":
        return None
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        if name in ("localhost", "localhost.localdomain"):
            return this_host()
        return name
    return this_host() if ip.is_loopback else None  # another IP address: not a node's name


def wanted(mode: str, topology: Topology, host: str | None) -> bool:
    """Whether this rank sends through its node's relay (``Settings.relay``)."""
    if mode == "off" or host is None or _same_host(host, topology.host):
        return False
    return mode == "on" or topology.size >= RELAY_MIN_RANKS


def _same_host(a: str, b: str) -> bool:
    return a == b or a.split(".")[0] == b.split(".")[0]


def attach(upstream: str, key: bytes, host: str, timeout_s: float, settings: dict[str, float]) -> Endpoint | None:
    """The endpoint of this node's relay for the run ``key``: started by this process if it
    wins the election, else waited for (at most ``timeout_s``).  None if there is none; never
    raises."""
    try:
        return _attach(upstream, key, host, timeout_s, settings)
    except Exception as exc:  # noqa: BLE001 - without a relay the rank connects directly
        log.debug("no relay for this node (%r): connecting directly", exc)
        return None


def _attach(upstream: str, key: bytes, host: str, timeout_s: float, settings: dict[str, float]) -> Endpoint | None:
    import fcntl

    directory = runtime_directory()
    name = digest(key, host)
    info_path = directory / f"{name}.json"
    ipc_path = directory / f"{name}.sock"
    if len(str(ipc_path)) > MAX_IPC_PATH:
        log.debug("relay socket path %s is too long for a Unix socket", ipc_path)
        return None
    deadline = time.monotonic() + timeout_s
    pause_s = 0.01
    while True:
        found = read_endpoint(info_path)
        if found is not None:
            return found
        fd = os.open(directory / f"{name}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        else:
            return _start(fd, upstream, key, host, directory, name, min(timeout_s, READY_TIMEOUT_S), settings)
        finally:
            os.close(fd)  # the relay holds its own copy of a lock won here
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause_s)
        pause_s = min(pause_s * 1.5, 0.2)


def _start(
    lock_fd: int, upstream: str, key: bytes, host: str, directory: Path, name: str, timeout_s: float,
    settings: dict[str, float],
) -> Endpoint | None:
    """Start the relay holding ``lock_fd``; its endpoint once it says it is ready."""
    config = {
        "upstream": upstream, "key": key, "host": host, "directory": str(directory), "name": name,
        "lock_fd": lock_fd, **settings,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "simvue.transport.relay"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, pass_fds=(lock_fd,),
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(msgpack.packb(config))
        process.stdin.close()
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline() if ready else b""
    except OSError:
        line = b""
    finally:
        process.stdout.close()
    if line.strip() != b"ready":
        if process.poll() is None:
            process.kill()
        return None
    _started.append(process)  # reaped at exit (or when it ends): a zombie would look alive to no one
    return read_endpoint(directory / f"{name}.json")


_started: list[subprocess.Popen] = []


def read_endpoint(path: Path) -> Endpoint | None:
    """The relay ``path`` names, if the file is private to this user and the relay runs."""
    from .rendezvous import _read_private

    try:
        fields = json.loads(_read_private(path))
        found = Endpoint(str(fields["endpoint"]), int(fields["pid"]), float(fields["created"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if running(found) else None


def running(endpoint: Endpoint) -> bool:
    """Whether the relay process ``endpoint`` names still runs (not a zombie, not a new
    process that reuses its pid)."""
    from ..aggregator.liveness import process_running

    for process in list(_started):
        if process.poll() is not None:
            _started.remove(process)  # reaped: its pid no longer looks alive
    return process_running(endpoint.pid, endpoint.created)


# -- the relay process --------------------------------------------------------------------


@dataclasses.dataclass
class _Rank:
    last_heard: float
    pid: int | None = None
    created: float | None = None
    pid_namespace: str | None = None
    ack: dict[str, Any] | None = None  # the latest ACK forwarded to it, as a body to repeat
    ack_seq: int = -1
    forwarded_heartbeat_at: float = float("-inf")
    bye_seq: int | None = None
    done: bool = False  # its goodbye was acknowledged
    gone: bool = False  # its process ended
    gone_reports: int = 0


class Relay:
    """The relay's sockets and loop (one thread)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.key: bytes = config["key"]
        self.upstream: str = config["upstream"]
        self.directory = Path(config["directory"])
        self.name: str = config["name"]
        self.heartbeat_interval_s = float(config.get("heartbeat_interval_s", 1.0))
        self.wait_for_ranks_s = float(config.get("rendezvous_timeout_s", 60.0))
        self.ranks: dict[bytes, _Rank] = {}
        self.back_outbox: list[list[bytes]] = []
        self.dropped = 0
        self.context = zmq.Context()
        self.front = self.context.socket(zmq.ROUTER)
        self.back = self.context.socket(zmq.DEALER)
        self.socket_path = self.directory / f"{self.name}.sock"
        self.info_path = self.directory / f"{self.name}.json"
        self._stop = False

    def open(self) -> None:
        from ..aggregator.liveness import own_start_time, pid_namespace

        self.namespace = pid_namespace()
        front, back = self.front, self.back
        front.setsockopt(zmq.RCVHWM, FRONT_HWM_MESSAGES)
        front.setsockopt(zmq.SNDHWM, FRONT_HWM_MESSAGES)
        front.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
        front.setsockopt(zmq.LINGER, 0)
        try:
            self.socket_path.unlink()  # a dead relay's (its lock is ours now)
        except FileNotFoundError:
            pass
        front.bind(f"ipc://{self.socket_path}")
        os.chmod(self.socket_path, 0o600)
        back.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        back.setsockopt(zmq.SNDHWM, BACK_HWM_MESSAGES)
        back.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        back.setsockopt(zmq.RECONNECT_IVL, 100)
        back.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if security.encrypted(self.upstream):
            security.connect(back, self.key)
        back.connect(self.upstream)
        info = {"endpoint": f"ipc://{self.socket_path}", "pid": os.getpid(), "created": own_start_time()}
        write_private(self.info_path, json.dumps(info))

    def stop(self, *_: Any) -> None:
        self._stop = True

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        # While the aggregator's queue is full the ranks' messages wait in their own queues:
        # wait for room upstream (or replies) only, not for the ranks' messages.
        blocked = zmq.Poller()
        blocked.register(self.back, zmq.POLLIN | zmq.POLLOUT)
        started = last_front = time.monotonic()
        next_beat = started + self.heartbeat_interval_s
        next_probe = started + PROBE_INTERVAL_S
        idle_exit_s = max(IDLE_EXIT_MIN_S, 2 * self.heartbeat_interval_s)
        while not self._stop:
            ready = dict((blocked if self.back_outbox else poller).poll(50))
            now = time.monotonic()
            if ready.get(self.back, 0) & zmq.POLLIN:
                self._from_upstream()
            self._flush_upstream()
            if self.front in ready and not self.back_outbox:  # else let the ranks' queues hold it
                if self._from_ranks(now):
                    last_front = now
            if now >= next_probe:
                self._probe()
                next_probe = now + PROBE_INTERVAL_S
            if now >= next_beat:
                self._node_heartbeat(now)
                next_beat = now + self.heartbeat_interval_s
            active = [r for r in self.ranks.values() if not r.done and not (r.gone and r.gone_reports >= 2)]
            if not active and not self.back_outbox and now - last_front >= idle_exit_s:
                if self.ranks or now - started >= self.wait_for_ranks_s:
                    return

    def _from_ranks(self, now: float) -> bool:
        got = False
        for _ in range(10_000):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            got = True
            if len(frames) != 3:
                self.dropped += 1
                continue
            sender_id, mac, payload = frames
            try:
                kind, seq = _header(payload)
            except Exception:  # noqa: BLE001 - the aggregator counts what it cannot read
                kind, seq = None, 0
            rank = self.ranks.get(sender_id)
            if rank is None:
                rank = self.ranks[sender_id] = _Rank(last_heard=now)
            rank.last_heard = now
            if kind == MessageKind.HEARTBEAT and _authentic(self.key, mac, payload) and self._answer_heartbeat(
                sender_id, rank, seq, now
            ):
                continue
            if kind == MessageKind.HELLO and _authentic(self.key, mac, payload):
                self._hello(rank, payload)
            elif kind == MessageKind.BYE:
                rank.bye_seq = seq
            self._forward([sender_id, mac, payload])
        return got

    def _answer_heartbeat(self, sender_id: bytes, rank: _Rank, seq: int, now: float) -> bool:
        """Answer from the ACK it last had, when that covers ``seq`` (or one heartbeat went
        up within the interval); else it travels, and the aggregator answers."""
        if rank.ack is None:
            return False
        if rank.ack_seq < seq and now - rank.forwarded_heartbeat_at >= self.heartbeat_interval_s:
            rank.forwarded_heartbeat_at = now
            return False
        self._to_rank([sender_id, *protocol.encode(self.key, MessageKind.ACK, 0, rank.ack)])
        return True

    def _hello(self, rank: _Rank, payload: bytes) -> None:
        try:
            body = msgpack.unpackb(payload, strict_map_key=False)[3]
            pid, created, namespace = body.get("pid"), body.get("created"), body.get("pid_namespace")
        except Exception:  # noqa: BLE001
            return
        if pid.__class__ is int and created.__class__ in (int, float) and isinstance(namespace, str):
            rank.pid, rank.created, rank.pid_namespace = pid, float(created), namespace

    def _forward(self, frames: list[bytes]) -> None:
        if self.back_outbox:
            self.back_outbox.append(frames)
            return
        try:
            self.back.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.back_outbox.append(frames)

    def _flush_upstream(self) -> None:
        while self.back_outbox:
            try:
                self.back.send_multipart(self.back_outbox[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.back_outbox.pop(0)

    def _from_upstream(self) -> None:
        for _ in range(10_000):
            try:
                frames = self.back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            sender_id = frames[0]
            rank = self.ranks.get(sender_id)
            if rank is not None:
                try:
                    kind, _, body = protocol.decode(self.key, frames[1:])
                except protocol.BadFrame:
                    kind, body = None, None
                if kind is MessageKind.ACK and isinstance(body, dict) and body.get("seq").__class__ is int:
                    if body["seq"] >= rank.ack_seq or body.get("finished"):
                        rank.ack_seq = max(rank.ack_seq, body["seq"])
                        rank.ack = {k: v for k, v in body.items() if k != "run"} | {"seq": rank.ack_seq}
                    if rank.bye_seq is not None and rank.ack_seq >= rank.bye_seq:
                        rank.done = True
            self._to_rank(frames)

    def _to_rank(self, frames: list[bytes]) -> None:
        try:
            self.front.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the rank is gone, or its queue is full: it asks again

    def _probe(self) -> None:
        from ..aggregator.liveness import process_running

        for rank in self.ranks.values():
            if (
                not rank.done and not rank.gone and rank.pid is not None and rank.created is not None
                and self.namespace is not None and rank.pid_namespace == self.namespace
                and not process_running(rank.pid, rank.created)
            ):
                rank.gone = True

    def _node_heartbeat(self, now: float) -> None:
        alive = [
            sender_id for sender_id, rank in self.ranks.items()
            if not rank.done and not rank.gone and now - rank.last_heard <= 2 * self.heartbeat_interval_s
        ]
        gone = [sender_id for sender_id, rank in self.ranks.items() if rank.gone and not rank.done]
        for sender_id in gone:
            self.ranks[sender_id].gone_reports += 1
        if alive or gone:
            self._forward(protocol.encode(self.key, MessageKind.NODE_HEARTBEAT, 0, {"senders": alive, "gone": gone}))

    def close(self) -> None:
        for path in (self.info_path, self.socket_path, self.directory / f"{self.name}.lock"):
            try:
                path.unlink()
            except OSError:
                pass
        self.front.close(0)
        self.back.close()
        self.context.term()


def _header(payload: bytes) -> tuple[int, int]:
    """``(kind, seq)`` of a payload, without unpacking its body."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(payload)
    unpacker.read_array_header()
    unpacker.skip()  # the version
    return unpacker.unpack(), unpacker.unpack()


def _authentic(key: bytes, mac: bytes, payload: bytes) -> bool:
    return hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest())


def main() -> int:
    config = msgpack.unpackb(sys.stdin.buffer.read(), strict_map_key=False)
    lock_fd = config.get("lock_fd")  # held open (and locked) until this process ends
    relay = Relay(config)
    signal.signal(signal.SIGTERM, relay.stop)
    # The ranks' Ctrl-C is theirs to handle, and so are a batch system's warning signals
    # (Slurm's --signal may reach every process of the job).
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        relay.open()
    except Exception as exc:  # noqa: BLE001 - the ranks connect directly
        os.write(2, f"simvue: this node's relay could not start: {exc!r}\n".encode())
        relay.close()
        return 1
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    try:
        relay.loop()
    except Exception as exc:  # noqa: BLE001
        os.write(2, f"simvue: this node's relay stopped after an error: {exc!r}\n".encode())
    finally:
        relay.close()
        if isinstance(lock_fd, int):
            try:
                os.close(lock_fd)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
