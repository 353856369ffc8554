"""The middleware every request passes first: counting, injected faults, the body limit and
compressed bodies.

It is plain ASGI rather than a FastAPI decorator so that it can answer 413 from the
``Content-Length`` header alone, and stop a body sent without one as soon as it passes the
limit, instead of reading it all into memory first.  Artifact uploads (``/upload/...``) are
exempt: they stream to disk and never sit in memory.

A body sent with ``Content-Encoding: gzip`` is inflated here, and the limit holds for what it
inflates to as well: a small body that would inflate past it (a "zip bomb") is a 413, found
without inflating more than the limit.  Any other encoding is a 415.
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..validation import format_timestamp
from .faults import RETRY_AFTER_STATUSES, FaultSet

CLIENT_HEADER = b"x-simvue-client"
STREAMED_PREFIXES = ("/upload/",)
# What ``Content-Encoding`` a request body may have (``/api/version`` lists them).
CONTENT_ENCODINGS = ("gzip",)


class RequestStats:
    """Requests per route and the distinct ``X-Simvue-Client`` values seen since start."""

    def __init__(self) -> None:
        self.started = time.time()
        self._requests: Counter[str] = Counter()
        self._clients: set[str] = set()
        self._lock = threading.Lock()

    def record(self, route: str, client: str | None) -> None:
        with self._lock:
            self._requests[route] += 1
            if client:
                self._clients.add(client)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": dict(sorted(self._requests.items())),
                "clients": sorted(self._clients),
                "started": format_timestamp(self.started),
            }


RouteTemplates = Sequence[tuple[re.Pattern, str]]


def route_template(templates: RouteTemplates, path: str) -> str:
    """``/api/runs/{run_id}`` for a request to ``/api/runs/abc``: what stats count by."""
    for pattern, template in templates:
        if pattern.match(path):
            return template
    return "(no route)"


class RequestGuard:
    def __init__(
        self, app: ASGIApp, *, routes: RouteTemplates, stats: RequestStats, faults: FaultSet, max_body_bytes: int
    ) -> None:
        self.app = app
        self.routes = routes
        self.stats = stats
        self.faults = faults
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])
        client = headers.get(CLIENT_HEADER)
        self.stats.record(f"{method} {route_template(self.routes, path)}", client.decode("latin-1") if client else None)

        fault = self.faults.take(method, path)
        if fault is not None:
            extra = {"Retry-After": str(fault.retry_after_s)} if fault.status in RETRY_AFTER_STATUSES else {}
            answer = JSONResponse({"detail": f"injected fault ({fault.spec})"}, status_code=fault.status, headers=extra)
            await answer(scope, receive, send)
            return

        if not path.startswith(STREAMED_PREFIXES):
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await JSONResponse({"detail": self._too_large_detail()}, status_code=413)(scope, receive, send)
                return
            receive = self._limited(receive)
            encoding = headers.get(b"content-encoding", b"identity").strip().lower()
            if encoding not in (b"", b"identity"):
                inflated = await self._inflated(encoding, receive)
                if isinstance(inflated, JSONResponse):
                    await inflated(scope, receive, send)
                    return
                scope = {**scope, "headers": [
                    (name, value) for name, value in scope["headers"] if name not in (b"content-encoding", b"content-length")
                ] + [(b"content-length", str(len(inflated)).encode())]}
                receive = self._replay(inflated, receive)
        await self.app(scope, receive, send)

    async def _inflated(self, encoding: bytes, receive: Receive) -> bytes | JSONResponse:
        """The whole body, inflated; or the answer to give instead (415, 413, 400)."""
        if encoding.decode("latin-1") not in CONTENT_ENCODINGS:
            return JSONResponse({"detail": f"Content-Encoding {encoding.decode('latin-1')!r} is not accepted; send"
                                           f" {' or '.join(CONTENT_ENCODINGS)}, or no encoding"}, status_code=415)
        parts = []
        try:
            while True:
                message = await receive()
                parts.append(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except HTTPException as exc:  # the compressed body alone passed the limit
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
        try:
            body = inflater.decompress(b"".join(parts), self.max_body_bytes + 1)
        except zlib.error as exc:
            return JSONResponse({"detail": f"the gzip body does not inflate: {exc}"}, status_code=400)
        if len(body) > self.max_body_bytes:
            return JSONResponse({"detail": self._too_large_detail() + " once inflated"}, status_code=413)
        if not inflater.eof or inflater.unused_data:
            return JSONResponse({"detail": "the gzip body is cut short, or has something after its end"}, status_code=400)
        return body

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        """``receive`` that gives ``body`` as the request's whole body, then what follows."""
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _too_large_detail(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes / (1 << 20):g} MiB"

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that fails with 413 once a body sent without Content-Length passes the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(status_code=413, detail=self._too_large_detail())
            return message

        return limited
