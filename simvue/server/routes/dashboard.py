"""What the dashboard reads beyond the Simvue API: a run's metrics grouped for drawing, lines
down-sampled to the chart's width, and per-process heat maps and bands (see ``views``).

Every answer is bounded by ``width`` (pixel columns, at most ``downsample.MAX_BUCKETS``), not by
the run's size.  ``x`` is ``step`` or ``time`` (seconds since the run started); ``lo``/``hi``
narrow it for a zoom.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Query, Request
from fastapi.responses import Response

from ...validation import timestamp
from ..downsample import MAX_BUCKETS
from ..views import Series, band, group_metrics, heat_map, line, positions
from . import DataHandle, SafeJSONResponse, bad_request, checked_router, iso, not_found, require_run
from .alerts import run_alerts
from .artifacts import run_artifacts
from .runs import run_response

router = checked_router()

XAxis = Literal["step", "time"]
Kind = Literal["metric", "resource"]
Width = Annotated[int, Query(ge=1, le=MAX_BUCKETS)]
MAX_LINES = 64  # per request
MAX_OUTLIERS = 16


def _finite(value: float | None, name: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number")
    return value


def _series(handle: Any, run_id: str, name: str, x: XAxis) -> Series:
    column = "steps" if x == "step" else "times"
    raw = handle.store.metric_columns(run_id, name, (column, "values"))
    xs = np.frombuffer(raw[column], dtype="<i8" if x == "step" else "<f8")
    return Series.ordered(xs, np.frombuffer(raw["values"], dtype="<f8"))


def _rows(handle: Any, run_id: str, metric: str, kind: Kind, x: XAxis) -> dict[str, Series]:
    groups = group_metrics(handle.store.metric_names(run_id))
    table = groups.per_process if kind == "metric" else groups.process_resources
    labels = table.get(metric)
    if not labels:
        raise bad_request(f"the run has no per-process {kind} named {metric!r}")
    names = {label: f"{label}/{metric}" if kind == "metric" else f"resources/{label}/{metric}" for label in labels}
    return {label: _series(handle, run_id, name, x) for label, name in names.items()}


@router.get("/dashboard/runs/{run_id}")
def overview(run_id: str, handle: DataHandle):
    """The run (as ``GET /runs/{id}`` gives it), its metrics grouped for drawing, its points per
    metric, its processes and nodes, and how long it lasted."""
    run = require_run(handle, run_id)
    response = run_response(handle, run, summaries=False)
    counts = {name: metric["count"] for name, metric in response["metrics"].items()}
    simvue = (run.get("metadata") or {}).get("simvue") or {}
    processes: dict[str, Any] = simvue["processes"] if isinstance(simvue.get("processes"), dict) else {}
    hosts: dict[str, Any] = simvue["hosts"] if isinstance(simvue.get("hosts"), dict) else {}
    end = run["ended"] if run["ended"] is not None else run["heartbeat"]
    started = run["started"] or run["created"]
    return SafeJSONResponse({
        "run": response,
        "groups": group_metrics(counts).as_json(),
        "points": counts,
        "events": handle.store.event_count(run_id),
        "processes": processes,
        "nodes": sorted(hosts) or sorted({p.get("host") for p in processes.values() if isinstance(p, dict) and p.get("host")}),
        "duration_s": (end - started) if end is not None and started is not None else None,
        "updated": iso(run["heartbeat"]),
    })


@router.get("/dashboard/runs/{run_id}/lines")
def lines(
    run_id: str,
    handle: DataHandle,
    name: Annotated[list[str], Query()],
    width: Width = 800,
    x: XAxis = "step",
    lo: float | None = None,
    hi: float | None = None,
):
    """Each ``name``'s points to draw at ``width`` columns (M4): ``{name: {x, y, points, range}}``;
    a name the run does not have is left out."""
    require_run(handle, run_id)
    if len(name) > MAX_LINES:
        raise bad_request(f"at most {MAX_LINES} names per request")
    lo, hi = _finite(lo, "lo"), _finite(hi, "hi")
    present = set(handle.store.metric_names(run_id))
    return SafeJSONResponse({n: line(_series(handle, run_id, n, x), width, lo, hi) for n in dict.fromkeys(name) if n in present})


@router.get("/dashboard/runs/{run_id}/heatmap")
def heatmap(
    run_id: str,
    handle: DataHandle,
    metric: str,
    kind: Kind = "metric",
    width: Width = 400,
    x: XAxis = "step",
    lo: float | None = None,
    hi: float | None = None,
):
    """Process × step (or time) cells of ``metric`` (``loss`` for ``rank*/loss``; with
    ``kind=resource``, ``cpu.usage.percentage`` for ``resources/rank*/…``), with margins,
    imbalance and the per-process table."""
    require_run(handle, run_id)
    return SafeJSONResponse(heat_map(_rows(handle, run_id, metric, kind, x), width, _finite(lo, "lo"), _finite(hi, "hi")))


@router.get("/dashboard/runs/{run_id}/band")
def band_view(
    run_id: str,
    handle: DataHandle,
    metric: str,
    kind: Kind = "metric",
    width: Width = 800,
    x: XAxis = "step",
    lo: float | None = None,
    hi: float | None = None,
    outliers: Annotated[int, Query(ge=0, le=MAX_OUTLIERS)] = 3,
):
    """Lowest, mean and highest value over every process per column, and the lines of the
    ``outliers`` processes furthest from the others."""
    require_run(handle, run_id)
    rows = _rows(handle, run_id, metric, kind, x)
    return SafeJSONResponse(band(rows, width, _finite(lo, "lo"), _finite(hi, "hi"), outliers))


MAX_MARKERS = 500


@router.get("/dashboard/runs/{run_id}/markers")
def markers(run_id: str, handle: DataHandle, x: XAxis = "step", levels: str = "warning,error,critical"):
    """Events of ``levels`` and alert firings placed on the x axis: at their time since the
    run's start, or at the step the run's longest series had reached then.  The most recent
    ``MAX_MARKERS``; ``{"markers": [{x, kind, level, text}], "left_out": n}``."""
    run = require_run(handle, run_id)
    wanted = {level.strip() for level in levels.split(",") if level.strip()}
    t0 = run["started"] or run["created"]
    found = [
        {"t": e["timestamp"] - t0, "kind": "event", "level": e["level"], "text": e["message"]}
        for e in handle.store.events(run_id) if e["level"] in wanted
    ]
    for alert in run_alerts(handle.db, run_id):
        fired = alert.get("fired_at")
        if fired:
            found.append({"t": timestamp(fired) - t0, "kind": "alert", "level": alert["status"],
                          "text": f"alert {alert['alert'].get('name')} fired"})
    found.sort(key=lambda m: m["t"])
    left_out = max(0, len(found) - MAX_MARKERS)
    found = found[left_out:]
    if x == "time":
        places: list[float | None] = [m["t"] for m in found]
    else:
        counts = handle.store.metric_counts(run_id)
        longest = max((n for n in counts if not n.startswith("resources/")), key=lambda n: counts[n], default=None)
        if longest is None:
            places = [None] * len(found)
        else:
            raw = handle.store.metric_columns(run_id, longest, ("times", "steps"))
            places = positions((m["t"] for m in found), np.frombuffer(raw["times"], dtype="<f8"),
                               np.frombuffer(raw["steps"], dtype="<i8").astype(np.float64))
    return SafeJSONResponse({
        "markers": [{"x": place, "kind": m["kind"], "level": m["level"], "text": m["text"]}
                    for m, place in zip(found, places) if place is not None],
        "left_out": left_out,
    })


@router.get("/dashboard/runs/{run_id}/artifacts")
def artifacts(run_id: str, request: Request, handle: DataHandle):
    """The run's artifacts: those sent to this server (with their download ``url``) and, for a
    store served by ``simvue ui``, those its own runs saved (``url`` null: the content comes
    from ``…/artifacts/content?name=``, with the token)."""
    require_run(handle, run_id)
    sent = run_artifacts(request, handle, run_id)
    names = {a["name"] for a in sent}
    kept = [
        {"name": a["name"], "category": a["category"], "size": a["size"], "mime_type": a["mime_type"],
         "created": iso(a["created"]), "url": None, "local": True}
        for a in handle.store.artifacts(run_id) if a["name"] not in names
    ]
    return SafeJSONResponse(sent + kept)


@router.get("/dashboard/runs/{run_id}/artifacts/content")
def artifact_content(run_id: str, handle: DataHandle, name: str):
    """The content of the run's artifact ``name`` from the store (see ``artifacts``)."""
    require_run(handle, run_id)
    try:
        content = handle.store.artifact_bytes(run_id, name)
    except (KeyError, OSError):
        raise not_found("artifact", name) from None
    row = next((a for a in handle.store.artifacts(run_id) if a["name"] == name), None)
    media = (row or {}).get("mime_type") or "application/octet-stream"
    return Response(content, media_type=media, headers={"Content-Disposition": "attachment"})
