"""The API version (what clients check at start-up) and the server's request statistics."""

from __future__ import annotations

from fastapi import Request

from ..guard import CONTENT_ENCODINGS
from . import checked_router

router = checked_router()

# The upstream client 2.6.2 requires 1.1.0 <= version < 2.0.0, and >= 1.2.16 for event log levels.
API_VERSION = "1.3.0"
NOSIM_VERSION = "1.0.0"


@router.get("/version")
async def version():
    # keeps_client_times: a run's "created" and an alert's "fired_at" given by a client are kept,
    # so that simvue's uploader sends them (other servers get their own times).
    # "columns": the version of POST /api/runs/{id}/columns this server takes (routes/metrics.py);
    # "content_encodings": what a request body may be compressed with (guard.py)
    return {"version": API_VERSION, "keeps_client_times": True, "columns": 1,
            "content_encodings": list(CONTENT_ENCODINGS)}


@router.get("/nosim/version")
async def nosim_version():
    # Answered so that the upstream sender caches a valid version instead of "None".
    return {"version": NOSIM_VERSION}


@router.get("/server/stats")
async def stats(request: Request):
    """Requests per ``METHOD /route``, distinct ``X-Simvue-Client`` values, and the start time."""
    return request.app.state.stats.snapshot()
