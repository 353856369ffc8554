"""``/api/alerts``: alert definitions, and their status per run.

The server stores alerts and the status clients give them (``ok`` or ``critical``) for each
run they are attached to, and when the alert first went critical for that run (``fired_at``:
the time the client gives, else the time the server heard of it); it does not evaluate
metric or event rules itself.  With
``?deduplicate=True`` a second alert of the same name is not created: the answer is 409 with
the existing alert's ``id``, which Simvue clients treat as success.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

from ...store import new_id
from . import DataHandle, IsoTime, Page, SafeJSONResponse, bad_request, checked_router, iso, not_found, require_run

router = checked_router()

AlertStatus = Literal["ok", "critical"]
# An alert attached to a run whose status no client has set yet (the column predates it and
# cannot hold NULL); answered as null, as Simvue servers do.
UNSET = ""


class AlertCreate(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: Annotated[str, StringConstraints(min_length=1)]
    description: str | None = None
    notification: Literal["none", "email"] = "none"
    source: Literal["metrics", "events", "user"]
    enabled: bool = True
    abort: bool = False
    alert: dict[str, Any] | None = None


class AlertUpdate(BaseModel):
    """A change to an alert's definition: the fields given replace those stored (``alert``, the
    rule, is merged key by key); what an alert watches (``source``) cannot change."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: Annotated[str, StringConstraints(min_length=1)] | None = None
    description: str | None = None
    notification: Literal["none", "email"] | None = None
    source: Literal["metrics", "events", "user"] | None = None
    enabled: bool | None = None
    abort: bool | None = None
    alert: dict[str, Any] | None = None


