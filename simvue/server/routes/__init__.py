"""The HTTP routes, one module per collection, and what they share.

Handlers are plain (``def``) functions, so FastAPI runs them on its thread pool, each with a
database :class:`~simvue.server.db.Handle` of its own for the length of the request.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import AfterValidator, StringConstraints

from ... import validation
from ...store import RunNotFound
from ..db import Handle
from ..query import page

T = TypeVar("T")


def _checkout(request: Request) -> Iterator[Handle]:
    with request.app.state.data.checkout() as handle:
        yield handle


# A handler parameter of this type receives a database handle for the length of the request.
DataHandle = Annotated[Handle, Depends(_checkout)]


class Paging:
    """The ``start`` (or ``offset``) and ``count`` query parameters of every list endpoint."""

    def __init__(
        self,
        start: int = Query(0, ge=0),
        offset: int | None = Query(None, ge=0),
        count: int | None = Query(None, ge=0),
    ) -> None:
        self.start = offset or start  # Simvue clients send either name
        self.count = count

    def __call__(self, records: list[T]) -> list[T]:
        """The requested page of ``records``; a ``count`` of 0 or none means all of them."""
        return page(records, self.start, self.count)


Page = Annotated[Paging, Depends()]


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


iso = validation.optional_timestamp  # timestamps in answers: UTC ISO, or null when unset


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
if TYPE_CHECKING:  # what the routes read: the validator has made the string a number
    IsoTime = float
else:
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
