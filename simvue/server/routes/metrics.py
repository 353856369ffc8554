"""Metric points: ``POST /api/metrics`` to write, and three ways to read them.

* ``GET /api/metrics?runs=[...]&metrics=[...]&xaxis=step`` is what the upstream
  ``simvue.Client.get_metric_values`` reads: ``{run_id: {metric: [{"step", "time",
  "timestamp", "value"}, ...]}}`` sorted by the x axis, or with ``aggregate=true``
  ``{metric: [{xaxis, "min", "max", "average", "sum", "count"}, ...]}`` across the runs.
* ``GET /api/metrics/names?runs=[...]`` lists metric names.
* ``GET /api/runs/{id}/metrics`` returns every point of a run exactly, column-wise and in
  logging order, for tools that need the whole series (``simvue`` itself).

Non-finite values are stored as sent and read back as ``null`` (the one place a body may hold
them: a diverging loss is worth keeping); a non-finite ``time`` is refused like any other
non-finite number.  The read routes answer with a ``SafeJSONResponse`` of their own: FastAPI's
generic encoding would walk every point again.
"""

from __future__ import annotations

import math
import re
import time
from array import array
from typing import Annotated, Any, Literal

import msgpack
from fastapi import Header, HTTPException, Query
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, StringConstraints

from ... import validation
from ...store import SeriesChunk, StoreBatch
from ...store.sqlite import unpack_column
from ..bodies import ANY
from ..db import Handle
from . import DataHandle, IsoTime, SafeJSONResponse, checked_router, epoch_seconds, iso, json_list, require_run
from .ingest import Body, RawBody, write_once

router = checked_router()

# Where a metrics body may hold NaN and +-Infinity: the metric values (stored, read back as null).
NON_FINITE_VALUES = ("metrics", ANY, "values", ANY)
MetricName = Annotated[str, StringConstraints(pattern=validation.METRIC_NAME.pattern)]
XAxis = Literal["step", "time", "timestamp"]


