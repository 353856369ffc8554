"""One HTTP connection to a Simvue server, and what its failures mean.

Failures fall in two kinds, and everything that talks to a server treats them alike:

* ``ServerUnavailable``: connection errors, timeouts, 5xx and 429.  Worth retrying later;
  ``retry_after`` carries the server's ``Retry-After`` when it sent one, ``reason`` says in
  plain words what happened (``is not listening (connection refused)``), and ``refused`` tells a server that
  is not listening (yet) from one that is slow or failing.
* ``ServerRejected``: any other 4xx.  Retrying the same request cannot help; the message
  names the request and what the server said about it.

``Backoff`` spaces retries: capped exponential delays with jitter, never shorter than the
server's ``Retry-After``.
"""

from __future__ import annotations

import gzip
import ipaddress
import os
import random
import re
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgpack
import requests

from .._version import __version__
from ..errors import SimvueError
from .config import ServerConfig

REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
SUPPORTED_MAJOR_VERSION = 1
# The version of the columnar metrics format this client sends (see ``upload.Replicator``).
COLUMNS_VERSION = 1
COMPRESS_MIN_BYTES = 64 << 10
T = TypeVar("T")


class ServerError(SimvueError):
    """Base of the errors a server interaction raises."""


class ServerUnavailable(ServerError):
    """The server could not be reached or asked us to come back later."""

    def __init__(
        self, message: str, retry_after: float | None = None, *, reason: str | None = None, refused: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason or message  # what the server did, in words: "did not answer within 30 s"
        self.refused = refused  # nothing listens there (yet): a server that is starting looks like this


class ServerRejected(ServerError):
    """The server refused a request (4xx other than 429)."""

    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        super().__init__(f"the server rejected {method} {path} with {status}: {detail}")
        self.status = status
        self.detail = detail


class Connection:
    """Authenticated requests to one server.  Not thread-safe: one owner thread at a time."""

    def __init__(self, config: ServerConfig, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.config = config
        self.base = config.api_url
        self.timeout = (CONNECT_TIMEOUT_S, timeout_s)
        self._session = requests.Session()
        # Whether the server keeps the times a client gives for a run's creation and an alert's
        # firing (``simvue server`` says so when asked its version); others get their own.
        self.keeps_client_times = False
        # Whether the server takes a run's metrics as the store's packed columns
        # (``POST /api/runs/{id}/columns``, ``simvue server``); others get the Simvue format.
        self.columnar = False
        # Whether the server takes request bodies compressed with gzip (its /api/version says
        # so), and whether to send them so: None compresses those of at least
        # COMPRESS_MIN_BYTES to a server on another machine (on this one it costs more time
        # than it saves).
        self.gzip = False
        self.compress: bool | None = None
        self._session.headers.update(
            {
                "Authorization": f"Bearer {config.token}",
                "User-Agent": f"simvue/{__version__} (Simvue Python client compatible)",
                # Lets a server (and our tests) see which process of a job is talking to it.
                "X-Simvue-Client": f"{socket.gethostname()}:{os.getpid()}",
            }
        )

    def close(self) -> None:
        self._session.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        packed: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        conflict_ok: bool = False,
        deadline: float | None = None,
    ) -> Any:
        """Send one request and return its decoded JSON body (None when empty).

        ``packed`` sends a msgpack body.  With ``conflict_ok`` a 409 answer counts as success
        (creations of things that already exist, which the server answers with their id).
        With ``deadline`` (``time.monotonic()``), waiting to connect and for each part of the
        answer stops then at the latest, as ``ServerUnavailable``.
        """
        headers = dict(headers or {})
        data = None
        if packed is not None:
            data = msgpack.packb(packed, use_bin_type=True)
            headers["Content-Type"] = "application/msgpack"
            if len(data) >= COMPRESS_MIN_BYTES and self.gzip and (
                self.compress if self.compress is not None else not is_local(self.base)
            ):
                data = gzip.compress(data, compresslevel=1)
                headers["Content-Encoding"] = "gzip"
        timeout = self.timeout
        if deadline is not None:
            left = round(deadline - time.monotonic(), 2)  # rounded: it is quoted in timeout messages
            if left <= 0:
                reason = "was not asked: the time allowed had passed"
                raise ServerUnavailable(f"{method} {self.base}{path}: {reason}", reason=reason)
            timeout = (min(timeout[0], left), min(timeout[1], left))
        try:
            response = self._session.request(
                method, self.base + path, json=json, data=data, params=params, headers=headers, timeout=timeout
            )
        except requests.RequestException as exc:
            reason = describe_failure(exc, timeout)
            raise ServerUnavailable(
                f"{method} {self.base}{path}: {reason}", reason=reason, refused=_refused(exc)
            ) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise ServerUnavailable(
                f"{method} {path} answered {status}", retry_after=_retry_after(response.headers.get("Retry-After")),
                reason=f"answered {status}",
            )
        if status >= 400 and not (status == 409 and conflict_ok):
            raise ServerRejected(method, path, status, _detail(response))
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return None

    def check_version(self, deadline: float | None = None) -> str:
        """The server's API version; raises ``ServerRejected`` for one this client cannot speak.
        Also notes whether the server keeps the times clients give (``keeps_client_times``)."""
        answer = self.request("GET", "/version", deadline=deadline) or {}
        if not isinstance(answer, dict):
            answer = {}
        self.keeps_client_times = answer.get("keeps_client_times") is True
        self.columnar = answer.get("columns") == COLUMNS_VERSION
        self.gzip = "gzip" in (answer.get("content_encodings") or ())
        version = str(answer.get("version", ""))
        major = version.split(".", 1)[0]
        if not major.isdigit() or int(major) != SUPPORTED_MAJOR_VERSION:
            raise ServerRejected("GET", "/version", 200, f"server API version {version!r} is not 1.x")
        return version


class Backoff:
    """Delays between retries: ``base_s * 2**n`` capped at ``cap_s``, with equal jitter."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempts = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * (2**self.attempts))
        self.attempts += 1
        delay = ceiling / 2 + random.random() * ceiling / 2
        return max(delay, min(retry_after or 0.0, 10 * self.cap_s))

    def reset(self) -> None:
        self.attempts = 0


def retrying(call: Callable[[], T], deadline: float, backoff: Backoff | None = None) -> T:
    """``call()`` until it does not raise ``ServerUnavailable`` or ``deadline`` (monotonic) passes."""
    backoff = backoff or Backoff()
    while True:
        try:
            return call()
        except ServerUnavailable as exc:
            delay = backoff.next_delay(exc.retry_after)
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; rare enough to fall back to our own backoff


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return clip(response.text or response.reason or "no detail", 300)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return clip(str(detail), 500)


def clip(text: str, limit: int) -> str:
    """``text`` on one line, at most about ``limit`` characters, cut between words (a message
    cut mid-word reads like a fault of its own)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + " [...]"


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"()\[\]]+)")


