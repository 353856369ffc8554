"""The HTTP routes, one module per collection, and what they share.

Handlers are plain (``def``) functions, so FastAPI runs them on its thread pool, each with a
database :class:`~simvue.server.db.Handle` of its own for the length of the request.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import AfterValidator, StringConstraints

from ... import validation
from ...store import RunNotFound
from ..db import Handle

T = TypeVar("T")


def _checkout(request: Request) -> Iterator[Handle]:
    with request.app.state.data.checkout() as handle:
        yield handle


# A handler parameter of this type receives a database handle for the length of the request.
DataHandle = Annotated[Handle, Depends(_checkout)]


def not_found(kind: str, identifier: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no {kind} with id {identifier!r}")


def bad_request(detail: str) -> HTTPException:
    return HTTPException(status_code=400, detail=detail)


def require_run(handle: Handle, run_id: str) -> dict:
    """The store's view of run ``run_id`` (looked up by id only), or a 404."""
    try:
        run = handle.store.run(run_id)
    except RunNotFound:
        raise not_found("run", run_id) from None
    if run["id"] != run_id:  # the store also finds runs by name; the API does not
        raise not_found("run", run_id)
    return run


def iso(seconds: float | None) -> str | None:
    return None if seconds is None else validation.format_timestamp(seconds)


def _epoch_seconds(text: str) -> float:
    """Seconds since the epoch for a UTC ISO timestamp.

    ``datetime.fromisoformat`` reads the common form about thirty times faster than
    ``validation.timestamp`` (which uses ``strptime``), and a metrics batch holds up to 16,000
    timestamps; anything it cannot read goes to ``validation.timestamp`` for its error message.
    """
    try:
        moment = dt.datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        return validation.timestamp(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()


# Request-body field types shared by the route modules; a value they reject is a 422.
FolderPath = Annotated[str, AfterValidator(validation.folder)]
IsoTime = Annotated[str, AfterValidator(_epoch_seconds)]  # becomes seconds since the epoch
Metadata = Annotated[dict[str, Any], AfterValidator(validation.metadata)]  # finite JSON only
Tag = Annotated[str, StringConstraints(min_length=1)]


def json_list(text: str | None, parameter: str) -> list[str]:
    """A query parameter holding a JSON list of strings (``runs=["id1","id2"]``), or a 400."""
    if text is None:
        return []
    try:
        items = json.loads(text)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise HTTPException(status_code=400, detail=f"{parameter} must be a JSON list of strings, not {text!r}")
    return items


async def with_handle(request: Request, work: Callable[..., T], *args: Any) -> T:
    """``work(handle, *args)`` on the thread pool, for ``async`` handlers that stream bodies."""

    def call() -> T:
        with request.app.state.data.checkout() as handle:
            return work(handle, *args)

    return await run_in_threadpool(call)