class AlertStatusUpdate(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    status: AlertStatus
    # When the alert went critical, for a client that reports it late (an upload after the run).
    fired_at: IsoTime | None = None


# Fields the upstream client reads on every alert; an alert defined without them has these.
ALERT_DEFAULTS: dict[str, Any] = {"auto": False, "delay": 0, "run_tags": []}


def _alert_object(row: tuple) -> dict:
    alert_id, definition, created = row
    # after the definition: an extra field called "id" or "created" must not replace them
    return {**ALERT_DEFAULTS, **json.loads(definition), "id": alert_id, "created": iso(created)}


def alert_definition(db: sqlite3.Connection, alert_id: str) -> dict:
    """The alert with this id, as the API answers it, or a 404."""
    row = db.execute("SELECT id, definition, created FROM server_alerts WHERE id=?", (alert_id,)).fetchone()
    if row is None:
        raise not_found("alert", alert_id)
    return _alert_object(row)


def run_alerts(db: sqlite3.Connection, run_id: str) -> list[dict]:
    """The alerts attached to a run, as run objects show them:
    ``{"alert": {...}, "status": ..., "fired_at": ...}``."""
    rows = db.execute(
        "SELECT a.id, a.definition, a.created, r.status, r.fired_at FROM server_run_alerts r"
        " JOIN server_alerts a ON a.id = r.alert_id WHERE r.run_id=? ORDER BY a.created",
        (run_id,),
    ).fetchall()
    return [{"alert": _alert_object(row[:3]), "status": row[3] or None, "fired_at": iso(row[4])} for row in rows]


def attach_alerts(db: sqlite3.Connection, run_id: str, alert_ids: list[str]) -> None:
    """Make ``alert_ids`` the run's alerts: new ones have no status until a client sets one
    (stored as ``UNSET``, answered as null), kept ones keep theirs.

    Call inside a transaction.
    """
    wanted = dict.fromkeys(alert_ids)  # a list may repeat an id
    for alert_id in wanted:
        alert_definition(db, alert_id)
    # Compared here rather than in one "NOT IN (?, ?, ...)": SQLite takes at most 32,766 values.
    attached = [row[0] for row in db.execute("SELECT alert_id FROM server_run_alerts WHERE run_id=?", (run_id,))]
    db.executemany(
        "DELETE FROM server_run_alerts WHERE run_id=? AND alert_id=?",
        [(run_id, alert_id) for alert_id in attached if alert_id not in wanted],
    )
    db.executemany(
        "INSERT OR IGNORE INTO server_run_alerts (run_id, alert_id, status) VALUES (?, ?, ?)",
        [(run_id, alert_id, UNSET) for alert_id in wanted],
    )


@router.post("/alerts")
def create_alert(body: AlertCreate, handle: DataHandle, deduplicate: bool = False):
    with handle.transaction() as db:
        if deduplicate:
            row = db.execute("SELECT id FROM server_alerts WHERE name=? ORDER BY created", (body.name,)).fetchone()
            if row is not None:
                return SafeJSONResponse(
                    status_code=409, content={"detail": f"an alert named {body.name!r} already exists", "id": row[0]}
                )
        alert_id = new_id()
        db.execute(
            "INSERT INTO server_alerts (id, name, definition, created) VALUES (?,?,?,?)",
            (alert_id, body.name, json.dumps(body.model_dump()), time.time()),
        )
    return alert_definition(handle.db, alert_id)


@router.get("/alerts")
def list_alerts(
    handle: DataHandle,
    paging: Page,
):
    rows = handle.db.execute("SELECT id, definition, created FROM server_alerts ORDER BY created").fetchall()
    return {"data": [_alert_object(row) for row in paging(rows)], "count": len(rows)}


@router.get("/alerts/{alert_id}")
def get_alert(alert_id: str, handle: DataHandle):
    return alert_definition(handle.db, alert_id)


def _status(alert_id: str, run_id: str, status: str, fired_at: float | None) -> dict:
    return {"id": alert_id, "run": run_id, "status": status or None, "fired_at": iso(fired_at)}


@router.get("/alerts/{alert_id}/status/{run_id}")
def get_alert_status(alert_id: str, run_id: str, handle: DataHandle):
    alert_definition(handle.db, alert_id)
    require_run(handle, run_id)
    row = handle.db.execute(
        "SELECT status, fired_at FROM server_run_alerts WHERE run_id=? AND alert_id=?", (run_id, alert_id)
    ).fetchone()
    if row is None:
        raise not_found(f"alert attached to run {run_id!r}", alert_id)
    return _status(alert_id, run_id, *row)


@router.put("/alerts/{alert_id}/status/{run_id}")
def set_alert_status(alert_id: str, run_id: str, body: AlertStatusUpdate, handle: DataHandle):
    """Set the alert's status for the run, attaching the alert to the run if it was not.  The
    first ``critical`` records ``fired_at`` (the body's, else now); later changes keep it.  A
    ``critical`` alert defined with ``abort`` asks the run to stop (``GET /runs/{id}/abort``)."""
    require_run(handle, run_id)
    fired_at = (time.time() if body.fired_at is None else body.fired_at) if body.status == "critical" else None
    with handle.transaction() as db:
        alert = alert_definition(db, alert_id)
        if body.status == "critical" and alert.get("abort") is True:
            # an alert that aborts its run: the run's clients see the request at their next poll
            db.execute("INSERT OR IGNORE INTO server_runs (run_id) VALUES (?)", (run_id,))
            db.execute("UPDATE server_runs SET abort_requested=1, abort_reason=? WHERE run_id=?",
                       (f"alert {alert['name']!r} is critical", run_id))
        db.execute(
            "INSERT INTO server_run_alerts (run_id, alert_id, status, fired_at) VALUES (?,?,?,?)"
            " ON CONFLICT (run_id, alert_id) DO UPDATE SET status=excluded.status,"
            " fired_at=COALESCE(server_run_alerts.fired_at, excluded.fired_at)",
            (run_id, alert_id, body.status, fired_at),
        )
        (stored,) = db.execute(
            "SELECT fired_at FROM server_run_alerts WHERE run_id=? AND alert_id=?", (run_id, alert_id)
        ).fetchone()
    return _status(alert_id, run_id, body.status, stored)


@router.put("/alerts/{alert_id}")
def update_alert(alert_id: str, body: AlertUpdate, handle: DataHandle):
    """Change the alert's definition (its name, description, notification, switches, rule);
    answers the alert as it now is.  Its status for each run is kept."""
    changes = body.model_dump(exclude_unset=True)
    with handle.transaction() as db:
        current = alert_definition(db, alert_id)
        if changes.get("source", current.get("source")) != current.get("source"):
            raise bad_request(f"an alert's source cannot change (this one watches {current.get('source')})")
        definition = {k: v for k, v in current.items() if k not in ("id", "created")}
        rule = changes.pop("alert", None)
        if rule is not None:
            definition["alert"] = {**(definition.get("alert") or {}), **rule}
        definition.update({k: v for k, v in changes.items() if v is not None or k == "description"})
        db.execute(
            "UPDATE server_alerts SET name=?, definition=? WHERE id=?",
            (definition["name"], json.dumps(definition), alert_id),
        )
    return alert_definition(handle.db, alert_id)


@router.delete("/alerts/{alert_id}")
def delete_alert(alert_id: str, handle: DataHandle):
    """Remove the alert, and detach it from every run."""
    with handle.transaction() as db:
        alert_definition(db, alert_id)
        db.execute("DELETE FROM server_run_alerts WHERE alert_id=?", (alert_id,))
        db.execute("DELETE FROM server_alerts WHERE id=?", (alert_id,))
    return {"id": alert_id}