def describe_failure(exc: requests.RequestException, timeout: tuple[float, float] | None = None) -> str:
    """What a failed request tells about the server, in a few plain words, whole: not the
    exception's text, which names connection pools and object addresses and runs to hundreds
    of characters."""
    connect_s, read_s = timeout or (None, None)
    if isinstance(exc, requests.ConnectTimeout):
        return f"did not accept a connection within {round(connect_s, 1):g} s" if connect_s else "did not accept a connection"
    if isinstance(exc, requests.Timeout):
        return f"did not answer within {round(read_s, 1):g} s" if read_s else "did not answer in time"
    if isinstance(exc, requests.exceptions.SSLError):
        return "failed the TLS handshake (check its certificate)"
    text = str(exc)
    if _refused(exc):
        return "is not listening (connection refused)"
    if "NameResolutionError" in text or "Failed to resolve" in text:
        return "could not be found (its host name does not resolve)"
    if "RemoteDisconnected" in text or "Connection aborted" in text or "ConnectionResetError" in text:
        return "closed the connection without answering"
    if isinstance(exc, requests.ConnectionError) and (match := _ERRNO.search(text)):
        return f"could not be reached ({match.group(1).strip().rstrip('.').lower()})"
    return f"could not be reached ({type(exc).__name__})"


def _refused(exc: requests.RequestException) -> bool:
    return isinstance(exc, requests.ConnectionError) and "Connection refused" in str(exc)


def is_local(url: str | None) -> bool:
    """Whether ``url`` names this machine (localhost or a loopback address)."""
    host = urlsplit(url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
