"""``/api/runs``: create, read, list, edit and delete runs; heartbeats and abort requests.

A run's core fields live in the store's ``runs`` table, so the store's rule applies: a
``running`` run whose last heartbeat is older than its ``heartbeat_timeout`` reads ``lost``
(``null`` means never).  Heartbeats come from ``PUT .../heartbeat`` and from every metric or
event batch.  ``PUT`` is a partial update: metadata is merged into the run's, tags and alerts
replace the run's.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import threading
import time
from typing import Annotated, Any, Literal

from fastapi import Header, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ... import validation
from ...names import random_name
from ...store import StoreBatch, new_id
from ..auth import TOKEN_SUBJECT
from ..db import Handle, delete_runs, drop_unused_blobs, is_starred, set_starred
from ..query import QueryError, dotted, order, parse_filters, parse_sorting, select
from . import (
    DataHandle,
    Filters,
    FolderPath,
    IsoTime,
    Metadata,
    Page,
    Tag,
    bad_request,
    checked_router,
    iso,
    require_run,
)
from .alerts import alert_definition, attach_alerts, run_alerts
from .folders import Starred, ensure_folder
from .tags import adopt_tags

router = checked_router()

DEFAULT_HEARTBEAT_TIMEOUT_S = 180.0

RunStatus = Literal["created", "running", "completed", "failed", "terminated", "lost"]
RunName = Annotated[str, StringConstraints(min_length=1, max_length=validation.MAX_NAME_LENGTH)]
Seconds = Annotated[float, Field(gt=0)]


class RunFields(BaseModel):
    """What both creating and updating a run may send (unknown keys are ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: RunName | None = None
    description: str | None = None
    tags: list[Tag] | None = None
    metadata: Metadata | None = None
    system: dict[str, Any] | None = None
    alerts: list[str] | None = None
    ttl: int | None = None
    notifications: dict[str, Any] | None = None
    visibility: dict[str, Any] | None = None
    started: IsoTime | None = None
    endtime: IsoTime | None = None


class RunCreate(RunFields):
    folder: FolderPath = "/"
    status: RunStatus = "created"
    heartbeat_timeout: Seconds | None = DEFAULT_HEARTBEAT_TIMEOUT_S
    created: IsoTime | None = None


class RunUpdate(RunFields):
    folder: FolderPath | None = None
    status: RunStatus | None = None
    heartbeat_timeout: Seconds | None = None


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reason: str | None = None


def _update_batch(status: str | None, endtime: float | None, metadata: dict | None) -> StoreBatch:
    """The store's part of a run update: metadata to merge and the status.  A final status sets
    the end time if the client did not; ``running`` counts as a heartbeat, so that a run created
    long before it starts is not born lost."""
    now = time.time()
    ended = endtime if endtime is not None else now if status in validation.FINAL_STATUSES else None
    return StoreBatch(
        metadata=metadata or {}, status=status, ended=ended, heartbeat=now if status == "running" else None
    )


def _set_server_fields(db: sqlite3.Connection, run_id: str, body: RunFields) -> None:
    db.execute("INSERT OR IGNORE INTO server_runs (run_id) VALUES (?)", (run_id,))
    for field in sorted({"ttl", "notifications", "visibility"} & body.model_fields_set):
        value = getattr(body, field)
        db.execute(
            f"UPDATE server_runs SET {field}=? WHERE run_id=?",
            (value if field == "ttl" else json.dumps(value or {}), run_id),
        )
    if body.alerts is not None:
        attach_alerts(db, run_id, body.alerts)
    if body.tags:
        adopt_tags(db, body.tags)


def _seconds(timeout: float | None) -> float | int | None:
    """A heartbeat timeout as answered: whole seconds as an int; an infinite one (which an
    older server could store) never expires, which is what null says."""
    if timeout is None or not math.isfinite(timeout):
        return None
    return int(timeout) if timeout == int(timeout) else timeout


def _runtime(run: dict) -> str | None:
    """How long the run has run, as ``HH:MM:SS.ffffff`` (what the upstream client parses;
    hours go past 24 for longer runs): from its start to its end, to now while it runs, or to
    its last heartbeat for a run that stopped without an end.  None before it starts."""
    started = run["started"]
    if started is None:
        return None
    if run["ended"] is not None:
        end = run["ended"]
    elif run["status"] == "running":
        end = time.time()
    else:
        end = run["heartbeat"] or started
    try:
        micros = max(0, round((end - started) * 1e6))
    except (ValueError, OverflowError):  # a time an older server stored that is not a number
        return None
    minutes, micros = divmod(micros, 60_000_000)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{micros // 1_000_000:02d}.{micros % 1_000_000:06d}"


def _event_counts(handle: Handle, run_id: str) -> dict[str, dict[str, int]]:
    rows = handle.db.execute("SELECT level, COUNT(*) FROM events WHERE run_id=? GROUP BY level", (run_id,))
    return {level: {"count": count} for level, count in rows}


def run_response(handle: Handle, run: dict, *, summaries: bool = True) -> dict:
    """The run object of the API, from the store's view of the run.  ``summaries=False``: each
    metric with its ``count`` only, without reading its values (the dashboard, which refreshes
    a growing run every few seconds, needs no more)."""
    row = handle.db.execute(
        "SELECT ttl, visibility, notifications FROM server_runs WHERE run_id=?", (run["id"],)
    ).fetchone()
    ttl, visibility, notifications = row or (None, "{}", '{"state": "none"}')
    timeout = run["heartbeat_timeout_s"]
    return {
        "id": run["id"],
        "name": run["name"],
        "folder": run["folder"],
        "status": run["status"],
        "description": run["description"],
        "tags": run["tags"],
        "metadata": run["metadata"],
        "system": run["system"],
        "created": iso(run["created"]),
        "started": iso(run["started"]),
        "endtime": iso(run["ended"]),
        "runtime": _runtime(run),
        "last_heartbeat": iso(run["heartbeat"]),
        "heartbeat_timeout": _seconds(timeout),
        "ttl": ttl,
        "visibility": json.loads(visibility),
        "notifications": json.loads(notifications),
        "alerts": run_alerts(handle.db, run["id"]),
        "metrics": metric_summaries(handle, run["id"]) if summaries else {
            name: {"count": count} for name, count in handle.store.metric_counts(run["id"]).items()},
        "events": _event_counts(handle, run["id"]),
        "user": TOKEN_SUBJECT,  # one user per server: whoever holds a token
        "starred": is_starred(handle.db, "run", run["id"]),
    }


# (store path, run id, metric, points) -> summary: a series only grows, so its point count says
# whether a summary is still right.  Bounded: the oldest entries go first.
_SUMMARIES: dict[tuple[str, str, str, int], dict[str, float | int | None]] = {}
_SUMMARIES_LOCK = threading.Lock()  # handlers run on a thread pool
MAX_CACHED_SUMMARIES = 20_000


def metric_summaries(handle: Handle, run_id: str) -> dict[str, dict[str, float | int | None]]:
    """Each metric of the run as run objects show it: ``count``, ``min``, ``max``, ``mean`` and
    ``last`` (the last value logged), non-finite values left out of the first three."""
    import numpy as np

    out = {}
    for name, count in handle.store.metric_counts(run_id).items():
        key = (str(handle.store.path), run_id, name, count)
        summary = _SUMMARIES.get(key)
        if summary is None:
            values = np.frombuffer(handle.store.metric_columns(run_id, name, ("values",))["values"], dtype="<f8")
            finite = values[np.isfinite(values)]
            last = float(values[-1]) if values.size else None
            summary = {
                "count": count,
                "min": float(finite.min()) if finite.size else None,
                "max": float(finite.max()) if finite.size else None,
                "mean": float(finite.mean()) if finite.size else None,
                "last": last if last is None or math.isfinite(last) else None,
            }
            with _SUMMARIES_LOCK:
                while len(_SUMMARIES) >= MAX_CACHED_SUMMARIES:
                    del _SUMMARIES[next(iter(_SUMMARIES))]
                _SUMMARIES[key] = summary
        out[name] = summary
    return out


def _claim_creation(handle: Handle, key: str, run_id: str) -> str | None:
    """Record that request ``key`` creates ``run_id``; or the run an earlier request with
    that key created (or is creating)."""
    with handle.transaction() as db:
        row = db.execute("SELECT run_id FROM server_run_keys WHERE key=?", (key,)).fetchone()
        if row is None:
            db.execute("INSERT INTO server_run_keys (key, run_id) VALUES (?, ?)", (key, run_id))
            return None
        return row[0]


MAX_BATCH_RUNS = 1000


@router.post("/runs")
def create_run(
    body: RunCreate | list[RunCreate], handle: DataHandle, idempotency_key: Annotated[str | None, Header()] = None
):
    """Create a run, or a batch of runs (a list: answered with a list of runs, in order).
    With ``Idempotency-Key``, a repeat of the request answers the run the first one created
    instead of making another (a client that stopped waiting retries); batches take no key."""
    if isinstance(body, list):
        if idempotency_key is not None:
            raise bad_request("a batch of runs cannot be made idempotent: send each run with its own key")
        if len(body) > MAX_BATCH_RUNS:
            raise bad_request(f"at most {MAX_BATCH_RUNS} runs per batch")
        for entry in body:  # an unknown alert anywhere (404) before any run is made
            for alert_id in entry.alerts or []:
                alert_definition(handle.db, alert_id)
        made = []
        for entry in body:
            ensure_folder(handle, entry.folder)
            made.append(_create_run(handle, new_id(), entry))
        return made
    ensure_folder(handle, body.folder)
    run_id = new_id()
    if idempotency_key is not None:
        earlier = _claim_creation(handle, idempotency_key, run_id)
        if earlier is not None:
            try:
                return run_response(handle, require_run(handle, earlier))
            except HTTPException:  # the first request is still creating it: come back shortly
                raise HTTPException(
                    status_code=503, detail=f"run {earlier!r} is still being created", headers={"Retry-After": "1"}
                ) from None
    try:
        return _create_run(handle, run_id, body)
    except BaseException:
        if idempotency_key is not None:  # no run came of it: a retry must be able to create one
            with handle.transaction() as db:
                db.execute("DELETE FROM server_run_keys WHERE key=?", (idempotency_key,))
        raise


def _create_run(handle: Handle, run_id: str, body: RunCreate) -> dict:
    with handle.transaction() as db:  # first: an unknown alert id (404) leaves no half-made run
        _set_server_fields(db, run_id, body)
    handle.store.create_run(
        run_id=run_id,
        name=body.name or random_name(),
        folder=body.folder,
        description=body.description,
        metadata=body.metadata or {},
        tags=body.tags or [],
        status=body.status,
        system=body.system or {},
        heartbeat_timeout_s=body.heartbeat_timeout,
        now=body.started if body.created is None else body.created,
    )
    # A run replayed from a client's cache is dated by the client (created no later than it
    # started), but its heartbeat is now: it must not read "lost" while it is being replayed.
    with handle.transaction() as db:
        db.execute(
            "UPDATE runs SET started=COALESCE(?, started), heartbeat=? WHERE id=?", (body.started, time.time(), run_id)
        )
    if body.endtime is not None or body.status in validation.FINAL_STATUSES:
        handle.store.write(run_id, _update_batch(body.status, body.endtime, None))
    return run_response(handle, require_run(handle, run_id))


class _RunFields:
    """The filter and sort fields of runs; alerts and artifacts are read only if asked for."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @functools.cached_property
    def _alerts(self) -> dict[str, list[tuple[str, str]]]:
        found: dict[str, list[tuple[str, str]]] = {}
        for run_id, name, status in self._db.execute(
            "SELECT r.run_id, a.name, r.status FROM server_run_alerts r JOIN server_alerts a ON a.id = r.alert_id"
        ):
            found.setdefault(run_id, []).append((name, status))
        return found

    @functools.cached_property
    def _artifacts(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for run_id, artifact_id in self._db.execute("SELECT run_id, artifact_id FROM server_run_artifacts"):
            found.setdefault(run_id, []).append(artifact_id)
        return found

    @functools.cached_property
    def _starred(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT object_id FROM server_starred WHERE kind='run'")}

    def __call__(self, run: dict, name: str) -> list | None:
        if name in ("id", "name", "status", "description", "folder", "created", "started"):
            return [run[name]]
        simple = {
            "folder.path": run["folder"],
            "endtime": run["ended"],
            "ended": run["ended"],
            "modified": run["heartbeat"] or run["created"],
            "user": "self",  # one user per server
        }
        if name in simple:
            return [simple[name]]
        if name == "tag":
            return run["tags"]
        if name == "starred":  # the filter "starred"
            return [True] if run["id"] in self._starred else []
        for prefix in ("metadata.", "system."):
            if name.startswith(prefix):
                return dotted(run[prefix[:-1]], name.removeprefix(prefix))
        if name in ("alert.name", "alert.status"):
            return [pair[name == "alert.status"] for pair in self._alerts.get(run["id"], [])]
        if name == "artifact.id":
            return self._artifacts.get(run["id"], [])
        return None


def _sortable(column: str) -> bool:
    return column in ("name", "created", "started", "endtime", "modified") or column.startswith("metadata.")


@router.get("/runs")
def list_runs(
    handle: DataHandle,
    paging: Page,
    filters: Filters = None,
    sorting: str | None = None,
):
    """Runs matching ``filters``, newest first unless ``sorting`` says otherwise."""
    fields = _RunFields(handle.db)
    try:
        runs = select(handle.store.runs()[::-1], parse_filters(filters), fields)
        runs = order(runs, parse_sorting(sorting, _sortable), fields)
    except QueryError as exc:
        raise bad_request(str(exc)) from None
    return {"data": [run_response(handle, run) for run in paging(runs)], "count": len(runs)}


@router.get("/runs/{run_id}")
def get_run(run_id: str, handle: DataHandle):
    return run_response(handle, require_run(handle, run_id))


@router.put("/runs/{run_id}")
def update_run(run_id: str, body: RunUpdate, handle: DataHandle):
    require_run(handle, run_id)
    if body.folder is not None:
        ensure_folder(handle, body.folder)
    sent = body.model_fields_set
    replaced: dict[str, Any] = {}  # columns of the store's runs table that the update replaces
    if body.name is not None:
        replaced["name"] = body.name
    if "description" in sent:
        replaced["description"] = body.description
    if body.folder is not None:
        replaced["folder"] = body.folder
    if body.tags is not None:
        replaced["tags"] = json.dumps(list(dict.fromkeys(body.tags)))
    if body.system is not None:
        replaced["system"] = json.dumps(body.system)
    if "heartbeat_timeout" in sent:
        replaced["heartbeat_timeout_s"] = body.heartbeat_timeout
    if body.started is not None:
        replaced["started"] = body.started
    with handle.transaction() as db:
        _set_server_fields(db, run_id, body)
        if replaced:
            assignments = ", ".join(f"{column}=?" for column in replaced)
            db.execute(f"UPDATE runs SET {assignments} WHERE id=?", (*replaced.values(), run_id))
    handle.store.write(run_id, _update_batch(body.status, body.endtime, body.metadata))
    return run_response(handle, require_run(handle, run_id))


@router.put("/runs/{run_id}/heartbeat")
def heartbeat(run_id: str, handle: DataHandle):
    require_run(handle, run_id)
    handle.store.write(run_id, StoreBatch(heartbeat=time.time()))
    return {"id": run_id}


@router.get("/runs/{run_id}/abort")
def get_abort(run_id: str, handle: DataHandle):
    """Whether someone asked this run to stop; the client polls this before each heartbeat."""
    require_run(handle, run_id)
    row = handle.db.execute(
        "SELECT abort_requested, abort_reason FROM server_runs WHERE run_id=?", (run_id,)
    ).fetchone()
    requested, reason = row or (0, None)
    return {"status": bool(requested), "reason": reason}


@router.put("/runs/{run_id}/abort")
def request_abort(run_id: str, handle: DataHandle, body: AbortRequest | None = None):
    require_run(handle, run_id)
    reason = body.reason if body else None
    with handle.transaction() as db:
        db.execute("INSERT OR IGNORE INTO server_runs (run_id) VALUES (?)", (run_id,))
        db.execute("UPDATE server_runs SET abort_requested=1, abort_reason=? WHERE run_id=?", (reason, run_id))
    return {"id": run_id, "status": True, "reason": reason}


@router.put("/runs/{run_id}/starred")
def star_run(run_id: str, body: Starred, handle: DataHandle):
    """Mark the run as a favourite (``{"starred": true}``) or not."""
    require_run(handle, run_id)
    with handle.transaction() as db:
        set_starred(db, "run", run_id, body.starred)
    return {"id": run_id, "starred": body.starred}


@router.delete("/runs/{run_id}")
def delete_run(run_id: str, request: Request, handle: DataHandle):
    require_run(handle, run_id)
    with handle.transaction() as db:
        checksums = delete_runs(db, [run_id])
    drop_unused_blobs(handle, request.app.state.blobs, checksums)
    return {}  # the upstream client reads an empty answer as done
