"""The middleware every request passes first: counting, injected faults and the body limit.

It is plain ASGI rather than a FastAPI decorator so that it can answer 413 from the
``Content-Length`` header alone, and stop a body sent without one as soon as it passes the
limit, instead of reading it all into memory first.  Artifact uploads (``/upload/...``) are
exempt: they stream to disk and never sit in memory.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..validation import format_timestamp
from .faults import RETRY_AFTER_STATUSES, FaultSet

CLIENT_HEADER = b"x-simvue-client"
STREAMED_PREFIXES = ("/upload/",)


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
        await self.app(scope, receive, send)

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
