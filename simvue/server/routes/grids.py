"""Tensor metrics: grids, the runs' metrics on them, and their values step by step.

The upstream client's ``Run.assign_metric_to_grid`` and ``Run.log_metrics`` with an array:

* ``POST /api/grids`` ``{"name", "grid": [[ticks of axis 0], [ticks of axis 1], ...], "labels"}``
  defines a grid;
* ``PUT /api/runs/{run}/grids/{grid}`` ``{"metric"}`` puts a run's metric on it;
* ``POST /api/runs/{run}/metrics/`` (msgpack or JSON) ``[{"metric", "grid", "step", "time",
  "timestamp", "array"}, ...]`` stores values, one array per metric and step, whose shape
  fits the grid: one dimension per axis, as many values as ticks, with the grid's first axis
  the array's last (a row runs along x, as the upstream client's default grid has it) or its
  first;
* ``GET /api/runs/{run}/grids``, ``GET /api/runs/{run}/metrics/{metric}/values?step=N`` and
  ``.../span`` read them back.

Values must be finite (422 otherwise), like every number the server stores outside a scalar
metric batch.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, RootModel, StringConstraints

from ... import validation
from ...store import new_id
from . import DataHandle, IsoTime, SafeJSONResponse, checked_router, iso, not_found, require_run
from .ingest import RawBody

router = checked_router()

GridName = Annotated[str, StringConstraints(min_length=1, max_length=validation.MAX_NAME_LENGTH)]
MetricName = Annotated[str, StringConstraints(pattern=validation.METRIC_NAME.pattern)]
Axis = Annotated[list[float], Field(min_length=1)]


class GridCreate(BaseModel):
    model_config = ConfigDict(strict=False, extra="ignore")  # ticks may be sent as ints
    name: GridName
    grid: Annotated[list[Axis], Field(min_length=1)]
    labels: list[str]


class GridAttach(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    metric: MetricName


class GridPoint(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    metric: MetricName
    grid: str
    step: NonNegativeInt
    time: float
    timestamp: IsoTime | None = None
    array: list[Any]


class GridPoints(RootModel[list[GridPoint]]):
    pass


def _grid(db: sqlite3.Connection, grid_id: str) -> dict:
    row = db.execute("SELECT id, name, grid, labels, created FROM server_grids WHERE id=?", (grid_id,)).fetchone()
    if row is None:
        raise not_found("grid", grid_id)
    return {"id": row[0], "name": row[1], "grid": json.loads(row[2]), "labels": json.loads(row[3]),
            "created": iso(row[4])}


def _shape(array: Any) -> tuple[int, ...]:
    """The shape of a rectangular nested list of numbers; ValueError for anything else."""
    if not isinstance(array, list):
        if isinstance(array, (int, float)) and not isinstance(array, bool):
            return ()
        raise ValueError(f"{array!r} is not a number")
    if not array:
        raise ValueError("an axis has no values")
    shapes = {_shape(item) for item in array}
    if len(shapes) != 1:
        raise ValueError("the array is not rectangular")
    return (len(array), *shapes.pop())


def _flat(array: Any) -> list[float]:
    return [value for item in array for value in _flat(item)] if isinstance(array, list) else [float(array)]


@router.post("/grids")
def create_grid(body: GridCreate, handle: DataHandle):
    if len(body.labels) != len(body.grid):
        raise HTTPException(status_code=422, detail=f"{len(body.labels)} labels for {len(body.grid)} axes")
    grid_id = new_id()
    with handle.transaction() as db:
        db.execute(
            "INSERT INTO server_grids (id, name, grid, labels, created) VALUES (?,?,?,?,?)",
            (grid_id, body.name, json.dumps(body.grid), json.dumps(body.labels), time.time()),
        )
    return _grid(handle.db, grid_id)


@router.get("/grids/{grid_id}")
def get_grid(grid_id: str, handle: DataHandle):
    return _grid(handle.db, grid_id)


@router.delete("/grids/{grid_id}")
def delete_grid(grid_id: str, handle: DataHandle):
    """Delete the grid, and the values of every run's metric on it."""
    with handle.transaction() as db:
        _grid(db, grid_id)
        for table in ("server_grid_values", "server_run_grids"):
            db.execute(f"DELETE FROM {table} WHERE grid_id=?", (grid_id,))
        db.execute("DELETE FROM server_grids WHERE id=?", (grid_id,))
    return {"id": grid_id}


@router.put("/runs/{run_id}/grids/{grid_id}")
def attach_grid(run_id: str, grid_id: str, body: GridAttach, handle: DataHandle):
    """Put the run's metric on the grid (a metric is on one grid; this moves it)."""
    require_run(handle, run_id)
    with handle.transaction() as db:
        _grid(db, grid_id)
        db.execute(
            "INSERT INTO server_run_grids (run_id, metric, grid_id) VALUES (?,?,?)"
            " ON CONFLICT (run_id, metric) DO UPDATE SET grid_id=excluded.grid_id",
            (run_id, body.metric, grid_id),
        )
    return {"run": run_id, "grid": grid_id, "metric": body.metric}


@router.get("/runs/{run_id}/grids")
def run_grids(run_id: str, handle: DataHandle):
    """The run's tensor metrics: ``[{"id", "name", "metric", "grid", "labels"}]``."""
    require_run(handle, run_id)
    rows = handle.db.execute(
        "SELECT metric, grid_id FROM server_run_grids WHERE run_id=? ORDER BY metric", (run_id,)
    ).fetchall()
    found = []
    for metric, grid_id in rows:
        grid = _grid(handle.db, grid_id)
        found.append({"id": grid_id, "name": grid["name"], "metric": metric, "grid": grid["grid"],
                      "labels": grid["labels"]})
    return found


