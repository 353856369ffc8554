"""``/api/tags``: the tags runs carry, as objects with ids (what ``simvue.Client.get_tags`` reads).

A run's tags are plain names in the store; every name any run carries is a tag here, with an id,
a colour and a description kept in ``server_tags`` (given on first sight, or by ``POST``).
Renaming a tag (``PUT``) renames it on every run; deleting it takes it off every run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from typing import Annotated

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, StringConstraints

from ...store import new_id
from ..query import QueryError, order, parse_sorting
from . import DataHandle, Page, SafeJSONResponse, Tag, bad_request, checked_router, iso, not_found

router = checked_router()

# Colours a tag is given when nobody chose one: picked by the name, so a tag keeps its colour.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
Colour = Annotated[str, StringConstraints(min_length=1, max_length=64)]
_COLUMNS = "id, name, colour, description, created"


class TagUpdate(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Tag | None = None
    colour: Colour | None = None
    description: str | None = None


class TagCreate(TagUpdate):
    name: Tag


def _default_colour(name: str) -> str:
    return PALETTE[hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[0] % len(PALETTE)]


def _adopt_run_tags(db: sqlite3.Connection) -> None:
    """Give an id to every tag a run carries that has none yet; call inside a transaction."""
    names = [row[0] for row in db.execute(
        "SELECT DISTINCT t.value FROM runs, json_each(runs.tags) AS t"
        " WHERE t.value NOT IN (SELECT name FROM server_tags)"
    )]
    now = time.time()
    db.executemany(
        "INSERT OR IGNORE INTO server_tags (id, name, colour, description, created) VALUES (?,?,?,NULL,?)",
        [(new_id(), name, _default_colour(name), now) for name in names],
    )


def adopt_tags(db: sqlite3.Connection, names: list[str]) -> None:
    """Give these tag names (of a run being created or tagged) an id now, if they have none:
    a tag outlives the runs that carried it, as on Simvue servers.  Call inside a transaction."""
    now = time.time()
    db.executemany(
        "INSERT OR IGNORE INTO server_tags (id, name, colour, description, created) VALUES (?,?,?,NULL,?)",
        [(new_id(), name, _default_colour(name), now) for name in dict.fromkeys(names)],
    )


def _record(row: tuple) -> dict:
    tag_id, name, colour, description, created = row
    return {"id": tag_id, "name": name, "colour": colour, "description": description, "created": created}


def _response(record: dict) -> dict:
    return record | {"created": iso(record["created"])}


def _tag(db: sqlite3.Connection, tag_id: str) -> dict:
    row = db.execute(f"SELECT {_COLUMNS} FROM server_tags WHERE id=?", (tag_id,)).fetchone()
    if row is None:
        raise not_found("tag", tag_id)
    return _record(row)


def _retag_runs(db: sqlite3.Connection, old: str, new: str | None) -> None:
    """Rename tag ``old`` to ``new`` on every run that carries it, or remove it (``new`` None)."""
    rows = db.execute(
        "SELECT id, tags FROM runs WHERE EXISTS (SELECT 1 FROM json_each(runs.tags) WHERE value=?)", (old,)
    ).fetchall()
    for run_id, tags in rows:
        renamed = [new if tag == old else tag for tag in json.loads(tags)]
        kept = list(dict.fromkeys(tag for tag in renamed if tag is not None))
        db.execute("UPDATE runs SET tags=? WHERE id=?", (json.dumps(kept), run_id))


def _sortable(column: str) -> bool:
    return column in ("name", "created")


def _fields(tag: dict, name: str) -> list | None:
    return [tag[name]] if name in ("name", "created") else None


@router.get("/tags")
def list_tags(handle: DataHandle, paging: Page, sorting: str | None = None):
    """Every tag, newest first unless ``sorting`` says otherwise (as runs and folders: a tag
    just made is on the first page)."""
    with handle.transaction() as db:
        _adopt_run_tags(db)
    rows = handle.db.execute(f"SELECT {_COLUMNS} FROM server_tags ORDER BY created DESC, name").fetchall()
    try:
        tags = order([_record(row) for row in rows], parse_sorting(sorting, _sortable), _fields)
    except QueryError as exc:
        raise bad_request(str(exc)) from None
    return {"data": [_response(tag) for tag in paging(tags)], "count": len(tags)}


@router.post("/tags")
def create_tag(body: TagCreate, handle: DataHandle):
    """A new tag (no run carries it yet); 409 with the existing tag's ``id`` if the name is taken."""
    with handle.transaction() as db:
        _adopt_run_tags(db)
        row = db.execute("SELECT id FROM server_tags WHERE name=?", (body.name,)).fetchone()
        if row is not None:
            return SafeJSONResponse(status_code=409, content={"detail": f"tag {body.name!r} exists", "id": row[0]})
        tag_id = new_id()
        db.execute(
            "INSERT INTO server_tags (id, name, colour, description, created) VALUES (?,?,?,?,?)",
            (tag_id, body.name, body.colour or _default_colour(body.name), body.description, time.time()),
        )
    return _response(_tag(handle.db, tag_id))


@router.get("/tags/{tag_id}")
def get_tag(tag_id: str, handle: DataHandle):
    with handle.transaction() as db:
        _adopt_run_tags(db)
    return _response(_tag(handle.db, tag_id))


@router.put("/tags/{tag_id}")
def update_tag(tag_id: str, body: TagUpdate, handle: DataHandle):
    """Change a tag's colour or description, or rename it on every run (409 if the new name is
    another tag's)."""
    with handle.transaction() as db:
        tag = _tag(db, tag_id)
        if body.name is not None and body.name != tag["name"]:
            if db.execute("SELECT 1 FROM server_tags WHERE name=?", (body.name,)).fetchone():
                raise HTTPException(status_code=409, detail=f"another tag is named {body.name!r}")
            _retag_runs(db, tag["name"], body.name)
            db.execute("UPDATE server_tags SET name=? WHERE id=?", (body.name, tag_id))
        if body.colour is not None:
            db.execute("UPDATE server_tags SET colour=? WHERE id=?", (body.colour, tag_id))
        if "description" in body.model_fields_set:
            db.execute("UPDATE server_tags SET description=? WHERE id=?", (body.description, tag_id))
    return _response(_tag(handle.db, tag_id))


@router.delete("/tags/{tag_id}")
def delete_tag(tag_id: str, handle: DataHandle):
    """Delete the tag and take it off every run that carries it."""
    with handle.transaction() as db:
        _adopt_run_tags(db)
        tag = _tag(db, tag_id)
        _retag_runs(db, tag["name"], None)
        db.execute("DELETE FROM server_tags WHERE id=?", (tag_id,))
    return {"id": tag_id}
