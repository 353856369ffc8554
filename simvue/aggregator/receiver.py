"""The aggregator's socket: a ZeroMQ ROUTER that every sender's DEALER connects to.

Binds, waits for messages, reads and authenticates them (``protocol.decode``), and sends the
replies the aggregator's state asks for.  Where other nodes can reach it, the traffic is
encrypted too (``transport.security``).  Used only on the aggregator's thread, which opens
and closes it.
"""

from __future__ import annotations

import dataclasses

import zmq

from ..transport import protocol, security
from ..transport.protocol import BadFrame, Message
from .instructions import Reply

RCV_HWM_MESSAGES = 10_000
CLOSE_LINGER_MS = 1000


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
    """One ROUTER socket and the run's key."""

    def __init__(self, key: bytes, binding: Binding) -> None:
        self._key = key
        self._binding = binding
        self._context: zmq.Context | None = None
        self._sock: zmq.Socket | None = None

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
                return self._binding.advertise or self._binding.address
            port = sock.bind_to_random_port(f"tcp://{self._binding.host}")
            return f"tcp://{self._binding.advertise_host}:{port}"
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_ms: int) -> bool:
        """Wait at most ``timeout_ms`` for a message; whether one is waiting."""
        assert self._sock is not None
        return bool(self._sock.poll(timeout_ms, zmq.POLLIN))

    def receive(self) -> tuple[bytes, Message] | None:
        """The next waiting message and its sender's id, or None if none is waiting.
        Raises ``BadFrame`` for one that is not authentic or not a message."""
        assert self._sock is not None
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) != 3:
            raise BadFrame(f"expected 3 frames, got {len(frames)}")
        return frames[0], protocol.decode(self._key, frames[1:])

    def send(self, reply: Reply) -> None:
        """Send without blocking; a reply that cannot go now is dropped (the sender is gone
        or its queue is full, and it asks again)."""
        assert self._sock is not None
        try:
            self._sock.send_multipart(
                [reply.sender_id, *protocol.encode(self._key, reply.kind, 0, reply.body)], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        """Close, giving the last replies (the final acknowledgements) ``CLOSE_LINGER_MS``
        to leave."""
        if self._sock is not None:
            self._sock.close(CLOSE_LINGER_MS)
            self._sock = None
        if self._context is not None:
            self._context.term()
            self._context = None