def _check_point(db: sqlite3.Connection, shapes: dict[str, tuple[int, ...]], index: int, point: GridPoint) -> list[float]:
    """The point's values, flat; 404 if its grid is unknown, 422 naming the point if its array
    does not fit the grid."""
    if point.grid not in shapes:
        row = db.execute("SELECT grid FROM server_grids WHERE id=?", (point.grid,)).fetchone()
        if row is None:
            raise not_found("grid", point.grid)
        shapes[point.grid] = tuple(len(axis) for axis in json.loads(row[0]))
    ticks = shapes[point.grid]
    try:
        shape = _shape(point.array)
        if list(shape) not in (list(ticks[::-1]), list(ticks)):
            raise ValueError(
                f"its shape {list(shape)} does not fit the grid's axes of {list(ticks)} ticks: the array's last axis"
                " (or its first) is the grid's first"
            )
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=[
            {"loc": ["body", index, "array"], "msg": str(exc), "type": "grid_shape"}
        ]) from None
    return _flat(point.array)


@router.post("/runs/{run_id}/metrics/")
@router.post("/runs/{run_id}/metrics")
def post_grid_values(run_id: str, body: RawBody, handle: DataHandle):
    """Store tensor-metric values: each array goes with its metric and step (a repeated step
    replaces the earlier array) and puts the metric on its grid if it was not."""
    points = body.parse(GridPoints).root
    require_run(handle, run_id)
    now = time.time()
    shapes: dict[str, tuple[int, ...]] = {}
    with handle.transaction() as db:
        for index, point in enumerate(points):
            values = _check_point(db, shapes, index, point)  # finite: the body was checked whole
            db.execute("DELETE FROM server_grid_values WHERE run_id=? AND metric=? AND step=?",
                       (run_id, point.metric, point.step))
            db.execute(
                "INSERT INTO server_grid_values (run_id, metric, grid_id, step, time, timestamp, array, minimum,"
                " maximum) VALUES (?,?,?,?,?,?,?,?,?)",
                (run_id, point.metric, point.grid, point.step, point.time,
                 now if point.timestamp is None else point.timestamp, json.dumps(point.array),
                 min(values), max(values)),
            )
            db.execute("INSERT OR IGNORE INTO server_run_grids (run_id, metric, grid_id) VALUES (?,?,?)",
                       (run_id, point.metric, point.grid))
        db.execute("UPDATE runs SET heartbeat=? WHERE id=?", (now, run_id))
    return {"run": run_id, "stored": len(points)}


def _metric_name(handle: DataHandle, run_id: str, metric: str) -> str:
    """The run's tensor metric ``metric`` (one upstream call writes the path with ``//``, so a
    leading slash that names nothing is dropped); 404 if the run has no such metric."""
    for name in (metric, metric[1:] if metric.startswith("/") else None):
        if name and handle.db.execute(
            "SELECT 1 FROM server_run_grids WHERE run_id=? AND metric=?", (run_id, name)
        ).fetchone():
            return name
    raise not_found(f"tensor metric of run {run_id!r} named", metric)


@router.get("/runs/{run_id}/metrics/{metric:path}/values")
def grid_values(run_id: str, metric: str, handle: DataHandle, step: NonNegativeInt | None = None):
    """The metric's array at ``step`` (default: its last step)."""
    require_run(handle, run_id)
    name = _metric_name(handle, run_id, metric)
    query = "SELECT grid_id, step, time, timestamp, array FROM server_grid_values WHERE run_id=? AND metric=?"
    if step is None:
        row = handle.db.execute(query + " ORDER BY step DESC LIMIT 1", (run_id, name)).fetchone()
    else:
        row = handle.db.execute(query + " AND step=?", (run_id, name, step)).fetchone()
    if row is None:
        raise HTTPException(status_code=404, detail=f"tensor metric {name!r} of run {run_id!r} has no step {step}")
    grid_id, found_step, seconds, stamp, array = row
    return SafeJSONResponse({"run": run_id, "metric": name, "grid": grid_id, "step": found_step, "time": seconds,
                             "timestamp": iso(stamp), "array": json.loads(array)})


@router.get("/runs/{run_id}/metrics/{metric:path}/span")
def grid_span(run_id: str, metric: str, handle: DataHandle):
    """``[{"metric", "grid", "min", "max", "first_step", "last_step", "steps", "min_time",
    "max_time", "min_timestamp", "max_timestamp"}]``: the range of the metric's values over all
    its steps (what a colour scale needs) and when they were logged."""
    require_run(handle, run_id)
    name = _metric_name(handle, run_id, metric)
    minimum, maximum, first, last, steps, min_time, max_time, min_stamp, max_stamp = handle.db.execute(
        "SELECT MIN(minimum), MAX(maximum), MIN(step), MAX(step), COUNT(*), MIN(time), MAX(time), MIN(timestamp),"
        " MAX(timestamp) FROM server_grid_values WHERE run_id=? AND metric=?", (run_id, name),
    ).fetchone()
    (grid_id,) = handle.db.execute(
        "SELECT grid_id FROM server_run_grids WHERE run_id=? AND metric=?", (run_id, name)
    ).fetchone()
    return [{"metric": name, "grid": grid_id, "min": minimum, "max": maximum, "first_step": first, "last_step": last,
             "steps": steps, "min_time": min_time, "max_time": max_time, "min_timestamp": iso(min_stamp),
             "max_timestamp": iso(max_stamp)}]
