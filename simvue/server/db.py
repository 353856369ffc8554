"""The server's database: the local store's tables plus the tables only a server needs.

The server keeps everything in one SQLite file, ``DIR/simvue.db``: runs, folders, metrics and
events in the store's own schema (written through :class:`simvue.store.Store`, so the
``simvue`` command can browse a server's data directory like any store), and beside them the
``server_*`` tables below for what the store has no notion of: folder, alert and tag ids,
alerts, artifacts, tensor-metric grids and their values, abort requests, the idempotency
keys of ingest requests, and the tenants, users and storage records of ``routes/admin.py``
and ``routes/storage.py``.  The store's writes only add and merge, so the routes replace a run's
tags, rename, move and delete runs, and edit and delete folders and tags, with SQL of their own
on the store's tables.

Request handlers run on a thread pool and each borrows a :class:`Handle` (a ``Store`` and a
connection) for the length of one request.  Every write is a ``BEGIN IMMEDIATE`` transaction,
which waits (up to ``BUSY_TIMEOUT_S``) for the previous writer instead of failing with
"database is locked".
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..store import Store, new_id
from ..store.blobs import BlobStore
from ..store.sqlite import BUSY_TIMEOUT_S, DATABASE_FILE, transaction
from .auth import TOKEN_SUBJECT

SCHEMA = """
CREATE TABLE IF NOT EXISTS server_folders (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_runs (
    run_id TEXT PRIMARY KEY,
    ttl INTEGER,
    visibility TEXT NOT NULL DEFAULT '{}',
    notifications TEXT NOT NULL DEFAULT '{"state": "none"}',
    abort_requested INTEGER NOT NULL DEFAULT 0,
    abort_reason TEXT
);
CREATE TABLE IF NOT EXISTS server_alerts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS server_alerts_by_name ON server_alerts (name);
CREATE TABLE IF NOT EXISTS server_run_alerts (
    run_id TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',
    PRIMARY KEY (run_id, alert_id)
);
CREATE TABLE IF NOT EXISTS server_artifacts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    original_path TEXT NOT NULL DEFAULT '',
    size INTEGER,
    mime_type TEXT,
    checksum TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT 'null',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS server_artifacts_by_checksum ON server_artifacts (checksum);
CREATE TABLE IF NOT EXISTS server_run_artifacts (
    run_id TEXT NOT NULL,
    artifact_id TEXT NOT NULL,
    category TEXT NOT NULL,
    PRIMARY KEY (run_id, artifact_id)
);
CREATE TABLE IF NOT EXISTS server_run_keys (
    key TEXT PRIMARY KEY,
    run_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS server_tags (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    colour TEXT NOT NULL,
    description TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_grids (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    grid TEXT NOT NULL,
    labels TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_run_grids (
    run_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    grid_id TEXT NOT NULL,
    PRIMARY KEY (run_id, metric)
);
CREATE TABLE IF NOT EXISTS server_grid_values (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    grid_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    timestamp REAL NOT NULL,
    array TEXT NOT NULL,
    minimum REAL,
    maximum REAL
);
CREATE INDEX IF NOT EXISTS server_grid_values_by_metric ON server_grid_values (run_id, metric, step);
CREATE TABLE IF NOT EXISTS server_tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_enabled INTEGER NOT NULL DEFAULT 1,
    max_request_rate INTEGER NOT NULL DEFAULT 0,
    max_runs INTEGER NOT NULL DEFAULT 0,
    max_data_volume INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    fullname TEXT NOT NULL DEFAULT '',
    email TEXT,
    is_manager INTEGER NOT NULL DEFAULT 0,
    is_admin INTEGER NOT NULL DEFAULT 0,
    is_readonly INTEGER NOT NULL DEFAULT 0,
    is_enabled INTEGER NOT NULL DEFAULT 1,
    welcome INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_storage (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}',
    disable_check INTEGER NOT NULL DEFAULT 0,
    is_tenant_useable INTEGER NOT NULL DEFAULT 1,
    is_default INTEGER NOT NULL DEFAULT 0,
    is_enabled INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_starred (
    kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    PRIMARY KEY (kind, object_id)
);
"""

DEFAULT_TENANT = "default"

# Columns added after the first release: a data directory an older server made gets them at start.
ADDED_COLUMNS = (
    ("server_run_alerts", "fired_at", "REAL"),  # when the alert first went critical for the run
    ("server_folders", "ttl", "INTEGER"),
)


# Every table that holds rows of a run, and its run id column: what deleting a run removes.
RUN_TABLES = (
    ("metrics", "run_id"), ("events", "run_id"), ("runs", "id"), ("server_runs", "run_id"),
    ("server_run_alerts", "run_id"), ("server_run_artifacts", "run_id"), ("applied_keys", "run_id"),
    ("server_run_keys", "run_id"), ("server_run_grids", "run_id"), ("server_grid_values", "run_id"),
    ("server_starred", "object_id"), ("alerts", "run_id"), ("artifacts", "run_id"), ("uploads", "run_id"),
    ("artifact_uploads", "run_id"), ("grids", "run_id"), ("grid_metrics", "run_id"), ("tensors", "run_id"),
)


def ensure_user(db: sqlite3.Connection, username: str) -> str:
    """The id of the user named ``username``, made (an administrator, in the oldest tenant, or
    in a new ``default`` tenant if there is none) if there is no such user; call inside a
    transaction."""
    row = db.execute("SELECT id FROM server_users WHERE username=?", (username,)).fetchone()
    if row is not None:
        return row[0]
    now = time.time()
    tenant = db.execute("SELECT id FROM server_tenants ORDER BY created, id LIMIT 1").fetchone()
    if tenant is None:
        tenant = (new_id(),)
        db.execute("INSERT INTO server_tenants (id, name, created) VALUES (?,?,?)", (tenant[0], DEFAULT_TENANT, now))
    user_id = new_id()
    db.execute(
        "INSERT INTO server_users (id, username, tenant_id, fullname, is_admin, created) VALUES (?,?,?,?,1,?)",
        (user_id, username, tenant[0], username, now),
    )
    return user_id


def set_starred(db: sqlite3.Connection, kind: str, object_id: str, starred: bool) -> None:
    """Star (favourite) a run or a folder, or take the star away; call inside a transaction."""
    if starred:
        db.execute("INSERT OR IGNORE INTO server_starred (kind, object_id) VALUES (?, ?)", (kind, object_id))
    else:
        db.execute("DELETE FROM server_starred WHERE kind=? AND object_id=?", (kind, object_id))


def is_starred(db: sqlite3.Connection, kind: str, object_id: str) -> bool:
    return db.execute("SELECT 1 FROM server_starred WHERE kind=? AND object_id=?", (kind, object_id)).fetchone() is not None


def delete_runs(db: sqlite3.Connection, run_ids: list[str]) -> set[str]:
    """Remove runs and everything that belongs to them, with the artifacts no other run
    links to; call inside a transaction.  Returns the checksums of the artifacts removed:
    their content goes with ``drop_unused_blobs`` once the transaction is committed."""
    checksums: set[str] = set()
    for run_id in run_ids:
        linked = [row[0] for row in db.execute("SELECT artifact_id FROM server_run_artifacts WHERE run_id=?", (run_id,))]
        checksums.update(row[0] for row in db.execute("SELECT checksum FROM artifacts WHERE run_id=?", (run_id,)))
        db.execute("DELETE FROM metric_chunks WHERE metric_id IN (SELECT id FROM metrics WHERE run_id=?)", (run_id,))
        for table, column in RUN_TABLES:
            db.execute(f"DELETE FROM {table} WHERE {column}=?", (run_id,))
        orphans = [a for a in linked if not db.execute(
            "SELECT 1 FROM server_run_artifacts WHERE artifact_id=? LIMIT 1", (a,)).fetchone()]
        checksums |= delete_artifacts(db, orphans)
    return checksums


def delete_artifacts(db: sqlite3.Connection, artifact_ids: list[str]) -> set[str]:
    """Remove artifact records and their links to runs; call inside a transaction.  Returns
    their checksums (see ``drop_unused_blobs``)."""
    checksums: set[str] = set()
    for artifact_id in artifact_ids:
        row = db.execute("SELECT checksum FROM server_artifacts WHERE id=?", (artifact_id,)).fetchone()
        if row is not None:
            checksums.add(row[0])
        db.execute("DELETE FROM server_run_artifacts WHERE artifact_id=?", (artifact_id,))
        db.execute("DELETE FROM server_artifacts WHERE id=?", (artifact_id,))
    return checksums


def drop_unused_blobs(handle: Handle, blobs: BlobStore, checksums: set[str]) -> int:
    """Delete the content of each of ``checksums`` that no artifact refers to any more;
    returns how many went.  The check and the deletion happen inside a write transaction,
    so no artifact can come to refer to a blob between them (an artifact is recorded before
    its content is looked for).  A crash between a deletion and this leaves the content
    unreferenced on disk: space, nothing a reader sees."""
    if not checksums:
        return 0
    dropped = 0
    with handle.transaction() as db:
        for checksum in sorted(checksums):
            if _referenced(db, checksum):
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                blobs.path(checksum).unlink()
                dropped += 1
    return dropped


def _referenced(db: sqlite3.Connection, checksum: str) -> bool:
    return any(
        db.execute(f"SELECT 1 FROM {table} WHERE checksum=? LIMIT 1", (checksum,)).fetchone()
        for table in ("server_artifacts", "artifacts")
    )


class Handle:
    """A ``Store`` and a plain connection to the same database, used by one request at a time."""

    def __init__(self, directory: Path) -> None:
        self.store = Store(directory)  # opening a Store creates the store's schema
        self.db = sqlite3.connect(
            directory / DATABASE_FILE, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """The connection inside one write transaction (commit, or roll back on error)."""
        return transaction(self.db)

    def close(self) -> None:
        self.store.close()
        self.db.close()


class ServerData:
    """One data directory's database, handed out as a pool of :class:`Handle`.

    Handlers run on worker threads that come and go, so handles are pooled rather than kept
    per thread: the pool grows to the number of requests served at once and no further.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._idle: list[Handle] = []
        self._lock = threading.Lock()
        with self.checkout() as handle:
            handle.db.executescript(SCHEMA)
            for table, column, declaration in ADDED_COLUMNS:
                present = {row[1] for row in handle.db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    handle.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            # The key of a creation cut off by a crash names no run: let its retry create it.
            handle.db.execute("DELETE FROM server_run_keys WHERE run_id NOT IN (SELECT id FROM runs)")
            with handle.transaction() as db:
                ensure_user(db, TOKEN_SUBJECT)  # whoever holds a token

    @contextlib.contextmanager
    def checkout(self) -> Iterator[Handle]:
        """A handle for the exclusive use of the caller until the ``with`` block ends."""
        with self._lock:
            handle = self._idle.pop() if self._idle else None
        if handle is None:
            handle = Handle(self.directory)
        try:
            yield handle
        finally:
            with self._lock:
                self._idle.append(handle)

    def close(self) -> None:
        """Close the idle handles; call once the server has stopped serving."""
        with self._lock:
            for handle in self._idle:
                handle.close()
            self._idle.clear()

