"""Metric points in columns: how a sender packs its METRICS records and how they are read back.

A sender's batch of records is a list in the order its process made them.  ``to_columns``
turns each stretch of METRICS records between two other records into METRIC_COLUMNS
records (``protocol.MetricColumnsRecord``): one per set of metric names logged together,
holding that set's names, the rows' steps, times and timestamps once, and one value column per
name, every column packed as little-endian int64 or float64 bytes.  Everything else in the
batch stays as it was, in its place, so the order of records is the order the process made
them in, except that within one stretch the points of *different* metrics are no longer
interleaved (each metric's own points keep their order; see "Order" in ``protocol``).

``read_columns`` checks a METRIC_COLUMNS record completely (types, lengths, counts, ranges,
finite numbers) before anything is taken from it, so a malformed one is dropped whole.

Both run off the caller's path: ``to_columns`` on the sender's thread, ``read_columns`` on the
aggregator's.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

from .._util import pack_column, unpack_column
from .protocol import MAX_COLUMN_ROWS, MetricColumnsRecord, RecordKind

_METRICS = RecordKind.METRICS
_COLUMNS = int(RecordKind.METRIC_COLUMNS)
_LITTLE = sys.byteorder == "little"
_first, _step, _time, _timestamp, _values = (itemgetter(i) for i in range(5))
# A run of fewer records than this with one set of names travels as plain METRICS records:
# for a single row the columns cost more to read than the record.
MIN_COLUMN_ROWS = 2


def to_columns(records: Sequence[Any]) -> list[Any]:
    """``records`` (a batch, in order) with its METRICS records packed into columns.

    The batch is cut at every record that is not METRICS into stretches of METRICS records.
    A stretch whose records all log the same names (the usual case) becomes one
    METRIC_COLUMNS record; any other is split into groups by the set of names each record
    logs, groups of one stretch having no name in common (a record whose names overlap a
    group's without being the same set starts a new stretch), so packing each group on its
    own keeps every metric's points in order.  A group that cannot be packed (a value that
    is not a float64, a step beyond int64: the Run API lets neither through) is kept as
    plain records, which the sender then checks one by one."""
    kinds = list(map(_first, records))
    if kinds.count(_METRICS) == len(kinds):
        cuts: list[int] = []
    else:  # the few records that are not METRICS, found by C-level searches
        cuts = sorted(i for kind in set(kinds) if kind != _METRICS for i in _positions(kinds, kind))
    out: list[Any] = []
    start = 0
    for cut in [*cuts, len(records)]:
        if cut > start:
            _stretch(records[start:cut], out)
        if cut < len(records):
            out.append(records[cut])
        start = cut + 1
    return out


def _positions(items: list[Any], value: Any) -> list[int]:
    found = []
    index = -1
    try:
        while True:
            index = items.index(value, index + 1)
            found.append(index)
    except ValueError:
        return found


def _stretch(stretch: Sequence[Any], out: list[Any]) -> None:
    rows = list(map(_values, stretch))
    if rows[0].__class__ is dict:
        width = len(rows[0])
        # Every row as long as the first and holding each of its names: the same set.
        if width and list(map(len, rows)).count(width) == len(rows):
            try:
                out.append(_group_columns(stretch, rows))
                return
            except KeyError:
                pass  # another set of names of the same size: group them below
            except (TypeError, ValueError, OverflowError):
                out.extend(stretch)
                return
    groups: dict[frozenset, list] = {}  # the current stretch: names -> its records
    names_seen: set[str] = set()
    last_keys: Any = None
    last_group: list = []
    for record in stretch:
        keys = record[4].keys()
        if keys == last_keys:
            last_group.append(record)
            continue
        names = frozenset(keys)
        group = groups.get(names)
        if group is None:
            if not names_seen.isdisjoint(names):
                _emit(groups, out)
                groups = {}
                names_seen.clear()
            group = groups[names] = []
            names_seen.update(names)
        group.append(record)
        last_keys, last_group = keys, group
    _emit(groups, out)


def _emit(groups: dict[frozenset, list], out: list[Any]) -> None:
    for group in groups.values():
        if len(group) < MIN_COLUMN_ROWS or not group[0][4]:
            out.extend(group)
            continue
        try:
            out.append(_group_columns(group, list(map(_values, group))))
        except (TypeError, ValueError, OverflowError, KeyError):
            out.extend(group)


def _group_columns(group: Sequence[Any], rows: list[dict]) -> MetricColumnsRecord:
    """One METRIC_COLUMNS record of ``group``, whose ``rows`` (its dicts) have the same names."""
    names = list(rows[0])
    width = len(names)
    getter = itemgetter(*names)  # each row's values in the order of ``names``, whatever its own order
    if width == 1:
        values = [pack_column(array("d", map(getter, rows)))]
    else:
        flat = array("d", chain.from_iterable(map(getter, rows)))  # row by row
        if not _LITTLE:
            flat.byteswap()
        values = [flat[j::width].tobytes() for j in range(width)]
    return MetricColumnsRecord(
        _COLUMNS,  # type: ignore[arg-type]
        len(group),
        names,
        pack_column(array("q", map(_step, group))),
        pack_column(array("d", map(_time, group))),
        pack_column(array("d", map(_timestamp, group))),
        values,
    )


class Columns(NamedTuple):
    """A METRIC_COLUMNS record read back: its columns as arrays, and its step range."""

    names: list[str]
    steps: array
    step_min: int
    step_max: int
    times: array
    timestamps: array
    values: list[array]  # one column per name


def read_columns(record: Sequence[Any]) -> Columns:
    """The ``Columns`` of a METRIC_COLUMNS record; raises ``ValueError`` unless every part is
    well formed: ``rows`` rows (1 to ``MAX_COLUMN_ROWS``) in every column, distinct str names
    as many as value columns, steps from 0 to 2**63 - 1, finite times, timestamps and values."""
    if len(record) != 7:
        raise ValueError("a metric columns record has 7 fields")
    _, count, names, steps, times, stamps, values = record
    if count.__class__ is not int or not 0 < count <= MAX_COLUMN_ROWS:
        raise ValueError("metric columns: bad row count")
    if names.__class__ is not list or values.__class__ is not list or not names or len(values) != len(names):
        raise ValueError("metric columns: the names do not match the value columns")
    for name in names:
        if name.__class__ is not str:
            raise ValueError("metric columns: a metric name must be a str")
    if len(set(names)) != len(names):
        raise ValueError("metric columns: a name appears twice")
    size = 8 * count
    for blob in (steps, times, stamps, *values):
        if blob.__class__ is not bytes or len(blob) != size:
            raise ValueError("metric columns: a column's length is not 8 bytes per row")
    step_column = unpack_column("q", steps)
    step_min = min(step_column)
    if step_min < 0:
        raise ValueError("metric columns: a negative step")
    floats = [unpack_column("d", blob) for blob in (times, stamps, *values)]
    for column in floats:
        # inf or nan anywhere makes the sum inf or nan (and so would values near 1e308)
        if not math.isfinite(sum(column)):
            raise ValueError("metric columns: a time, timestamp or value that is not finite")
    return Columns(names, step_column, step_min, max(step_column), floats[0], floats[1], floats[2:])


def record_count(body: Sequence[Any]) -> int:
    """How many records a DATA body stands for: a METRIC_COLUMNS record counts its rows."""
    count = 0
    for record in body:
        if isinstance(record, (list, tuple)) and record and record[0] == _COLUMNS and len(record) == 7:
            rows = record[1]
            steps = record[3]
            # what its step column holds: a forged count cannot inflate the figure
            count += len(steps) // 8 if steps.__class__ is bytes and rows.__class__ is int else 1
        else:
            count += 1
    return count


def records(body: Sequence[Any]) -> list[Any]:
    """A DATA body's records with each METRIC_COLUMNS record turned back into the METRICS
    records it holds (values as floats): for reading spill files, and for tests."""
    out: list[Any] = []
    for record in body:
        if isinstance(record, (list, tuple)) and record and record[0] == _COLUMNS:
            names, steps, _, _, times, stamps, values = read_columns(record)
            out.extend(
                (_METRICS, step, t, ts, dict(zip(names, row)))
                for step, t, ts, *row in zip(steps, times, stamps, *values)
            )
        else:
            out.append(record)
    return out
