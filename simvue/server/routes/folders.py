"""``/api/folders``: create, list, read and edit folders.

A folder's description, metadata and tags live in the store's ``folders`` table (keyed by
path); its API id (and retention ``ttl``) lives in ``server_folders``.  Creating a path that
exists answers 409 with the existing folder's ``id``, which Simvue clients treat as success.
Folders form a tree: creating ``/a/b/c`` (directly, or by a run in it) creates ``/a`` and
``/a/b`` too, so that a parent can be found, listed and deleted with everything under it.
"""

from __future__ import annotations

import json
import time

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, NonNegativeInt

from ..._util import merge_dicts
from ...store import new_id
from ..db import Handle, delete_runs, drop_unused_blobs, set_starred
from ..query import QueryError, dotted, order, parse_filters, parse_sorting, select
from . import (
    DataHandle,
    Filters,
    FolderPath,
    Metadata,
    Page,
    SafeJSONResponse,
    Tag,
    bad_request,
    checked_router,
    iso,
    not_found,
)

router = checked_router()

_COLUMNS = ("f.id, f.path, f.created, s.description, s.metadata, s.tags, f.ttl,"
            " EXISTS (SELECT 1 FROM server_starred WHERE kind='folder' AND object_id=f.id)")
_FROM = "server_folders f JOIN folders s ON s.path = f.path"


class Starred(BaseModel):
    """``PUT /runs/{id}/starred`` and ``PUT /folders/{id}/starred``: a favourite or not."""

    model_config = ConfigDict(strict=True, extra="ignore")
    starred: bool


class FolderUpdate(BaseModel):
    """Partial update: metadata is merged into the folder's, tags replace its tags."""

    model_config = ConfigDict(strict=True, extra="ignore")
    description: str | None = None
    metadata: Metadata | None = None
    tags: list[Tag] | None = None
    ttl: NonNegativeInt | None = None


class FolderCreate(FolderUpdate):
    path: FolderPath


def ensure_folder(handle: Handle, path: str) -> tuple[str, bool]:
    """The id of the folder at ``path``, creating it (and any parent it lacks) if needed; and
    whether it was created."""
    ancestors = [path[:index] for index in range(1, len(path)) if path[index] == "/"]
    with handle.transaction() as db:
        created = False
        for folder in [*ancestors, path]:
            row = db.execute("SELECT id FROM server_folders WHERE path=?", (folder,)).fetchone()
            if row is not None:
                folder_id = row[0]
                continue
            folder_id, created = new_id(), True
            db.execute("INSERT INTO server_folders (id, path, created) VALUES (?,?,?)", (folder_id, folder, time.time()))
            db.execute("INSERT OR IGNORE INTO folders (path) VALUES (?)", (folder,))
        return folder_id, created


def adopt_store_folders(handle: Handle) -> None:
    """Give an id to every folder the store has but the API does not know yet.

    Runs written by a local ``simvue`` session into the same directory create folders
    through the store alone.
    """
    rows = handle.db.execute(
        "SELECT path FROM folders WHERE path NOT IN (SELECT path FROM server_folders)"
    ).fetchall()
    for (path,) in rows:
        ensure_folder(handle, path)


def _record(row: tuple) -> dict:
    folder_id, path, created, description, metadata, tags, ttl, starred = row
    return {
        "id": folder_id,
        "path": path,
        "name": path.rstrip("/").rpartition("/")[2] or "/",
        "description": description,
        "metadata": json.loads(metadata),
        "tags": json.loads(tags),
        "created": created,
        "ttl": ttl,
        "starred": bool(starred),
    }


def _response(record: dict) -> dict:
    return record | {"created": iso(record["created"])}


def _folder(handle: Handle, folder_id: str) -> dict:
    row = handle.db.execute(f"SELECT {_COLUMNS} FROM {_FROM} WHERE f.id=?", (folder_id,)).fetchone()
    if row is None:
        raise not_found("folder", folder_id)
    return _record(row)


def _update(handle: Handle, path: str, changes: FolderUpdate) -> None:
    with handle.transaction() as db:
        metadata, tags, description = db.execute(
            "SELECT metadata, tags, description FROM folders WHERE path=?", (path,)
        ).fetchone()
        if changes.metadata is not None:
            metadata = json.dumps(merge_dicts(json.loads(metadata), changes.metadata))
        if changes.tags is not None:
            tags = json.dumps(list(dict.fromkeys(changes.tags)))
        if "description" in changes.model_fields_set:
            description = changes.description
        db.execute(
            "UPDATE folders SET metadata=?, tags=?, description=? WHERE path=?", (metadata, tags, description, path)
        )
        if "ttl" in changes.model_fields_set:
            db.execute("UPDATE server_folders SET ttl=? WHERE path=?", (changes.ttl, path))