class MetricPoint(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    time: float
    timestamp: IsoTime | None = None
    step: NonNegativeInt
    values: dict[MetricName, float | bool]


class MetricsPost(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    run: str
    metrics: list[MetricPoint]


def _chunks(points: list[MetricPoint], now: float) -> dict[str, SeriesChunk]:
    """The request's points regrouped per metric, as the store writes them."""
    chunks: dict[str, SeriesChunk] = {}
    for point in points:
        stamp = now if point.timestamp is None else point.timestamp
        for name, value in point.values.items():
            chunk = chunks.get(name)
            if chunk is None:
                chunk = chunks[name] = SeriesChunk()
            chunk.append(point.step, point.time, stamp, float(value))
    return chunks


@router.post("/metrics")
def post_metrics(
    body: RawBody, handle: DataHandle, idempotency_key: Annotated[str | None, Header()] = None
):
    now = time.time()
    fast = _fast_chunks(body.decoded_unchecked(), now)
    if fast is not None:
        run_id, chunks = fast
    else:  # anything unusual: the model says what is wrong, or takes it
        request = body.parse(MetricsPost, non_finite_ok=NON_FINITE_VALUES)
        run_id, chunks = request.run, _chunks(request.metrics, now)
    try:
        require_run(handle, run_id)
    except HTTPException:
        # A field of the body names nothing: a validation error (422), as Simvue servers answer
        # and the upstream client expects, in FastAPI's shape.
        raise HTTPException(status_code=422, detail=[{
            "loc": ["body", "run"], "msg": f"no run with id {run_id!r}", "type": "value_error"}]) from None
    written = write_once(handle, run_id, idempotency_key, StoreBatch(metrics=chunks, heartbeat=now))
    stored = sum(len(chunk) for chunk in chunks.values()) if written else 0
    return {"run": run_id, "stored": stored, "replayed": not written}


_FRACTION = re.compile(r"(?:\.(\d{1,6}))?Z?")


def _fast_chunks(decoded: Any, now: float) -> tuple[str, dict[str, SeriesChunk]] | None:
    """``(run id, chunks)`` of a metrics body of the usual shape, checked value by value as
    ``MetricsPost`` would check it, but without a model object per point (a batch holds
    100,000 points); None for anything else, which ``MetricsPost`` then reads or refuses
    with its reasons.  Timestamps are read once per whole second."""
    if type(decoded) is not dict or type(decoded.get("run")) is not str or type(decoded.get("metrics")) is not list:
        return None
    if not decoded["run"].isascii():  # anything else the model checks (text that is not UTF-8)
        return None
    chunks: dict[str, SeriesChunk] = {}
    appenders: dict[str, tuple] = {}
    seconds: dict[str, float] = {}
    for entry in decoded["metrics"]:
        if type(entry) is not dict:
            return None
        step, t, stamp, values = entry.get("step"), entry.get("time"), entry.get("timestamp"), entry.get("values")
        if (
            type(step) is not int or not 0 <= step <= validation.INT64_MAX
            or (type(t) is not float and (type(t) is not int or not validation.INT64_MIN <= t <= validation.INT64_MAX))
            or t - t != 0 or type(values) is not dict
        ):
            return None
        if stamp is None:
            stamp = now
        elif type(stamp) is str and len(stamp) >= 19:
            whole = seconds.get(stamp[:19])
            if whole is None:
                try:
                    whole = seconds[stamp[:19]] = epoch_seconds(stamp[:19])
                except ValueError:
                    return None
            fraction = _FRACTION.fullmatch(stamp, 19)
            if fraction is None:
                return None
            stamp = whole + (int(fraction[1].ljust(6, "0")) / 1e6 if fraction[1] else 0.0)
        else:
            return None
        for name, value in values.items():
            add = appenders.get(name)
            if add is None:
                if type(name) is not str or not validation.METRIC_NAME.match(name):
                    return None
                chunk = chunks[name] = SeriesChunk()
                add = appenders[name] = chunk.appenders()
            kind = type(value)
            if kind is not float and kind is not bool and (
                kind is not int or not validation.INT64_MIN <= value <= validation.INT64_MAX
            ):
                return None
            add[0](step)
            add[1](t)
            add[2](stamp)
            add[3](value)
    return decoded["run"], chunks


@router.post("/runs/{run_id}/columns")
def post_columns(
    run_id: str, body: RawBody, handle: DataHandle, idempotency_key: Annotated[str | None, Header()] = None
):
    """Metric points as the store keeps them (what simvue's uploader sends once ``/api/version``
    says ``"columns": 1``): msgpack ``{"metrics": {name: [steps, times, timestamps, values]}}``,
    each a little-endian packed array of one length: int64 steps >= 0, float64 times and
    timestamps (finite), float64 values (NaN and infinities kept, as ``POST /api/metrics``
    keeps them).  Checked whole, then written in one transaction, with no object per point."""
    require_run(handle, run_id)
    chunks = _column_chunks(body)
    now = time.time()
    written = write_once(handle, run_id, idempotency_key, StoreBatch(metrics=chunks, heartbeat=now))
    stored = sum(len(chunk) for chunk in chunks.values()) if written else 0
    return {"run": run_id, "stored": stored, "replayed": not written}


def _column_chunks(body: Body) -> dict[str, SeriesChunk]:
    import numpy as np  # the server extra's

    if "msgpack" not in body.content_type:
        raise HTTPException(status_code=415, detail="columns are sent as msgpack (Content-Type: application/msgpack)")
    try:
        decoded = msgpack.unpackb(body.content, raw=False, strict_map_key=True, max_array_len=4,
                                  max_map_len=1_000_000)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for bad input
        raise HTTPException(
            status_code=400, detail=f"request body is not msgpack columns: {type(exc).__name__} {exc}".rstrip()
        ) from None
    metrics = decoded.get("metrics") if isinstance(decoded, dict) else None
    if not isinstance(metrics, dict):
        raise _column_error([], 'expected {"metrics": {name: [steps, times, timestamps, values]}}')
    chunks: dict[str, SeriesChunk] = {}
    for name, columns in metrics.items():
        where = ["metrics", name]
        if not (isinstance(name, str) and 0 < len(name) <= validation.MAX_NAME_LENGTH
                and validation.METRIC_NAME.match(name)):
            raise _column_error(where, f"{name!r} is not a metric name")
        if not (isinstance(columns, list) and len(columns) == 4 and all(type(c) is bytes for c in columns)):
            raise _column_error(where, "expected [steps, times, timestamps, values], each packed bytes")
        sizes = {len(column) for column in columns}
        if len(sizes) != 1 or not sizes.pop() or len(columns[0]) % 8:
            raise _column_error(where, "the four columns must hold the same number of 8-byte values")
        steps, times, stamps = (np.frombuffer(c, dtype=t) for c, t in zip(columns, ("<i8", "<f8", "<f8")))
        if steps.min() < 0:
            raise _column_error(where, "steps must be >= 0")
        if not (np.isfinite(times).all() and np.isfinite(stamps).all()):
            raise _column_error(where, "times and timestamps must be finite")
        chunk = chunks[name] = SeriesChunk()
        chunk.steps, chunk.times = unpack_column("q", columns[0]), unpack_column("d", columns[1])
        chunk.timestamps, chunk.values = unpack_column("d", columns[2]), unpack_column("d", columns[3])
    return chunks


def _column_error(where: list, message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["body", *where], "msg": message, "type": "columns"}])


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _points(handle: Handle, run_id: str, name: str) -> list[dict]:
    series = handle.store.metric_series(run_id, name)
    return [
        {"step": step, "time": t, "timestamp": iso(stamp), "value": _finite(value)}
        for step, t, stamp, value in zip(
            series["steps"], series["times"], series["timestamps"], series["values"], strict=True
        )
    ]


