"""Artifacts: records under ``/api/artifacts``, content through keyed URLs.

The upload flow Simvue clients follow: ``POST /api/artifacts`` (name, size, MIME type, sha256
``checksum``) answers ``{"id", "url"}``; the client ``PUT``s the raw bytes to ``url`` (no token:
the URL's ``key`` authorises that one artifact), confirms with ``PUT /api/artifacts/{id}``
``{"uploaded": true}`` and links the artifact to a run with ``PUT /api/runs/{run}/artifacts/{id}``.
If content with that checksum is already stored, ``url`` is ``null`` and the client skips the
upload.  ``GET /api/artifacts/{id}`` gives ``url`` as a keyed download URL once there is content.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from fastapi import HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, NonNegativeInt, StringConstraints

from ...store import new_id
from ..auth import blob_key, blob_key_matches
from ..blobs import CHECKSUM, ChecksumMismatch, receive
from ..db import Handle, delete_artifacts, drop_unused_blobs
from . import DataHandle, Page, bad_request, checked_router, iso, json_list, not_found, require_run, with_handle

router = checked_router()  # under /api, with the token check
content_router = checked_router()  # upload and download URLs, authorised by their key

STORAGE_ID = "local"
Category = Literal["input", "output", "code"]
Checksum = Annotated[str, AfterValidator(str.lower), StringConstraints(pattern=CHECKSUM.pattern)]
# A MIME type becomes the Content-Type header of downloads: printable ASCII on one line, or
# the download could not be answered.
MimeType = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e][\x20-\x7e]*$", max_length=255)]

_COLUMNS = "id, name, original_path, size, mime_type, checksum, metadata, created"


class ArtifactCreate(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Annotated[str, StringConstraints(min_length=1)]
    checksum: Checksum
    original_path: str | None = ""
    size: NonNegativeInt | None = None
    mime_type: MimeType | None = None
    metadata: dict[str, Any] | None = None
    run: str | None = None
    category: Category = "output"


class ArtifactUpdate(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    uploaded: bool | None = None


class ArtifactLink(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    category: Category


def _content_url(request: Request, purpose: str, artifact_id: str) -> str:
    key = blob_key(request.app.state.secret, purpose, artifact_id)
    return f"{request.base_url}{purpose}/{artifact_id}?key={key}"


def _artifact(handle: Handle, artifact_id: str) -> dict:
    row = handle.db.execute(f"SELECT {_COLUMNS} FROM server_artifacts WHERE id=?", (artifact_id,)).fetchone()
    if row is None:
        raise not_found("artifact", artifact_id)
    return _from_row(row)


def _from_row(row: tuple) -> dict:
    artifact_id, name, original_path, size, mime_type, checksum, metadata, created = row
    return {
        "id": artifact_id, "name": name, "original_path": original_path, "size": size, "mime_type": mime_type,
        "checksum": checksum, "metadata": json.loads(metadata), "created": created,
    }


def _response(request: Request, handle: Handle, record: dict) -> dict:
    uploaded = request.app.state.blobs.has(record["checksum"])
    runs = handle.db.execute(
        "SELECT run_id, category FROM server_run_artifacts WHERE artifact_id=?", (record["id"],)
    ).fetchall()
    return record | {
        "created": iso(record["created"]),
        "uploaded": uploaded,
        "url": _content_url(request, "download", record["id"]) if uploaded else None,
        "storage_id": STORAGE_ID,
        "runs": dict(runs),
    }


def _link(handle: Handle, run_id: str, artifact_id: str, category: str) -> None:
    with handle.transaction() as db:
        db.execute(
            "INSERT INTO server_run_artifacts (run_id, artifact_id, category) VALUES (?,?,?)"
            " ON CONFLICT (run_id, artifact_id) DO UPDATE SET category=excluded.category",
            (run_id, artifact_id, category),
        )


@router.post("/artifacts")
def create_artifact(body: ArtifactCreate, request: Request, handle: DataHandle):
    if body.run is not None:
        require_run(handle, body.run)
    artifact_id = new_id()
    with handle.transaction() as db:
        db.execute(
            f"INSERT INTO server_artifacts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
            (artifact_id, body.name, body.original_path or "", body.size, body.mime_type, body.checksum,
             json.dumps(body.metadata), time.time()),
        )
    if body.run is not None:
        _link(handle, body.run, artifact_id, body.category)
    stored = request.app.state.blobs.has(body.checksum)
    return {
        "id": artifact_id,
        "name": body.name,
        "url": None if stored else _content_url(request, "upload", artifact_id),
        "storage_id": STORAGE_ID,
    }


@router.get("/artifacts")
def list_artifacts(
    request: Request,
    handle: DataHandle,
    paging: Page,
    runs: str | None = None,
):
    """All artifacts, or those linked to any run in ``runs`` (a JSON list of ids), oldest first."""
    run_ids = json_list(runs, "runs")
    if runs is None:
        rows = handle.db.execute(f"SELECT {_COLUMNS} FROM server_artifacts ORDER BY created").fetchall()
    else:  # the ids travel as one JSON value: SQLite takes at most 32,766 bound values
        rows = handle.db.execute(
            f"SELECT {_COLUMNS} FROM server_artifacts WHERE id IN (SELECT artifact_id FROM server_run_artifacts"
            " WHERE run_id IN (SELECT value FROM json_each(?))) ORDER BY created",
            (json.dumps(run_ids),),
        ).fetchall()
    data = [_response(request, handle, _from_row(row)) for row in paging(rows)]
    return {"data": data, "count": len(rows)}


@router.get("/artifacts/{artifact_id}")
def get_artifact(artifact_id: str, request: Request, handle: DataHandle):
    return _response(request, handle, _artifact(handle, artifact_id))


@router.put("/artifacts/{artifact_id}")
def update_artifact(artifact_id: str, body: ArtifactUpdate, request: Request, handle: DataHandle):
    """Confirm an upload: ``{"uploaded": true}`` is refused (400) while there is no content."""
    record = _artifact(handle, artifact_id)
    if body.uploaded and not request.app.state.blobs.has(record["checksum"]):
        raise bad_request(f"artifact {artifact_id!r} has no content yet: upload it to its url first")
    return _response(request, handle, record)


@router.delete("/artifacts/{artifact_id}")
def delete_artifact(artifact_id: str, request: Request, handle: DataHandle):
    """Delete the artifact, its links to runs, and its content once no other artifact has it."""
    _artifact(handle, artifact_id)
    with handle.transaction() as db:
        checksums = delete_artifacts(db, [artifact_id])
    drop_unused_blobs(handle, request.app.state.blobs, checksums)
    return {"id": artifact_id}


def _content_response(request: Request, record: dict) -> FileResponse:
    path = request.app.state.blobs.path(record["checksum"])
    if not path.exists():
        raise HTTPException(status_code=404, detail=f"artifact {record['id']!r} has no content yet")
    return FileResponse(path, media_type=record["mime_type"] or "application/octet-stream")


@router.get("/artifacts/{artifact_id}/content")
def get_artifact_content(artifact_id: str, request: Request, handle: DataHandle):
    return _content_response(request, _artifact(handle, artifact_id))


@router.put("/runs/{run_id}/artifacts/{artifact_id}")
def link_artifact(run_id: str, artifact_id: str, body: ArtifactLink, request: Request, handle: DataHandle):
    require_run(handle, run_id)
    record = _artifact(handle, artifact_id)
    _link(handle, run_id, artifact_id, body.category)
    return _response(request, handle, record) | {"category": body.category}


def run_artifacts(request: Request, handle: Handle, run_id: str) -> list[dict]:
    rows = handle.db.execute(
        f"SELECT {', '.join('a.' + c for c in _COLUMNS.split(', '))}, l.category FROM server_artifacts a"
        " JOIN server_run_artifacts l ON l.artifact_id = a.id WHERE l.run_id=? ORDER BY a.created",
        (run_id,),
    ).fetchall()
    return [_response(request, handle, _from_row(row[:-1])) | {"category": row[-1]} for row in rows]


@router.get("/runs/{run_id}/artifacts")
def list_run_artifacts(
    run_id: str, request: Request, handle: DataHandle, category: Category | None = None, name: str | None = None
):
    require_run(handle, run_id)
    return [
        artifact for artifact in run_artifacts(request, handle, run_id)
        if (category is None or artifact["category"] == category) and (name is None or artifact["name"] == name)
    ]


@router.get("/runs/{run_id}/artifacts/{artifact_id}")
def get_run_artifact(run_id: str, artifact_id: str, request: Request, handle: DataHandle):
    require_run(handle, run_id)
    for artifact in run_artifacts(request, handle, run_id):
        if artifact["id"] == artifact_id:
            return artifact
    raise not_found(f"artifact linked to run {run_id!r}", artifact_id)


def _keyed_artifact(handle: Handle, artifact_id: str, purpose: str, key: str | None, secret: bytes) -> dict:
    if not blob_key_matches(secret, purpose, artifact_id, key):
        raise HTTPException(status_code=403, detail=f"the {purpose} key does not match artifact {artifact_id!r}")
    return _artifact(handle, artifact_id)


@content_router.put("/upload/{artifact_id}")
async def upload_content(artifact_id: str, request: Request, key: str | None = None):
    """The artifact's bytes, raw; 400 if their sha256 is not the artifact's checksum."""
    record = await with_handle(request, _keyed_artifact, artifact_id, "upload", key, request.app.state.secret)
    try:
        size = await receive(request.app.state.blobs, request.stream(), record["checksum"])
    except ChecksumMismatch as exc:
        raise bad_request(str(exc)) from None
    return {"id": artifact_id, "size": size}


@content_router.get("/download/{artifact_id}")
def download_content(artifact_id: str, request: Request, handle: DataHandle, key: str | None = None):
    return _content_response(request, _keyed_artifact(handle, artifact_id, "download", key, request.app.state.secret))