@router.post("/folders")
def create_folder(body: FolderCreate, handle: DataHandle):
    folder_id, created = ensure_folder(handle, body.path)
    if not created:
        return SafeJSONResponse(
            status_code=409, content={"detail": f"folder {body.path!r} already exists", "id": folder_id}
        )
    _update(handle, body.path, body)
    return _response(_folder(handle, folder_id))


def _folder_fields(folder: dict, name: str) -> list | None:
    if name in ("path", "name", "description", "id", "created"):
        return [folder[name]]
    if name == "modified":  # a folder's own fields change rarely: its creation stands for it
        return [folder["created"]]
    if name == "tag":
        return folder["tags"]
    if name == "starred":  # the filter "starred"
        return [True] if folder["starred"] else []
    if name.startswith("metadata."):
        return dotted(folder["metadata"], name.removeprefix("metadata."))
    return None


def _sortable(column: str) -> bool:
    return column in ("path", "name", "created", "modified") or column.startswith("metadata.")


@router.get("/folders")
def list_folders(
    handle: DataHandle,
    paging: Page,
    filters: Filters = None,
    sorting: str | None = None,
):
    """Folders matching ``filters``, newest first unless ``sorting`` says otherwise (as runs:
    a folder just made is on the first page)."""
    rows = handle.db.execute(f"SELECT {_COLUMNS} FROM {_FROM} ORDER BY f.created DESC, f.rowid DESC").fetchall()
    try:
        folders = select([_record(row) for row in rows], parse_filters(filters), _folder_fields)
        folders = order(folders, parse_sorting(sorting, _sortable), _folder_fields)
    except QueryError as exc:
        raise bad_request(str(exc)) from None
    return {"data": [_response(f) for f in paging(folders)], "count": len(folders)}


@router.put("/folders/{folder_id}/starred")
def star_folder(folder_id: str, body: Starred, handle: DataHandle):
    """Mark the folder as a favourite (``{"starred": true}``) or not."""
    _folder(handle, folder_id)
    with handle.transaction() as db:
        set_starred(db, "folder", folder_id, body.starred)
    return {"id": folder_id, "starred": body.starred}


@router.get("/folders/{folder_id}")
def get_folder(folder_id: str, handle: DataHandle):
    return _response(_folder(handle, folder_id))


@router.put("/folders/{folder_id}")
def update_folder(folder_id: str, body: FolderUpdate, handle: DataHandle):
    folder = _folder(handle, folder_id)
    _update(handle, folder["path"], body)
    return _response(_folder(handle, folder_id))


@router.delete("/folders/{folder_id}")
def delete_folder(
    folder_id: str, request: Request, handle: DataHandle, recursive: bool = False, runs: bool = False,
    runs_only: bool = False,
):
    """Delete a folder.  ``runs_only`` deletes the folder's runs (with ``runs``) and keeps the
    folder; otherwise the folder goes, with its subfolders if ``recursive`` and the runs in
    them if ``runs``.  A folder that still holds subfolders or runs it was not asked to delete
    is a 409, and nothing is deleted.  Answers ``{"folders": [ids], "runs": [ids]}``."""
    folder = _folder(handle, folder_id)
    path = folder["path"]
    inside = path.rstrip("/") + "/"
    with handle.transaction() as db:
        rows = db.execute("SELECT id, path FROM server_folders").fetchall()
        below = [(fid, p) for fid, p in rows if p.startswith(inside) and p != path]
        paths = [path] if runs_only or not recursive else [path, *(p for _, p in below)]
        run_ids = [
            row[0] for row in db.execute("SELECT id FROM runs WHERE folder IN (SELECT value FROM json_each(?))",
                                         (json.dumps(paths),))
        ]
        if runs_only:
            doomed_folders: list[tuple[str, str]] = []
        elif path == "/":
            raise bad_request("the root folder cannot be deleted (runs_only=true deletes the runs in it)")
        elif below and not recursive:
            raise HTTPException(status_code=409, detail=f"folder {path!r} has subfolders: delete with recursive=true")
        else:
            doomed_folders = [(folder_id, path), *below]
        if run_ids and not runs:
            raise HTTPException(
                status_code=409, detail=f"{path!r} holds {len(run_ids)} runs: delete them too with runs=true"
            )
        checksums = delete_runs(db, run_ids)
        for doomed_id, doomed_path in doomed_folders:
            db.execute("DELETE FROM server_folders WHERE id=?", (doomed_id,))
            set_starred(db, "folder", doomed_id, False)
            db.execute("DELETE FROM folders WHERE path=?", (doomed_path,))
    drop_unused_blobs(handle, request.app.state.blobs, checksums)
    return {"folders": [fid for fid, _ in doomed_folders], "runs": run_ids}
