"""Checks on user input, shared by every public entry point.

Each check returns the cleaned value or raises a ``SimvueValueError``/``SimvueTypeError`` whose
message names the offending argument; callers route the exception through ``ErrorPolicy``.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import math
import numbers
import re
import sys
import unicodedata
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import SimvueTypeError, SimvueValueError

# The metric-name alphabet the Simvue server accepts.
METRIC_NAME = re.compile(r"^[a-zA-Z0-9\-_\s/.:=><+()%]+$")
FOLDER = re.compile(r"^/([a-zA-Z0-9\-_.:+=()% ]+(/[a-zA-Z0-9\-_.:+=()% ]+)*)?/?$")
MAX_NAME_LENGTH = 256
MAX_EVENT_LENGTH = 1 << 20
MAX_METADATA_DEPTH = 64  # levels of nested dicts and lists
MAX_METADATA_BYTES = 16 << 20  # as JSON; one update_metadata call
# What every stage can carry: msgpack on the wire, int64 columns in the store, the server.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Array metrics (on grids): what the Simvue server takes.
MAX_GRID_AXES = 2
MAX_TENSOR_VALUES = 50_000

RUN_STATUSES = ("created", "running", "completed", "failed", "terminated", "lost")
FINAL_STATUSES = ("completed", "failed", "terminated", "lost")
EVENT_LEVELS = ("debug", "info", "warning", "error", "critical")


def metric_name(name: Any) -> str:
    if not isinstance(name, str):
        raise SimvueTypeError(f"metric name {name!r} is a {type(name).__name__}, not a str")
    if not name or len(name) > MAX_NAME_LENGTH or not METRIC_NAME.match(name):
        raise SimvueValueError(
            f"invalid metric name {name!r}: use 1-{MAX_NAME_LENGTH} letters, digits, spaces "
            "and - _ / . : = > < + ( ) %"
        )
    return name


def metric_value(name: str, value: Any) -> float | int:
    if value.__class__ is float:
        pass
    elif value.__class__ is int:
        if not INT64_MIN <= value <= INT64_MAX:  # stored as a float64 anyway: say so once here
            value = _float(name, value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SimvueTypeError(
            f"metric {name!r} has a {type(value).__name__} value {value!r}; metrics must be int or float"
        )
    else:  # numpy scalars, fractions, ...: store a plain float
        value = _float(name, value)
    if not math.isfinite(value):
        raise SimvueValueError(f"metric {name!r} is {value!r}; metric values must be finite")
    return value


def _float(name: str, value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        raise SimvueValueError(f"metric {name!r} is too large for a float64: {str(value)[:40]}...") from None


def is_array(value: Any) -> bool:
    """Whether a ``log_metrics`` value is an array (a metric on a grid): a list, a tuple or
    anything numpy can read as one (``ndarray``, a CPU tensor), not a number."""
    return isinstance(value, (list, tuple)) or (
        not isinstance(value, numbers.Number) and (hasattr(value, "__array__") or hasattr(value, "__array_interface__"))
    )


def split_metrics(values: Any) -> tuple[dict[str, float | int], dict[str, tuple[tuple[int, ...], bytes]]]:
    """A validated copy of a ``log_metrics`` dictionary, as ``(numbers, arrays)``; each
    array as ``(shape, little-endian float64 bytes)`` (see ``tensor``)."""
    if not isinstance(values, Mapping):
        raise SimvueTypeError(f"metrics must be a dict of name -> number, not {type(values).__name__}")
    if not values:
        raise SimvueValueError("metrics dict is empty")
    scalars: dict[str, float | int] = {}
    arrays: dict[str, tuple[tuple[int, ...], bytes]] = {}
    for key, value in values.items():
        name = metric_name(key)
        if is_array(value):
            shaped = tensor(name, value)
            if shaped[0]:
                arrays[name] = shaped
            else:  # a 0-d array is a number
                scalars[name] = float(value)
        else:
            scalars[name] = metric_value(name, value)
    return scalars, arrays


def tensor(name: str, value: Any) -> tuple[tuple[int, ...], bytes]:
    """``(shape, data)`` of an array metric value: at most ``MAX_GRID_AXES`` axes and
    ``MAX_TENSOR_VALUES`` finite numbers, as little-endian float64 bytes in C order."""
    try:
        import numpy
    except ImportError:  # nested lists still work
        shape, flat = _nested(name, value)
        values = array("d", flat)
        if sys.byteorder != "little":
            values.byteswap()
        data = values.tobytes()
    else:
        try:
            found = numpy.asarray(value)
        except Exception as exc:  # noqa: BLE001 - whatever the object raises
            raise SimvueValueError(f"metric {name!r} is not an array of numbers: {exc}") from None
        if found.dtype.kind not in "iuf":
            raise SimvueTypeError(
                f"metric {name!r} is an array of {found.dtype}; an array metric holds ints or floats"
                + (" (and its rows must be of equal length)" if found.dtype.kind == "O" else "")
            )
        shape = tuple(int(n) for n in found.shape)
        _check_shape(name, shape)
        with numpy.errstate(over="ignore"):
            as_float = numpy.ascontiguousarray(found, dtype="<f8")
        if not numpy.isfinite(as_float).all():
            raise SimvueValueError(f"metric {name!r} holds inf or nan; metric values must be finite")
        data = as_float.tobytes()
    return shape, data


def _check_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) > MAX_GRID_AXES:
        raise SimvueValueError(f"metric {name!r} has {len(shape)} axes; an array metric has 1 or {MAX_GRID_AXES}")
    if 0 in shape:
        raise SimvueValueError(f"metric {name!r} is an empty array")
    size = math.prod(shape)
    if size > MAX_TENSOR_VALUES:
        raise SimvueValueError(f"metric {name!r} holds {size} values; an array metric holds at most {MAX_TENSOR_VALUES}")


def _nested(name: str, value: Any) -> tuple[tuple[int, ...], list[float]]:
    """Shape and values of nested lists of numbers (when numpy is not installed)."""
    if not isinstance(value, (list, tuple)):
        return (), [metric_value(name, value)]
    rows = [_nested(name, item) for item in value]
    shapes = {shape for shape, _ in rows}
    if len(shapes) > 1:
        raise SimvueTypeError(f"metric {name!r} is not rectangular: its rows must be of equal length")
    shape = (len(rows), *(shapes.pop() if shapes else ()))
    _check_shape(name, shape)
    return shape, [number for _, flat in rows for number in flat]


def grid(name: Any, axes: Any, labels: Any) -> tuple[str, list[list[float]], list[str]]:
    """A checked grid definition: a name like a run's, 1 or ``MAX_GRID_AXES`` axes of finite
    ticks in increasing or decreasing order, and one label per axis."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise SimvueValueError(f"invalid grid name {name!r}: use 1-{MAX_NAME_LENGTH} printable characters")
    if hasattr(axes, "tolist") and not isinstance(axes, (list, tuple)):
        axes = axes.tolist()
    if not isinstance(axes, (list, tuple)) or not 1 <= len(axes) <= MAX_GRID_AXES:
        raise SimvueValueError(f"grid {name!r}: axes_ticks must hold 1 or {MAX_GRID_AXES} axes of ticks")
    ticks: list[list[float]] = []
    for index, axis in enumerate(axes):
        if hasattr(axis, "tolist") and not isinstance(axis, (list, tuple)):
            axis = axis.tolist()
        if not isinstance(axis, (list, tuple)) or not 1 <= len(axis) <= MAX_TENSOR_VALUES:
            raise SimvueValueError(f"grid {name!r}: axis {index} must be a list of 1-{MAX_TENSOR_VALUES} ticks")
        values = [metric_value(f"{name} axis {index}", tick) for tick in axis]
        pairs = list(zip(values, values[1:]))
        if not (all(a <= b for a, b in pairs) or all(a >= b for a, b in pairs)):
            raise SimvueValueError(f"grid {name!r}: the ticks of axis {index} are not in order")
        ticks.append([float(v) for v in values])
    if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
        raise SimvueTypeError(f"grid {name!r}: axes_labels must be a list of str")
    if len(labels) != len(ticks):
        raise SimvueValueError(f"grid {name!r}: {len(labels)} axes_labels for {len(ticks)} axes")
    return utf8(name, "grid name"), ticks, [utf8(label, "axis label") for label in labels]


