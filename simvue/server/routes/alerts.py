"""``/api/alerts``: alert definitions, and their status per run.

The server stores alerts and the status clients give them (``ok`` or ``critical``) for each
run they are attached to; it does not evaluate metric or event rules itself.  With
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
from . import DataHandle, Page, SafeJSONResponse, checked_router, iso, not_found, require_run

router = checked_router()

AlertStatus = Literal["ok", "critical"]


class AlertCreate(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: Annotated[str, StringConstraints(min_length=1)]
    description: str | None = None
    notification: Literal["none", "email"] = "none"
    source: Literal["metrics", "events", "user"]
    enabled: bool = True
    abort: bool = False
    alert: dict[str, Any] | None = None


class AlertStatusUpdate(BaseModel):
    model_config = ConfigDict(strict=True)
    status: AlertStatus


def _alert_object(row: tuple) -> dict:
    alert_id, definition, created = row
    # after the definition: an extra field called "id" or "created" must not replace them
    return {**json.loads(definition), "id": alert_id, "created": iso(created)}


def _alert(db: sqlite3.Connection, alert_id: str) -> dict:
    row = db.execute("SELECT id, definition, created FROM server_alerts WHERE id=?", (alert_id,)).fetchone()
    if row is None:
        raise not_found("alert", alert_id)
    return _alert_object(row)


def run_alerts(db: sqlite3.Connection, run_id: str) -> list[dict]:
    """The alerts attached to a run, as run objects show them: ``{"alert": {...}, "status": ...}``."""
    rows = db.execute(
        "SELECT a.id, a.definition, a.created, r.status FROM server_run_alerts r"
        " JOIN server_alerts a ON a.id = r.alert_id WHERE r.run_id=? ORDER BY a.created",
        (run_id,),
    ).fetchall()
    return [{"alert": _alert_object(row[:3]), "status": row[3]} for row in rows]


def attach_alerts(db: sqlite3.Connection, run_id: str, alert_ids: list[str]) -> None:
    """Make ``alert_ids`` the run's alerts: new ones start ``ok``, kept ones keep their status.

    Call inside a transaction.
    """
    wanted = dict.fromkeys(alert_ids)  # a list may repeat an id
    for alert_id in wanted:
        _alert(db, alert_id)
    # Compared here rather than in one "NOT IN (?, ?, ...)": SQLite takes at most 32,766 values.
    attached = [row[0] for row in db.execute("SELECT alert_id FROM server_run_alerts WHERE run_id=?", (run_id,))]
    db.executemany(
        "DELETE FROM server_run_alerts WHERE run_id=? AND alert_id=?",
        [(run_id, alert_id) for alert_id in attached if alert_id not in wanted],
    )
    db.executemany(
        "INSERT OR IGNORE INTO server_run_alerts (run_id, alert_id) VALUES (?, ?)",
        [(run_id, alert_id) for alert_id in wanted],
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
    return _alert(handle.db, alert_id)


@router.get("/alerts")
def list_alerts(
    handle: DataHandle,
    paging: Page,
):
    rows = handle.db.execute("SELECT id, definition, created FROM server_alerts ORDER BY created").fetchall()
    return {"data": [_alert_object(row) for row in paging(rows)], "count": len(rows)}


@router.get("/alerts/{alert_id}")
def get_alert(alert_id: str, handle: DataHandle):
    return _alert(handle.db, alert_id)


@router.get("/alerts/{alert_id}/status/{run_id}")
def get_alert_status(alert_id: str, run_id: str, handle: DataHandle):
    _alert(handle.db, alert_id)
    require_run(handle, run_id)
    row = handle.db.execute(
        "SELECT status FROM server_run_alerts WHERE run_id=? AND alert_id=?", (run_id, alert_id)
    ).fetchone()
    if row is None:
        raise not_found(f"alert attached to run {run_id!r}", alert_id)
    return {"id": alert_id, "run": run_id, "status": row[0]}


@router.put("/alerts/{alert_id}/status/{run_id}")
def set_alert_status(alert_id: str, run_id: str, body: AlertStatusUpdate, handle: DataHandle):
    """Set the alert's status for the run, attaching the alert to the run if it was not."""
    require_run(handle, run_id)
    with handle.transaction() as db:
        _alert(db, alert_id)
        db.execute(
            "INSERT INTO server_run_alerts (run_id, alert_id, status) VALUES (?,?,?)"
            " ON CONFLICT (run_id, alert_id) DO UPDATE SET status=excluded.status",
            (run_id, alert_id, body.status),
        )
    return {"id": alert_id, "run": run_id, "status": body.status}
