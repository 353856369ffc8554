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
import time
from array import array
from typing import Annotated, Literal

from fastapi import Header, HTTPException, Query
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, StringConstraints

from ... import validation
from ...store import SeriesChunk, StoreBatch
from ..bodies import ANY
from ..db import Handle
from . import DataHandle, IsoTime, SafeJSONResponse, checked_router, iso, json_list, require_run
from .ingest import RawBody, write_once

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
    request = body.parse(MetricsPost, non_finite_ok=NON_FINITE_VALUES)
    try:
        require_run(handle, request.run)
    except HTTPException:
        # A field of the body names nothing: a validation error (422), as Simvue servers answer
        # and the upstream client expects, in FastAPI's shape.
        raise HTTPException(status_code=422, detail=[{
            "loc": ["body", "run"], "msg": f"no run with id {request.run!r}", "type": "value_error"}]) from None
    now = time.time()
    chunks = _chunks(request.metrics, now)
    written = write_once(handle, request.run, idempotency_key, StoreBatch(metrics=chunks, heartbeat=now))
    stored = sum(len(chunk) for chunk in chunks.values()) if written else 0
    return {"run": request.run, "stored": stored, "replayed": not written}


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
