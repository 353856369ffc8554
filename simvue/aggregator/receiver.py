"""The aggregator's socket: a ZeroMQ ROUTER that every sender's DEALER connects to.

Binds, waits for messages, reads and authenticates them (``protocol.decode``), and sends the
replies the aggregator's state asks for.  Where other nodes can reach it, the traffic is
encrypted too (``transport.security``).  Used only on the aggregator's thread, which opens
and closes it.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import zmq

from ..transport import protocol, security
from ..transport.protocol import BadFrame, Message
from .instructions import Reply

RCV_HWM_MESSAGES = 10_000
CLOSE_LINGER_MS = 1000
# Files the aggregating process holds besides its senders' connections: the store, the spill
# and rendezvous files, the sampler's pipes, the user's own.
FILES_BESIDE_CONNECTIONS = 64


def make_room_for_connections(senders: int) -> str | None:
    """Let this process open a connection per sender: the ROUTER socket holds one file per
    connected sender, and a soft limit of 1,024 open files (a common default) is reached by
    a job of about a thousand ranks.  Raises the soft limit to the hard one when the job needs
    more than the soft limit; returns what to tell the user if even that is too few."""
    try:
        import resource
    except ImportError:  # no such limit here
        return None
    needed = senders + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (ValueError, OSError):
        pass
    if hard == resource.RLIM_INFINITY or needed <= soft:
        return None
    return (
        f"simvue: this job's {senders} processes need about {needed} open files in the aggregating process, but it"
        f" may open only {soft} (ulimit -n; the hard limit is {hard}), so some may not be able to connect. Raise"
        f" the hard limit (ulimit -Hn, or the batch system's setting) to at least {needed}."
    )


@dataclasses.dataclass(frozen=True)
class Binding:
    """Where to listen: an explicit ``address`` (``tcp://10.0.0.5:5555``) advertised to
    senders as ``advertise`` (``tcp://node1:5555``), or a random port on ``host``,
    advertised as ``advertise_host``."""

    host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    address: str | None = None
    advertise: str | None = None


class Receiver:
    """One ROUTER socket and the run's key, and a pipe that ends a ``poll`` early when
    another thread calls ``wake`` (a close or a flush waits for the loop, not for a timeout)."""

    def __init__(self, key: bytes, binding: Binding) -> None:
        self._key = key
        self._binding = binding
        self._context: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None
        self._wake_lock = threading.Lock()  # wake() never writes to a pipe close() has closed
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        # Senders that reach this socket through a node's relay (``transport.relay``): their
        # id -> the relay's routing id.  A sender not in it is connected directly.
        self.routes: dict[bytes, bytes] = {}
        self.direct: set[bytes] = set()  # senders seen connected directly
        self.relays: set[bytes] = set()

    def open(self) -> str:
        """Bind; returns the address senders connect to.  Raises if it cannot bind."""
        self._context = zmq.Context()
        sock = self._sock = self._context.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.RCVHWM, RCV_HWM_MESSAGES)
            # libzmq drops a larger frame unread and disconnects its sender: memory stays
            # bounded whatever an unauthenticated process sends.
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
            sock.setsockopt(zmq.LINGER, 0)
            if security.encrypted(self._binding.advertise or f"tcp://{self._binding.advertise_host}:0"):
                security.serve(sock, self._key)  # other nodes can reach it: encrypt too
            if self._binding.address:
                sock.bind(self._binding.address)
                endpoint = self._binding.advertise or self._binding.address
            else:
                port = sock.bind_to_random_port(f"tcp://{self._binding.host}")
                endpoint = f"tcp://{self._binding.advertise_host}:{port}"
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            with self._wake_lock:
                self._wake_r, self._wake_w = wake_r, wake_w
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(wake_r, zmq.POLLIN)
            return endpoint
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_ms: int) -> bool:
        """Wait at most ``timeout_ms`` for a message, or until ``wake()``; whether a
        message is waiting."""
        assert self._sock is not None and self._poller is not None
        ready = dict(self._poller.poll(timeout_ms))
        if self._wake_r is not None and self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        return self._sock in ready

    def wake(self) -> None:
        """End the current (or the next) ``poll`` now; callable from any thread, never blocks."""
        with self._wake_lock:
            if self._wake_w is None:
                return
            try:
                os.write(self._wake_w, b"w")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is already waiting

    def receive(self) -> tuple[bytes, Message] | None:
        """The next waiting message and its sender's id, or None if none is waiting.
        Raises ``BadFrame`` for one that is not authentic or not a message.

        A message comes directly (``[sender id, mac, payload]``) or through a node's relay
        (``[relay id, sender id, mac, payload]``); either way the sender's own id is
        returned, and the route is remembered for the replies, once the message is found
        authentic.  A relayed message naming a sender that another relay forwards, or a
        relay itself, is refused; a sender that comes directly after coming through a relay
        (its relay died) is routed directly from then on."""
        assert self._sock is not None
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) == 3:
            sender_id = frames[0]
            message = protocol.decode(self._key, frames[1:])
            if self.routes.pop(sender_id, None) is not None or sender_id not in self.relays:
                self.direct.add(sender_id)
            return sender_id, message
        if len(frames) != 4:
            raise BadFrame(f"expected 3 frames, or 4 through a relay, got {len(frames)}")
        relay, sender_id = frames[0], frames[1]
        if not 0 < len(sender_id) <= 255 or sender_id == relay:
            raise BadFrame("a relayed frame with a malformed sender id")
        message = protocol.decode(self._key, frames[2:])
        route = self.routes.get(sender_id)
        if route is not None and route != relay:
            raise BadFrame("a relayed frame naming a sender that another relay forwards")
        if route is None and (sender_id in self.relays or sender_id in self.direct or relay in self.routes):
            raise BadFrame("a relayed frame naming a relay or a directly connected sender")
        self.routes[sender_id] = relay
        self.relays.add(relay)
        return sender_id, message

    def connections(self) -> int:
        """How many peers this socket has heard from: relays and directly connected senders."""
        return len(self.relays | self.direct)

    def send(self, reply: Reply) -> None:
        """Send without blocking; a reply that cannot go now is dropped (the sender is gone
        or its queue is full, and it asks again).  A relayed sender's goes through its relay."""
        assert self._sock is not None
        frames = protocol.encode(self._key, reply.kind, 0, reply.body)
        relay = self.routes.get(reply.sender_id)
        try:
            if relay is None:
                self._sock.send_multipart([reply.sender_id, *frames], zmq.NOBLOCK)
            else:
                self._sock.send_multipart([relay, reply.sender_id, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        """Close, giving the last replies (the final acknowledgements) ``CLOSE_LINGER_MS``
        to leave."""
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None
        self._poller = None
        if self._sock is not None:
            self._sock.close(CLOSE_LINGER_MS)
            self._sock = None
        if self._context is not None:
            self._context.term()
            self._context = None