def fits_grid(shape: tuple[int, ...] | list[int], axes: list[list[float]]) -> bool:
    """Whether an array of ``shape`` lies on a grid with these axes: one array axis per grid
    axis, as many values as ticks, with the grid's first axis the array's last (x along a
    row, as ``numpy.meshgrid`` lays it out) or its first."""
    lengths = [len(axis) for axis in axes]
    return list(shape) in (lengths[::-1], lengths)


def step(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SimvueTypeError(f"step must be an int, not {type(value).__name__} {value!r}")
    number = int(value)
    if not 0 <= number <= INT64_MAX:
        raise SimvueValueError(f"step must be between 0 and 2**63 - 1, got {number}")
    return number


def elapsed_time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SimvueTypeError(f"time must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value):
        raise SimvueValueError(f"time must be finite, got {value!r}")
    return float(value)


def timestamp(value: Any) -> float:
    """Seconds since the epoch for a ``YYYY-MM-DDThh:mm:ss[.ffffff][Z]`` string (UTC) or a datetime."""
    if isinstance(value, _dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)
        return moment.timestamp()
    if not isinstance(value, str):
        raise SimvueTypeError(
            f"timestamp must be a 'YYYY-MM-DDThh:mm:ss.ffffffZ' string, not {type(value).__name__}"
        )
    text = value[:-1] if value.endswith("Z") else value
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            parsed = _dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return parsed.replace(tzinfo=_dt.timezone.utc).timestamp()
    raise SimvueValueError(f"timestamp {value!r} is not of the form YYYY-MM-DDThh:mm:ss.ffffffZ")


def format_timestamp(seconds: float) -> str:
    """UTC ``YYYY-MM-DDThh:mm:ss.ffffff`` (microseconds, no zone suffix), as Simvue writes them."""
    moment = _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


def optional_timestamp(seconds: float | None) -> str | None:
    """``format_timestamp``, passing ``None`` through (a field that is not set yet)."""
    return None if seconds is None else format_timestamp(seconds)


def run_name(value: Any) -> str:
    """Any text a person would call a run: 1-256 characters, not only spaces, no control
    characters, valid Unicode (``résultat-1``, ``a/b``, ``Lauf 3 (ω=2)``).  Where a name
    becomes part of a file name it is mapped with ``_util.safe_filename``."""
    if not isinstance(value, str):
        raise SimvueTypeError(f"run name must be a str, not {type(value).__name__}")
    if not value.strip() or len(value) > MAX_NAME_LENGTH:
        raise SimvueValueError(f"invalid run name {value!r}: use 1-{MAX_NAME_LENGTH} characters, not only spaces")
    if not value.isprintable() and any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise SimvueValueError(f"invalid run name {value!r}: no control characters or lone surrogates")
    return utf8(value, "run name")


def folder(value: Any) -> str:
    if not isinstance(value, str):
        raise SimvueTypeError(f"folder must be a str such as '/project/part1', not {type(value).__name__}")
    if not FOLDER.match(value):
        raise SimvueValueError(f"invalid folder {value!r}: it must be an absolute path such as '/project/part1'")
    return value if value == "/" else value.rstrip("/")


def metadata(value: Any) -> dict[str, Any]:
    """A checked copy of ``value``: what JSON can hold, finite, at most ``MAX_METADATA_DEPTH``
    levels and ``MAX_METADATA_BYTES``, ints that fit in 64 bits, text that is valid UTF-8."""
    if not isinstance(value, Mapping):
        raise SimvueTypeError(f"metadata must be a dict, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise SimvueTypeError(f"metadata key {key!r} is not a str")
    try:
        # A JSON round trip both checks and copies: what the store keeps is what JSON can hold.
        text = json.dumps(dict(value), allow_nan=False, default=_jsonable)
    except RecursionError:
        raise SimvueValueError(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep") from None
    except (TypeError, ValueError) as exc:
        raise SimvueValueError(f"metadata cannot be stored: {exc}") from None
    if len(text) > MAX_METADATA_BYTES:
        raise SimvueValueError(f"metadata is {len(text):,} bytes as JSON; the limit is {MAX_METADATA_BYTES:,}")
    copy = json.loads(text)
    _check_portable(copy, "metadata")
    return copy


def _check_portable(value: Any, what: str) -> None:
    """Raise unless every stage can carry ``value`` (decoded JSON): nesting, 64-bit ints,
    UTF-8 text.  Iterative, so a deep value cannot exhaust the stack."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_METADATA_DEPTH:
            raise SimvueValueError(f"{what} is nested more than {MAX_METADATA_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                utf8(key, f"{what} key")
                todo.append((child, depth + 1))
        elif isinstance(item, list):
            todo.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            utf8(item, what)
        elif item.__class__ is int and not INT64_MIN <= item <= INT64_MAX:
            raise SimvueValueError(f"{what} holds the int {item}, which does not fit in 64 bits")


def utf8(text: str, what: str) -> str:
    """``text`` if it can be encoded as UTF-8 (no lone surrogates), else an error naming ``what``."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SimvueValueError(f"{what} {text[:40]!r} is not valid Unicode text: {exc.reason}") from None
    return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON serialisable")


def tags(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise SimvueTypeError(f"tags must be a list of str, not {type(value).__name__}")
    out = []
    for tag in value:
        if not isinstance(tag, str) or not tag:
            raise SimvueValueError(f"tag {tag!r} is not a non-empty str")
        out.append(utf8(tag, "tag"))
    return out


def description(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SimvueTypeError(f"description must be a str, not {type(value).__name__}")
    return None if value is None else utf8(value, "description")


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise SimvueValueError(f"invalid {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def status(value: Any) -> str:
    return _choice(value, RUN_STATUSES, "status")


def event_message(value: Any) -> str:
    if isinstance(value, BaseException):
        value = f"{type(value).__name__}: {value}"
    if not isinstance(value, str):
        raise SimvueTypeError(f"event message must be a str, not {type(value).__name__}")
    if len(value) > MAX_EVENT_LENGTH:
        raise SimvueValueError(f"event message is {len(value)} characters; the limit is {MAX_EVENT_LENGTH}")
    return utf8(value, "event message")


def event_level(value: Any) -> str:
    return _choice(value, EVENT_LEVELS, "log level")


NOTIFICATIONS = ("none", "all", "error", "lost")
_TIMESPAN_UNITS = {
    "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
    "y": 31536000, "year": 31536000, "years": 31536000,
}
_TIMESPAN_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*,?")
MAX_SHELL_VARS = 1000


def notification(value: Any) -> str:
    """When the server e-mails about the run: ``none``, ``all``, ``error`` or ``lost``."""
    return _choice(value, NOTIFICATIONS, "notification")


def retention_period(value: Any) -> int | None:
    """A time span such as ``"30 days"``, ``"1h30m"`` or ``"2 weeks"``, in whole seconds
    (a bare number is seconds); None keeps the run for good."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SimvueTypeError(f"retention_period must be a str such as '30 days', not {type(value).__name__}")
    text, seconds, position = value.strip().lower(), 0.0, 0
    while position < len(text):
        match = _TIMESPAN_PART.match(text, position)
        if match is None or match.end() == position or match.group(2) not in _TIMESPAN_UNITS and match.group(2):
            raise SimvueValueError(f"retention_period {value!r} is not a time span such as '30 days' or '1h30m'")
        seconds += float(match.group(1)) * _TIMESPAN_UNITS.get(match.group(2), 1)
        position = match.end()
    if not text or not math.isfinite(seconds) or seconds < 1 or seconds > 1000 * 31536000:
        raise SimvueValueError(f"retention_period {value!r} must be between one second and 1000 years")
    return int(seconds)


def visibility(value: Any) -> dict[str, Any]:
    """Who may see the run on the server, in the server's form: ``"public"``, ``"tenant"``,
    a list of user names, or None (the owner only)."""
    if value is None:
        return {"tenant": False, "public": False, "users": []}
    if value in ("public", "tenant"):
        return {"tenant": value == "tenant", "public": value == "public", "users": []}
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise SimvueValueError(f"visibility must be 'public', 'tenant' or a list of user names, not {value!r}")
    users = list(value)
    if not all(isinstance(user, str) and user for user in users):
        raise SimvueValueError(f"visibility: every user name must be a non-empty str, got {users!r}")
    return {"tenant": False, "public": False, "users": users}


def shell_variables(patterns: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables whose names match ``patterns`` (names or globs such as
    ``"SLURM_*"``), for the run's metadata."""
    if patterns is None:
        return {}
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise SimvueTypeError(f"record_shell_vars must be a list of names or globs, not {type(patterns).__name__}")
    patterns = list(patterns)
    if not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise SimvueValueError(f"record_shell_vars: every entry must be a non-empty str, got {patterns!r}")
    names = sorted({name for pattern in patterns for name in fnmatch.filter(environ, pattern)})
    if len(names) > MAX_SHELL_VARS:
        raise SimvueValueError(f"record_shell_vars matches {len(names)} variables; at most {MAX_SHELL_VARS} are kept")
    return {name: environ[name] for name in names}
