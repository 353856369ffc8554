"""The list query language of the Simvue API: ``filters``, ``sorting`` and paging.

Clients send ``filters`` as a JSON list of strings, all of which must hold (the upstream
client also sends one filter as a plain string, or repeats the parameter)::

    name == demo             status != running        folder.path contains /project
    metadata.lr > 0.01       metadata.model exists    system.hostname == node1
    has tag.mpi              has not tag.draft        alert.status == critical
    created < 2d             event.message contains ERROR

``sorting`` is a JSON list of ``{"id": column, "desc": bool}``.  Each collection says which
fields exist through a function ``fields(record, name) -> list | None`` that returns the
record's values for a field (a list, because a run has many alerts and tags) or ``None`` for
a field the collection does not have, which is a 400 for the client rather than an empty page.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from ..validation import timestamp
from .bodies import loads_query

FieldValues = Callable[[Any, str], "list | None"]

_OPERATORS = ("not contains", "contains", "==", "!=", ">=", "<=", ">", "<")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([hdy])$")
_DURATION_S = {"h": 3600.0, "d": 86400.0, "y": 365.0 * 86400.0}
TIME_FIELDS = ("created", "started", "modified", "ended", "endtime")


class QueryError(ValueError):
    """A filter or sorting parameter the server cannot apply; the message is for the client."""


@dataclasses.dataclass(frozen=True)
class Condition:
    field: str
    operator: str  # one of _OPERATORS, "exists", "not exists", "has", "has not"
    value: str = ""


def parse_filters(texts: str | list[str] | None) -> list[Condition]:
    """The conditions of a ``filters`` parameter: given once or repeated, each time either a
    JSON list of filter strings or one filter as plain text (``filters=name == x``, which is
    how the upstream client sends a Python list)."""
    if not texts:
        return []
    conditions: list[Condition] = []
    for text in [texts] if isinstance(texts, str) else texts:
        if not text.lstrip().startswith("["):
            if text.strip():
                conditions.append(_parse_condition(text.strip()))
            continue
        try:
            items = loads_query(text)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise QueryError(f"filters must be a JSON list of strings, not {text[:200]!r}")
        conditions += [_parse_condition(item.strip()) for item in items if item.strip()]
    return conditions


def _parse_condition(text: str) -> Condition:
    if text == "starred":
        return Condition("starred", "exists")
    for prefix, operator in (("has not tag.", "has not"), ("has tag.", "has")):
        if text.startswith(prefix):
            return Condition("tag", operator, text[len(prefix):])
    field, _, rest = text.partition(" ")
    for operator in ("not exists", "exists"):
        if rest == operator:
            return Condition(field, operator)
    for operator in _OPERATORS:
        if rest.startswith(operator + " "):
            return Condition(field, operator, rest[len(operator) + 1:].strip())
    raise QueryError(f"cannot read filter {text!r}: expected '<field> <operator> <value>'")


def select(records: Sequence, conditions: list[Condition], fields: FieldValues, now: float | None = None) -> list:
    """The records meeting every condition."""
    now = time.time() if now is None else now
    tests = [_compile(condition, fields, now) for condition in conditions]
    return [record for record in records if all(test(record) for test in tests)]


def _compile(condition: Condition, fields: FieldValues, now: float) -> Callable[[Any], bool]:
    def values(record: Any) -> list:
        found = fields(record, condition.field)
        if found is None:
            raise QueryError(f"cannot filter on {condition.field!r}")
        return [value for value in found if value is not None]

    operator, wanted = condition.operator, condition.value
    if operator == "exists":
        return lambda record: bool(values(record))
    if operator == "not exists":
        return lambda record: not values(record)
    if operator in ("has", "has not"):
        return lambda record: (wanted in values(record)) == (operator == "has")
    if operator in ("contains", "not contains"):
        return lambda record: any(wanted in str(v) for v in values(record)) == (operator == "contains")
    if condition.field in TIME_FIELDS and (duration := _DURATION.match(wanted)):
        # "created < 5h" means "created within the last five hours"
        cutoff = now - float(duration.group(1)) * _DURATION_S[duration.group(2)]
        compare = _COMPARISONS[{"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(operator, operator)]
        return lambda record: any(compare(v, cutoff) for v in values(record))
    compare = _COMPARISONS[operator]
    if operator == "!=":
        return lambda record: all(compare(v, _coerce(wanted, v, condition.field)) for v in values(record))
    return lambda record: any(compare(v, _coerce(wanted, v, condition.field)) for v in values(record))


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">": lambda a, b: b is not None and a > b,
    "<": lambda a, b: b is not None and a < b,
    ">=": lambda a, b: b is not None and a >= b,
    "<=": lambda a, b: b is not None and a <= b,
}


def _coerce(text: str, like: Any, field: str) -> Any:
    """The filter's value as the type of the record's value, or None when it cannot be one."""
    if isinstance(like, bool):
        return {"true": True, "false": False}.get(text.lower())
    if isinstance(like, (int, float)):
        if field in TIME_FIELDS:
            try:
                return timestamp(text)
            except ValueError:
                pass
        try:
            return float(text)
        except ValueError:
            return None
    return text if isinstance(like, str) else None


@dataclasses.dataclass(frozen=True)
class SortKey:
    column: str
    descending: bool


def parse_sorting(text: str | None, columns: Callable[[str], bool]) -> list[SortKey]:
    if not text:
        return []
    try:
        items = loads_query(text)
        keys = [SortKey(str(item["id"]), bool(item.get("desc", True))) for item in items]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise QueryError(f'sorting must be a JSON list of {{"id": column, "desc": bool}}, not {text[:200]!r}') from None
    for key in keys:
        if not columns(key.column):
            raise QueryError(f"cannot sort on {key.column!r}")
    return keys


def order(records: list, keys: list[SortKey], fields: FieldValues) -> list:
    """``records`` sorted by ``keys`` (the first key most significant); missing values go last."""
    for key in reversed(keys):
        present = [r for r in records if fields(r, key.column)]
        missing = [r for r in records if not fields(r, key.column)]
        # ``present`` holds only records with values for the column, so ``fields`` gives a list.
        present.sort(key=lambda r: _sortable(cast(list, fields(r, key.column))[0]), reverse=key.descending)
        records = present + missing
    return records


def _sortable(value: Any) -> tuple:
    # numbers before strings before anything else, so that mixed metadata still sorts
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    if isinstance(value, str):
        return (1, 0, value)
    return (2, 0, json.dumps(value, sort_keys=True, default=str))


def page(records: list, start: int, count: int | None) -> list:
    """``count`` records from index ``start``; a ``count`` of 0 or None means all of them."""
    return records[start:start + count] if count else records[start:]


def dotted(mapping: Any, path: str) -> list:
    """``[value]`` at ``a.b.c`` in nested dictionaries, or ``[]`` if there is none."""
    for part in path.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return []
        mapping = mapping[part]
    return [mapping]
