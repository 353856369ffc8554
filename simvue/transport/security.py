"""Encryption of the traffic between a run's processes when it may cross a network.

Every message is authenticated with the run's key (HMAC, ``protocol``).  When the aggregator
listens on an address other nodes can reach, the traffic is also encrypted with ZeroMQ's
CURVE (Curve25519, libsodium's or libzmq's own): the aggregator's key pair is derived from
the run's secret key, so every process that holds the key (and only those) knows the
server's public key; each sender makes a fresh key pair of its own.  On one node (loopback)
nothing leaves the machine and CURVE is not used.  Without CURVE in libzmq, traffic is
authenticated but not encrypted.
"""

from __future__ import annotations

import hashlib
import ipaddress

import zmq
from zmq.utils import z85

_LOCAL_NAMES = ("localhost", "localhost.localdomain")


def encrypted(address: str) -> bool:
    """Whether the traffic to ``address`` (``tcp://host:port``) is encrypted: it may leave the
    node (any host that is not a loopback address) and libzmq has CURVE."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp" or not zmq.has("curve"):
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if host in _LOCAL_NAMES:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name, or "*": other nodes may reach it


def _server_keys(key: bytes) -> tuple[bytes, bytes]:
    """The aggregator's CURVE key pair (public, secret), z85, derived from the run's key."""
    secret = z85.encode(hashlib.sha256(b"simvue curve server key\0" + key).digest())
    return zmq.curve_public(secret), secret


def serve(sock: zmq.Socket, key: bytes) -> None:
    """Make ``sock`` (before it binds) a CURVE server with the run's key pair."""
    _, secret = _server_keys(key)
    sock.curve_server = True
    sock.curve_secretkey = secret


def connect(sock: zmq.Socket, key: bytes) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the run's aggregator."""
    public, _ = _server_keys(key)
    client_public, client_secret = zmq.curve_keypair()
    sock.curve_serverkey = public
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret
