"""What the two ingest routes (``POST /api/metrics`` and ``POST /api/events``) share.

Their bodies are msgpack (``Content-Type: application/msgpack``, as Simvue clients send them)
or JSON, decoded and checked by ``bodies`` like every other body.  A request carrying
``Idempotency-Key`` is applied at most once per run: the key is remembered in the store's
``applied_keys`` and a repeat is answered 200 without writing again, so a client may resend a
batch whose answer it never received.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, TypeVar

import msgpack
import pydantic
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from ...store import StoreBatch
from ..bodies import Pattern, decode_json, decode_msgpack
from ..db import Handle

Model = TypeVar("Model", bound=pydantic.BaseModel)

@dataclasses.dataclass(frozen=True)
class Body:
    """A request body as received; decoded on the handler's thread, not the event loop."""

    content: bytes
    content_type: str

    def parse(self, model: type[Model], non_finite_ok: Pattern | None = None) -> Model:
        """The body as ``model``: 400 if it is not msgpack/JSON, 422 if a value cannot be
        stored (``bodies.check``; non-finite numbers pass where ``non_finite_ok`` matches)
        or a field is wrong."""
        try:
            return model.model_validate(self._decode(non_finite_ok))
        except pydantic.ValidationError as exc:  # reported as FastAPI reports its own body errors
            errors = [error | {"loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    def decoded_unchecked(self) -> Any:
        """The body decoded without ``bodies.check`` (None if it does not decode): for a fast
        path that checks every value it uses itself, and leaves anything unexpected to
        ``parse``."""
        try:
            if "msgpack" in self.content_type:
                return msgpack.unpackb(self.content, raw=False, strict_map_key=True)
            return json.loads(self.content)
        except Exception:  # noqa: BLE001 - parse() says what is wrong
            return None

    def _decode(self, non_finite_ok: Pattern | None) -> Any:
        if "msgpack" in self.content_type:
            return decode_msgpack(self.content, non_finite_ok)
        return decode_json(self.content, non_finite_ok)


async def _read_body(request: Request) -> Body:
    return Body(await request.body(), request.headers.get("content-type", ""))


RawBody = Annotated[Body, Depends(_read_body)]


def write_once(handle: Handle, run_id: str, key: str | None, batch: StoreBatch) -> bool:
    """Write ``batch`` unless request ``key`` was already applied to this run; whether it wrote.
    The key is recorded in the same transaction as the data."""
    return handle.store.write(run_id, batch, once_key=key)
