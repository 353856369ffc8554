"""``/api/storage``: records of the storage systems artifacts could be kept in (``File`` or ``S3``).

The server keeps these records and answers with them, but stores every artifact in its own data
directory whatever they say: it never connects to S3 or checks a storage.  An S3 storage's
``secret_access_key`` and ``ca_cert`` are kept and never answered.  At most one storage is the
default: making one the default makes the others not.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, StringConstraints

from ...store import new_id
from . import DataHandle, Page, SafeJSONResponse, bad_request, checked_router, iso
from .admin import Name, conflict, fetch_record, given, name_taken, write_record

router = checked_router()

Setting = Annotated[str, StringConstraints(max_length=1 << 16)]  # a CA certificate is a few KiB
_SECRETS = ("secret_access_key", "ca_cert")


class S3Config(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    bucket: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    endpoint_url: Setting | None = None
    region_name: Setting | None = None
    access_key_id: Setting | None = None
    secret_access_key: Setting | None = None
    ca_cert: Setting | None = None


class StorageUpdate(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Name | None = None
    config: S3Config | None = None
    disable_check: bool | None = None
    is_tenant_useable: bool | None = None
    is_default: bool | None = None
    is_enabled: bool | None = None


class StorageCreate(StorageUpdate):
    name: Name
    backend: Literal["S3", "File"]


def _storage(db: sqlite3.Connection, storage_id: str) -> dict[str, Any]:
    return fetch_record(db, "server_storage", "storage", storage_id)


def _answer(record: dict[str, Any]) -> dict[str, Any]:
    config = {key: value for key, value in json.loads(record["config"]).items() if key not in _SECRETS}
    return record | {"config": config, "created": iso(record["created"])}


def _fields(db: sqlite3.Connection, body: StorageUpdate, backend: str, config: dict[str, Any]) -> dict[str, Any]:
    """The columns to write: ``config`` merged with the body's, which only S3 has."""
    fields = given(body)
    if body.config is not None:
        if backend != "S3":
            raise bad_request(f"a {backend} storage has no config")
        fields["config"] = json.dumps(config | given(body.config))
    if fields.get("is_default"):
        db.execute("UPDATE server_storage SET is_default=0")
    return fields


@router.get("/storage")
def list_storage(handle: DataHandle, paging: Page) -> list[dict[str, Any]]:
    """Every storage, oldest first (a plain list, as the upstream client reads it)."""
    ids = [row[0] for row in handle.db.execute("SELECT id FROM server_storage ORDER BY created, id")]
    return [_answer(_storage(handle.db, storage_id)) for storage_id in paging(ids)]


@router.post("/storage", response_model=None)
def create_storage(body: StorageCreate, handle: DataHandle) -> dict[str, Any] | SafeJSONResponse:
    """A new storage; an S3 one needs ``config.bucket``.  409 with the existing storage's ``id``
    if the name is taken."""
    if body.backend == "S3" and (body.config is None or body.config.bucket is None):
        raise HTTPException(status_code=422, detail="an S3 storage needs config.bucket")
    storage_id = new_id()
    with handle.transaction() as db:
        if existing := name_taken(db, "server_storage", "name", body.name):
            return conflict("storage", body.name, existing)
        write_record(db, "server_storage", storage_id, _fields(db, body, body.backend, {}), new=True)
    return get_storage(storage_id, handle)


@router.get("/storage/{storage_id}")
def get_storage(storage_id: str, handle: DataHandle) -> dict[str, Any]:
    return _answer(_storage(handle.db, storage_id))


@router.put("/storage/{storage_id}")
def update_storage(storage_id: str, body: StorageUpdate, handle: DataHandle) -> dict[str, Any]:
    """Change a storage's fields; ``config`` is merged into its config (409 if the new name is taken)."""
    with handle.transaction() as db:
        record = _storage(db, storage_id)
        if name_taken(db, "server_storage", "name", body.name, storage_id):
            raise HTTPException(status_code=409, detail=f"another storage is named {body.name!r}")
        fields = _fields(db, body, record["backend"], json.loads(record["config"]))
        write_record(db, "server_storage", storage_id, fields, new=False)
    return get_storage(storage_id, handle)


@router.delete("/storage/{storage_id}")
def delete_storage(storage_id: str, handle: DataHandle) -> dict[str, Any]:
    with handle.transaction() as db:
        _storage(db, storage_id)
        db.execute("DELETE FROM server_storage WHERE id=?", (storage_id,))
    return {"id": storage_id}
