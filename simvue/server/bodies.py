"""Decoding what clients send: only values that every later read can answer with get in.

Python's ``json`` reads ``NaN``, ``Infinity``, integers of any size and lone UTF-16 surrogates
(``"\\ud800"``), and msgpack carries NaN, 64-bit unsigned integers, binary and extension
values.  Stored, such a value breaks every later answer that includes it: a JSON answer cannot
hold NaN or a lone surrogate, and SQLite cannot hold an integer past 64 bits.  So every body
(JSON or msgpack) and every JSON query parameter is decoded here, once, and checked whole
before any route sees it:

* numbers: finite floats, integers that fit in 64 bits signed (what SQLite stores);
* strings and keys: text that can be encoded as UTF-8 (no lone surrogates);
* containers: objects with string keys and arrays, nested at most ``MAX_NESTING`` deep;
* nothing else (no msgpack binary or extension values).

A value that breaks these is a 422 whose ``detail`` names where it was (FastAPI's shape,
``[{"loc": ["body", ...], "msg", "type"}]``); a body that cannot be decoded, or that nests
deeper than ``MAX_NESTING``, is a 400.  The routes' pydantic models then check types and
ranges as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

MAX_NESTING = 64  # levels of objects and arrays; real clients send fewer than ten
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1

# Where a pattern has ``ANY``, any key or index matches.
ANY = None
Pattern = tuple[str | int | None, ...]


class RejectedValue(ValueError):
    """A decoded value that must not be stored; ``path`` says where it is."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.path: list[str | int] = []


class TooDeep(ValueError):
    """The value nests deeper than ``MAX_NESTING``."""


def _too_deep_message() -> str:
    return f"request body is nested more than {MAX_NESTING} levels deep"


def check(value: Any, non_finite_ok: Pattern | None = None) -> None:
    """Raise ``RejectedValue`` (or ``TooDeep``) unless ``value`` holds only what can be stored
    and answered (see the module's docstring).  Non-finite floats are let through at the
    places ``non_finite_ok`` matches (``("metrics", ANY, "values", ANY)``), and only there."""
    _check(value, 0, non_finite_ok)


def _check(value: Any, depth: int, allow: Pattern | None) -> None:
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_text(value)
    elif kind is float:
        if not (math.isfinite(value) or allow == ()):
            raise RejectedValue(f"{value!r} is not allowed: numbers must be finite", "finite_number")
    elif kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise RejectedValue(f"{value} does not fit in a 64-bit signed integer", "int_64")
    elif kind is dict or kind is list:
        if depth >= MAX_NESTING:
            raise TooDeep(_too_deep_message())
        items = value.items() if kind is dict else enumerate(value)
        for key, item in items:
            if kind is dict:
                if type(key) is not str:
                    raise RejectedValue(f"the key {key!r} is not a string", "key_type")
                if not key.isascii():
                    _check_text(key)
            # Most items are plain leaves: passed here without a call (a metrics batch holds
            # hundreds of thousands).  ``x - x == 0.0`` is false for NaN and +-Infinity only.
            leaf = type(item)
            if (
                (leaf is float and item - item == 0.0) or (leaf is str and item.isascii())
                or (leaf is int and INT_MIN <= item <= INT_MAX) or item is None or leaf is bool
            ):
                continue
            child = None if not allow or (allow[0] is not ANY and allow[0] != key) else allow[1:]
            try:
                _check(item, depth + 1, child)
            except RejectedValue as exc:
                exc.path.insert(0, key)
                raise
    elif not (value is None or kind is bool):
        raise RejectedValue(f"a {kind.__name__} value is not allowed: only JSON values are", "json_type")


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RejectedValue(
            f"{text[:50]!r} holds a lone surrogate (a UTF-16 half character), which is not text", "string_unicode"
        ) from None


def _rejection(exc: RejectedValue | TooDeep, location: tuple[str | int, ...]) -> HTTPException:
    if isinstance(exc, TooDeep):
        return HTTPException(status_code=400, detail=str(exc))
    # A key in the path may itself be the lone surrogate: written escaped, so the answer can hold it.
    path = [part.encode("utf-8", "backslashreplace").decode() if isinstance(part, str) else part for part in exc.path]
    detail = [{"loc": [*location, *path], "msg": str(exc), "type": exc.kind}]
    return HTTPException(status_code=422, detail=detail)


def decode_json(content: bytes, non_finite_ok: Pattern | None = None) -> Any:
    """A JSON request body, checked; 400 if it is not JSON or nests too deep, 422 for a value
    that cannot be stored."""
    try:
        value = json.loads(content)
    except RecursionError:  # the decoder nests on the stack: far deeper than MAX_NESTING
        raise HTTPException(status_code=400, detail=_too_deep_message()) from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of more than 4300 digits
        raise HTTPException(status_code=400, detail=f"request body is not valid JSON: {exc}") from None
    try:
        check(value, non_finite_ok)
    except (RejectedValue, TooDeep) as exc:
        raise _rejection(exc, ("body",)) from None
    return value


def decode_msgpack(content: bytes, non_finite_ok: Pattern | None = None) -> Any:
    """A msgpack request body, checked like ``decode_json``."""
    try:
        value = msgpack.unpackb(content, raw=False, strict_map_key=True)
    except msgpack.StackError:
        raise HTTPException(status_code=400, detail=_too_deep_message()) from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for bad input
        raise HTTPException(status_code=400, detail=f"request body is not valid msgpack: {exc}") from None
    try:
        check(value, non_finite_ok)
    except (RejectedValue, TooDeep) as exc:
        raise _rejection(exc, ("body",)) from None
    return value


class QueryJSONError(ValueError):
    """A JSON query parameter that cannot be decoded or holds a value that is not allowed."""


def loads_query(text: str) -> Any:
    """A JSON query parameter (``filters``, ``sorting``, ``runs``...), checked like a body;
    ``QueryJSONError`` (a ``ValueError``) if it cannot be used."""
    try:
        value = json.loads(text)
        check(value)
    except RecursionError:
        raise QueryJSONError(f"it is nested more than {MAX_NESTING} levels deep") from None
    except (RejectedValue, TooDeep) as exc:
        raise QueryJSONError(str(exc)) from None
    except ValueError as exc:
        raise QueryJSONError(f"it is not JSON: {exc}") from None
    return value


class CheckedRequest(Request):
    """A request whose JSON body is decoded by ``decode_json``: what FastAPI validates the
    routes' body models against."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = decode_json(await self.body())
        return self._json


class CheckedRoute(APIRoute):
    """The route class of every router: its handlers see bodies decoded by ``decode_json``.

    FastAPI passes an ``HTTPException`` raised while reading the body through unchanged."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(CheckedRequest(request.scope, request.receive))

        return checked