def _thin(points: list[dict], max_points: int | None, xaxis: str, key: str = "value") -> list[dict]:
    """At most ``max_points`` of ``points`` (in ``xaxis`` order), chosen per pixel column as the
    dashboard's charts choose them (``downsample.m4_within``): each column's first, last, lowest
    and highest point, and the series' first and last, so that no spike is lost."""
    if not max_points or len(points) <= max_points:
        return points
    import numpy as np

    from ..downsample import m4_within

    x = np.array([p[xaxis] for p in points], dtype=np.float64)
    y = np.array([np.nan if p[key] is None else p[key] for p in points], dtype=np.float64)
    return [points[i] for i in m4_within(x, y, max_points).tolist()]


def _aggregate(per_run: list[list[dict]], xaxis: str) -> list[dict]:
    groups: dict[float, list[float]] = {}
    for points in per_run:
        for point in points:
            values = groups.setdefault(point[xaxis], [])
            if point["value"] is not None:
                values.append(point["value"])
    return [
        {
            xaxis: x,
            "min": min(values, default=None),
            "max": max(values, default=None),
            "average": sum(values) / len(values) if values else None,
            "sum": sum(values),
            "count": len(values),
        }
        for x, values in sorted(groups.items())
    ]


@router.get("/metrics")
def get_metric_values(
    handle: DataHandle,
    runs: str,
    metrics: str,
    xaxis: XAxis = "step",
    aggregate: bool = False,
    max_points: PositiveInt | None = None,
):
    run_ids, names = json_list(runs, "runs"), json_list(metrics, "metrics")
    for run_id in run_ids:
        require_run(handle, run_id)
    found: dict[str, dict[str, list[dict]]] = {}
    for run_id in run_ids:
        present = set(handle.store.metric_names(run_id))
        series = {name: _points(handle, run_id, name) for name in names if name in present}
        if series:  # a run without any of the metrics is left out, as the upstream client expects
            found[run_id] = {name: sorted(points, key=lambda p: p[xaxis]) for name, points in series.items()}
    if aggregate:
        if xaxis == "timestamp":
            raise HTTPException(status_code=400, detail="aggregate=true cannot be combined with xaxis=timestamp")
        return SafeJSONResponse({
            name: _thin(_aggregate([by_name[name] for by_name in found.values() if name in by_name], xaxis), max_points,
                        xaxis, "average")
            for name in names
            if any(name in by_name for by_name in found.values())
        })
    return SafeJSONResponse({
        run_id: {name: _thin(points, max_points, xaxis) for name, points in by_name.items()}
        for run_id, by_name in found.items()
    })


@router.get("/metrics/names")
def get_metric_names(handle: DataHandle, runs: str):
    names: set[str] = set()
    for run_id in json_list(runs, "runs"):
        require_run(handle, run_id)
        names.update(handle.store.metric_names(run_id))
    return sorted(names)


def _columns(series: dict[str, array]) -> dict[str, list]:
    return {
        "steps": series["steps"].tolist(),
        "times": series["times"].tolist(),
        "timestamps": [iso(stamp) for stamp in series["timestamps"]],
        "values": [_finite(value) for value in series["values"]],
    }


@router.get("/runs/{run_id}/metrics")
def get_run_metrics(run_id: str, handle: DataHandle, names: Annotated[list[str] | None, Query()] = None):
    """Every point of the run's metrics (or of ``names=a&names=b``), in logging order."""
    require_run(handle, run_id)
    present = handle.store.metric_names(run_id)
    wanted = present if names is None else [name for name in present if name in set(names)]
    return SafeJSONResponse({"data": {name: _columns(handle.store.metric_series(run_id, name)) for name in wanted}})


@router.get("/runs/{run_id}/metrics/names")
def get_run_metric_names(run_id: str, handle: DataHandle):
    require_run(handle, run_id)
    return handle.store.metric_names(run_id)
