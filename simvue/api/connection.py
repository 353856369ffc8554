"""One HTTP connection to a Simvue server, and what its failures mean.

Failures fall in two kinds, and everything that talks to a server treats them alike:

* ``ServerUnavailable``: connection errors, timeouts, 5xx and 429.  Worth retrying later;
  ``retry_after`` carries the server's ``Retry-After`` when it sent one.
* ``ServerRejected``: any other 4xx.  Retrying the same request cannot help; the message
  names the request and what the server said about it.

``Backoff`` spaces retries: capped exponential delays with jitter, never shorter than the
server's ``Retry-After``.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import requests

from .._version import __version__
from ..errors import SimvueError
from .config import ServerConfig

REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
SUPPORTED_MAJOR_VERSION = 1
T = TypeVar("T")


class ServerError(SimvueError):
    """Base of the errors a server interaction raises."""


class ServerUnavailable(ServerError):
    """The server could not be reached or asked us to come back later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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
        timeout = self.timeout
        if deadline is not None:
            left = round(deadline - time.monotonic(), 2)  # rounded: it is quoted in timeout messages
            if left <= 0:
                raise ServerUnavailable(f"{method} {self.base}{path}: not sent, the time allowed has passed")
            timeout = (min(timeout[0], left), min(timeout[1], left))
        try:
            response = self._session.request(
                method, self.base + path, json=json, data=data, params=params, headers=headers, timeout=timeout
            )
        except requests.RequestException as exc:
            raise ServerUnavailable(f"{method} {self.base}{path}: {_short(exc)}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise ServerUnavailable(
                f"{method} {path} answered {status}", retry_after=_retry_after(response.headers.get("Retry-After"))
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
        """The server's API version; raises ``ServerRejected`` for one this client cannot speak."""
        answer = self.request("GET", "/version", deadline=deadline) or {}
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
        return response.text[:300] or response.reason or "no detail"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return str(detail)[:500]


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
