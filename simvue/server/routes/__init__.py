"""The HTTP routes, one module per collection, and what they share.

Handlers are plain (``def``) functions, so FastAPI runs them on its thread pool, each with a
database :class:`~simvue.server.db.Handle` of its own for the length of the request.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, StringConstraints

from ... import validation
from ...store import RunNotFound
from ..bodies import CheckedRoute, loads_query
from ..db import Handle
from ..query import page

T = TypeVar("T")


def checked_router() -> APIRouter:
    """A router whose routes read bodies through ``bodies.decode_json`` (every route module's)."""
    return APIRouter(route_class=CheckedRoute)


class SafeJSONResponse(JSONResponse):
    """A JSON answer that can always be written.

    The server refuses non-finite numbers and lone surrogates on the way in, but a data
    directory written by an older server (or a non-finite metric value, which is stored as
    sent) can still hold them.  Rather than fail the whole answer, those become ``null`` and
    U+FFFD.  The usual answer takes the ordinary path; only one that fails is walked.
    """

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (ValueError, UnicodeEncodeError):  # NaN or Infinity; a lone surrogate
            return super().render(_answerable(content))


def _answerable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        # Lone surrogates become U+FFFD; a pair written as two code points becomes its character.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_answerable(key): _answerable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_answerable(item) for item in value]
    return value


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

# The ``filters`` parameter of list endpoints, which the upstream client may repeat.
Filters = Annotated[list[str] | None, Query()]


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


# The instants an answer can write: 0001-01-01T00:00:00 to 9999-12-31T23:59:59 UTC.  A time
# with an offset can fall outside them (0001-01-01T00:00:00+14:00 is in year 0).
EARLIEST_S = dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc).timestamp()
LATEST_S = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()


def iso(seconds: float | None) -> str | None:
    """A timestamp in an answer: UTC ISO, or null when unset (or when a value stored by an
    older server cannot be written as a date)."""
    try:
        return validation.optional_timestamp(seconds)
    except (ValueError, OverflowError, OSError):
        return None


def epoch_seconds(text: str) -> float:
    """Seconds since the epoch for a UTC ISO timestamp between years 1 and 9999.

    ``datetime.fromisoformat`` reads the common form about thirty times faster than
    ``validation.timestamp`` (which uses ``strptime``), and a metrics batch holds up to 16,000
    timestamps; anything it cannot read goes to ``validation.timestamp`` for its error message.
    """
    try:
        moment = dt.datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        return validation.timestamp(text)
    seconds = (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()
    if not EARLIEST_S <= seconds <= LATEST_S:
        raise ValueError(f"timestamp {text!r} is not between years 1 and 9999 in UTC")
    return seconds


# Request-body field types shared by the route modules; a value they reject is a 422.
FolderPath = Annotated[str, AfterValidator(validation.folder)]
if TYPE_CHECKING:  # what the routes read: the validator has made the string a number
    IsoTime = float
else:
    IsoTime = Annotated[str, AfterValidator(epoch_seconds)]  # becomes seconds since the epoch
Metadata = Annotated[dict[str, Any], AfterValidator(validation.metadata)]  # finite JSON only
Tag = Annotated[str, StringConstraints(min_length=1)]


def json_list(text: str | None, parameter: str) -> list[str]:
    """A query parameter holding a JSON list of strings (``runs=["id1","id2"]``), or a 400."""
    if text is None:
        return []
    try:
        items = loads_query(text)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise HTTPException(status_code=400, detail=f"{parameter} must be a JSON list of strings, not {text[:200]!r}")
    return items


async def with_handle(request: Request, work: Callable[..., T], *args: Any) -> T:
    """``work(handle, *args)`` on the thread pool, for ``async`` handlers that stream bodies."""

    def call() -> T:
        with request.app.state.data.checkout() as handle:
            return work(handle, *args)

    return await run_in_threadpool(call)
