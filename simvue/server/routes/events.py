"""Events: ``POST /api/events`` to write, ``GET /api/events?run=ID`` to read them in order."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import Header
from pydantic import BaseModel, ConfigDict

from ...store import StoreBatch
from ..query import QueryError, parse_filters, select
from . import DataHandle, Filters, IsoTime, Page, SafeJSONResponse, bad_request, checked_router, iso, require_run
from .ingest import RawBody, write_once

router = checked_router()


class Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    message: str
    log_level: Literal["debug", "info", "warning", "error", "critical"] | None = None
    timestamp: IsoTime | None = None


class EventsPost(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    run: str
    events: list[Event]


@router.post("/events")
def post_events(body: RawBody, handle: DataHandle, idempotency_key: Annotated[str | None, Header()] = None):
    request = body.parse(EventsPost)
    require_run(handle, request.run)
    now = time.time()
    events: list[tuple[float, str, str]] = [
        (now if e.timestamp is None else e.timestamp, e.message, e.log_level or "info") for e in request.events
    ]
    written = write_once(handle, request.run, idempotency_key, StoreBatch(events=events, heartbeat=now))
    return {"run": request.run, "stored": len(events) if written else 0, "replayed": not written}


def _event_fields(event: dict, name: str) -> list | None:
    field = name.removeprefix("event.")
    return [event[field]] if field in ("message", "log_level") else None


@router.get("/events")
def get_events(
    handle: DataHandle,
    paging: Page,
    run: str,
    filters: Filters = None,
):
    """The run's events in logging order; a ``count`` of 0 (as upstream sends) means all."""
    require_run(handle, run)
    events = [
        {"message": e["message"], "log_level": e["level"], "timestamp": iso(e["timestamp"])}
        for e in handle.store.events(run)
    ]
    try:
        events = select(events, parse_filters(filters), _event_fields)
    except QueryError as exc:
        raise bad_request(str(exc)) from None
    return SafeJSONResponse({"data": paging(events), "count": len(events)})  # may be long
