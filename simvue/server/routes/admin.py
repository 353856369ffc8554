"""``/api/tenants``, ``/api/users``, ``/api/whoami`` and ``/api/stats``: the administrator's view.

The server is single-tenant and whoever holds a token is its administrator, so these are
records the server keeps and answers with, and nothing more: a tenant's limits and a user's
roles or ``is_enabled`` do not change what a token may do.  The token's user (named by the
token's subject) always exists, in the oldest tenant (``default`` on a new server); it cannot
be deleted, and a tenant cannot be deleted while it has users.  Every run, alert, tag and
artifact belongs to the token's user, which is what ``/api/stats`` counts.
"""

from __future__ import annotations

import collections
import sqlite3
import time
from typing import Annotated, Any

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ... import validation
from ...store import new_id
from ..auth import TOKEN_SUBJECT, check_authorization
from ..bodies import INT_MAX
from ..db import ensure_user
from . import DataHandle, Page, SafeJSONResponse, checked_router, iso, not_found

router = checked_router()

Name = Annotated[str, StringConstraints(min_length=1, max_length=validation.MAX_NAME_LENGTH, pattern=r"\S")]
Email = Annotated[str, StringConstraints(max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
Fullname = Annotated[str, StringConstraints(max_length=validation.MAX_NAME_LENGTH)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=validation.MAX_NAME_LENGTH)]
Count = Annotated[int, Field(ge=0, le=INT_MAX)]  # 0 is no limit
_BOOLEANS = ("is_enabled", "is_manager", "is_admin", "is_readonly", "welcome", "disable_check",
             "is_tenant_useable", "is_default")


class TenantUpdate(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Name | None = None
    is_enabled: bool | None = None
    max_request_rate: Count | None = None
    max_runs: Count | None = None
    max_data_volume: Count | None = None


class TenantCreate(TenantUpdate):
    name: Name


class UserFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    username: Name | None = None
    fullname: Fullname | None = None
    email: Email | None = None
    is_manager: bool | None = None
    is_admin: bool | None = None
    is_readonly: bool | None = None
    is_enabled: bool | None = None
    welcome: bool | None = None


class UserBody(UserFields):
    """The upstream client sends a user's fields both flat and under ``user``; either will do."""

    user: UserFields | None = None
    tenant: Identifier | None = None

    def fields(self) -> dict[str, Any]:
        nested = given(self.user) if self.user else {}
        return nested | {key: value for key, value in given(self).items() if key not in ("user", "tenant")}


def given(body: BaseModel) -> dict[str, Any]:
    """The fields a body sets to a value (null leaves a field as it is)."""
    return {key: value for key, value in body.model_dump(exclude_unset=True).items() if value is not None}


def fetch_record(db: sqlite3.Connection, table: str, kind: str, record_id: str) -> dict[str, Any]:
    """Row ``record_id`` of ``table`` as a dictionary with booleans, or a 404."""
    cursor = db.execute(f"SELECT * FROM {table} WHERE id=?", (record_id,))
    row = cursor.fetchone()
    if row is None:
        raise not_found(kind, record_id)
    record = dict(zip([column[0] for column in cursor.description], row))
    return {key: bool(value) if key in _BOOLEANS else value for key, value in record.items()}


def write_record(db: sqlite3.Connection, table: str, record_id: str, fields: dict[str, Any], *, new: bool) -> None:
    """Insert row ``record_id`` with ``fields``, or set them on it; the columns are a model's field names."""
    if new:
        columns = ["id", "created", *fields]
        db.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                   (record_id, time.time(), *fields.values()))
    elif fields:
        db.execute(f"UPDATE {table} SET {', '.join(f'{column}=?' for column in fields)} WHERE id=?",
                   (*fields.values(), record_id))


def name_taken(db: sqlite3.Connection, table: str, column: str, value: str | None, record_id: str = "") -> str | None:
    """The id of another row of ``table`` whose ``column`` is ``value``, if there is one."""
    row = db.execute(f"SELECT id FROM {table} WHERE {column}=? AND id!=?", (value, record_id)).fetchone()
    return row[0] if row else None


def conflict(kind: str, name: str, existing: str) -> SafeJSONResponse:
    """409, with the existing object's ``id`` (which the upstream client takes as the one it made)."""
    return SafeJSONResponse(status_code=409, content={"detail": f"a {kind} named {name!r} exists", "id": existing})


def _answer(record: dict[str, Any]) -> dict[str, Any]:
    return record | {"created": iso(record["created"])}


# Tenants


@router.get("/tenants")
def list_tenants(handle: DataHandle, paging: Page) -> dict[str, Any]:
    ids = [row[0] for row in handle.db.execute("SELECT id FROM server_tenants ORDER BY created, id")]
    return {"data": [_answer(fetch_record(handle.db, "server_tenants", "tenant", i)) for i in paging(ids)],
            "count": len(ids)}


@router.post("/tenants", response_model=None)
def create_tenant(body: TenantCreate, handle: DataHandle) -> dict[str, Any] | SafeJSONResponse:
    """A new tenant; 409 with the existing tenant's ``id`` if the name is taken."""
    tenant_id = new_id()
    with handle.transaction() as db:
        if existing := name_taken(db, "server_tenants", "name", body.name):
            return conflict("tenant", body.name, existing)
        write_record(db, "server_tenants", tenant_id, given(body), new=True)
    return get_tenant(tenant_id, handle)


@router.get("/tenants/{tenant_id}")
def get_tenant(tenant_id: str, handle: DataHandle) -> dict[str, Any]:
    return _answer(fetch_record(handle.db, "server_tenants", "tenant", tenant_id))


@router.put("/tenants/{tenant_id}")
def update_tenant(tenant_id: str, body: TenantUpdate, handle: DataHandle) -> dict[str, Any]:
    with handle.transaction() as db:
        fetch_record(db, "server_tenants", "tenant", tenant_id)
        if name_taken(db, "server_tenants", "name", body.name, tenant_id):
            raise HTTPException(status_code=409, detail=f"another tenant is named {body.name!r}")
        write_record(db, "server_tenants", tenant_id, given(body), new=False)
    return get_tenant(tenant_id, handle)


@router.delete("/tenants/{tenant_id}")
def delete_tenant(tenant_id: str, handle: DataHandle) -> dict[str, Any]:
    """Delete a tenant that has no users (409 while it has)."""
    with handle.transaction() as db:
        fetch_record(db, "server_tenants", "tenant", tenant_id)
        (users,) = db.execute("SELECT COUNT(*) FROM server_users WHERE tenant_id=?", (tenant_id,)).fetchone()
        if users:
            raise HTTPException(status_code=409, detail=f"tenant {tenant_id!r} has {users} user(s): delete them first")
        db.execute("DELETE FROM server_tenants WHERE id=?", (tenant_id,))
    return {"id": tenant_id}


# Users


def _user_answer(record: dict[str, Any]) -> dict[str, Any]:
    tenant = record.pop("tenant_id")
    return _answer(record) | {"tenant": tenant, "is_deleted": False}


def _require_tenant(db: sqlite3.Connection, tenant_id: str) -> None:
    fetch_record(db, "server_tenants", "tenant", tenant_id)


@router.get("/users")
def list_users(handle: DataHandle, paging: Page) -> dict[str, Any]:
    ids = [row[0] for row in handle.db.execute("SELECT id FROM server_users ORDER BY created, id")]
    return {"data": [_user_answer(fetch_record(handle.db, "server_users", "user", i)) for i in paging(ids)],
            "count": len(ids)}


@router.post("/users", response_model=None)
def create_user(body: UserBody, handle: DataHandle) -> dict[str, Any] | SafeJSONResponse:
    """A new user in ``tenant`` (by default the token's user's); 409 with the existing user's
    ``id`` if the username is taken."""
    fields = body.fields()
    if "username" not in fields:
        raise HTTPException(status_code=422, detail="a user needs a username")
    user_id = new_id()
    with handle.transaction() as db:
        if existing := name_taken(db, "server_users", "username", fields["username"]):
            return conflict("user", fields["username"], existing)
        if body.tenant is None:
            (tenant,) = db.execute("SELECT tenant_id FROM server_users WHERE id=?",
                                   (ensure_user(db, TOKEN_SUBJECT),)).fetchone()
        else:
            _require_tenant(db, tenant := body.tenant)
        write_record(db, "server_users", user_id, {"fullname": fields["username"], "tenant_id": tenant} | fields,
                     new=True)
    return get_user(user_id, handle)


@router.get("/users/{user_id}")
def get_user(user_id: str, handle: DataHandle) -> dict[str, Any]:
    return _user_answer(fetch_record(handle.db, "server_users", "user", user_id))


@router.put("/users/{user_id}")
def update_user(user_id: str, body: UserBody, handle: DataHandle) -> dict[str, Any]:
    """Change a user's fields, or move it to another tenant (409 if the new username is taken)."""
    fields = body.fields()
    with handle.transaction() as db:
        fetch_record(db, "server_users", "user", user_id)
        if name_taken(db, "server_users", "username", fields.get("username"), user_id):
            raise HTTPException(status_code=409, detail=f"another user is named {fields['username']!r}")
        if body.tenant is not None:
            _require_tenant(db, body.tenant)
            fields["tenant_id"] = body.tenant
        write_record(db, "server_users", user_id, fields, new=False)
    return get_user(user_id, handle)


@router.delete("/users/{user_id}")
def delete_user(user_id: str, request: Request, handle: DataHandle) -> dict[str, Any]:
    """Delete a user other than the token's own (409)."""
    with handle.transaction() as db:
        user = fetch_record(db, "server_users", "user", user_id)
        if user["username"] == _subject(request):
            raise HTTPException(status_code=409, detail="the token's own user cannot be deleted")
        db.execute("DELETE FROM server_users WHERE id=?", (user_id,))
    return {"id": user_id}


def _subject(request: Request) -> str:
    """The request's token's subject (the token has been checked already)."""
    return check_authorization(request.app.state.secret, request.headers.get("authorization"))


@router.get("/whoami")
def whoami(request: Request, handle: DataHandle) -> dict[str, Any]:
    """The token's user."""
    with handle.transaction() as db:
        user_id = ensure_user(db, _subject(request))
    return get_user(user_id, handle)


# Statistics


def _owned_totals(db: sqlite3.Connection, runs: int) -> dict[str, int]:
    """What the token's user owns: everything on the server."""

    def number(sql: str) -> int:
        return int(db.execute(sql).fetchone()[0] or 0)

    return {
        "runs": runs,
        "alerts": number("SELECT COUNT(*) FROM server_alerts"),
        "tags": number("SELECT COUNT(*) FROM (SELECT name FROM server_tags"
                       " UNION SELECT t.value FROM runs, json_each(runs.tags) AS t)"),
        "files": number("SELECT COUNT(*) FROM server_artifacts"),
        "volume": number("SELECT SUM(size) FROM server_artifacts"),
        "events": number("SELECT COUNT(*) FROM events"),
        "metrics": number("SELECT SUM(count) FROM metric_chunks"),
    }


@router.get("/stats")
def stats(handle: DataHandle, single: bool = True, tenant: str | None = None) -> dict[str, Any]:
    """Runs by status and the bytes of artifact content (``data``); with ``single=false``, what
    each user (of ``tenant``, if given) owns, by username."""
    statuses = collections.Counter(run["status"] for run in handle.store.runs())
    totals = _owned_totals(handle.db, sum(statuses.values()))
    if single:
        return {"runs": {status: statuses[status] for status in validation.RUN_STATUSES} | {"data": totals["volume"]}}
    if tenant is not None:
        _require_tenant(handle.db, tenant)
    rows = handle.db.execute("SELECT username FROM server_users WHERE ?1 IS NULL OR tenant_id=?1 ORDER BY created, id",
                             (tenant,)).fetchall()
    return {name: totals if name == TOKEN_SUBJECT else dict.fromkeys(totals, 0) for (name,) in rows}
