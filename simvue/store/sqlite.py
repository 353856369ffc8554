"""SQLite schema, writes and reads for runs, folders, metrics and events.

Layout of a store directory (``.simvue/`` by default)::

    simvue.db        the database (WAL mode; ``simvue.db-wal``/``-shm`` beside it)
    spill/           records a process could not deliver to its aggregator (``*.msgpack``), and
                     batches the database refused, a file per run (``*.store-batches``, msgpack:
                     ``pack_batch``, ``read_spilled_batches``)
    artifacts/       saved files and objects, one file per distinct content (``blobs.py``)

The directories are private to their owner (0700) and the files too (0600), whatever the
umask; a store made looser by an older simvue is tightened when its owner opens it.

Metrics are stored column-wise in chunks: each commit of the aggregator writes, per metric,
one row holding the new points as packed arrays (int64 steps, float64 times, timestamps and
values, little-endian).  Writing a chunk costs the same for 1 or 10,000 points, which is what
lets one aggregator keep up with many ranks.  Readers concatenate a metric's chunks in order.

Writes are batched: one ``write()`` is one transaction.  A transaction that fails leaves
nothing behind, in the database or in the connection's caches, so the same batch (or a part
of it) can be written again.  A run whose status is ``running`` but whose heartbeat is older
than its ``heartbeat_timeout_s`` reads as ``lost``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import secrets
import sqlite3
import string
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack

from .._util import (
    PRIVATE_FILE_MODE,
    merge_dicts,
    open_private,
    pack_column,
    private_directory,
    tighten,
    unpack_column,
)
from .blobs import ARTIFACTS_DIRECTORY, BlobStore

DATABASE_FILE = "simvue.db"
SPILL_DIRECTORY = "spill"
STORE_SPILL_SUFFIX = ".store-batches"  # not ``.msgpack``: those are a sender's spill files, another format
SPILLED_BATCH_FORMAT = "simvue-store-batch/1"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
# A process's state in a run's metadata (``simvue.processes.<label>.state``) while the job is
# being stopped and it has not said goodbye yet: the run's final status and end time are stored
# ahead of time (so that they survive a SIGKILL of the whole job), but more may come.
STOPPING = "stopping"
_COLUMN_SQL = {"steps": "c.steps", "times": "c.times", "timestamps": "c.timestamps", "values": "c.vals"}
_ID_ALPHABET = string.ascii_letters + string.digits

SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    folder TEXT NOT NULL DEFAULT '/',
    description TEXT,
    status TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    tags TEXT NOT NULL DEFAULT '[]',
    system TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    heartbeat REAL,
    heartbeat_timeout_s REAL,
    options TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs (name, created);
CREATE TABLE IF NOT EXISTS folders (
    path TEXT PRIMARY KEY,
    description TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    tags TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs (id),
    name TEXT NOT NULL,
    UNIQUE (run_id, name)
);
CREATE TABLE IF NOT EXISTS metric_chunks (
    id INTEGER PRIMARY KEY,
    metric_id INTEGER NOT NULL REFERENCES metrics (id),
    count INTEGER NOT NULL,
    step_min INTEGER NOT NULL,
    step_max INTEGER NOT NULL,
    steps BLOB NOT NULL,
    times BLOB NOT NULL,
    timestamps BLOB NOT NULL,
    vals BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS metric_chunks_by_metric ON metric_chunks (metric_id, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs (id),
    timestamp REAL NOT NULL,
    message TEXT NOT NULL,
    level TEXT NOT NULL DEFAULT 'info'
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id);
CREATE TABLE IF NOT EXISTS alerts (
    run_id TEXT NOT NULL REFERENCES runs (id),
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',
    fired_at REAL,
    updated REAL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS applied_keys (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    applied REAL NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL REFERENCES runs (id),
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    original_path TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS artifact_uploads (
    run_id TEXT NOT NULL,
    server TEXT NOT NULL,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    PRIMARY KEY (run_id, server, name)
);
CREATE TABLE IF NOT EXISTS grids (
    run_id TEXT NOT NULL REFERENCES runs (id),
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    axes TEXT NOT NULL,
    labels TEXT NOT NULL,
    PRIMARY KEY (run_id, id)
);
CREATE TABLE IF NOT EXISTS grid_metrics (
    run_id TEXT NOT NULL REFERENCES runs (id),
    metric TEXT NOT NULL,
    grid_id TEXT NOT NULL,
    PRIMARY KEY (run_id, metric)
);
CREATE TABLE IF NOT EXISTS tensors (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs (id),
    metric TEXT NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    timestamp REAL NOT NULL,
    shape TEXT NOT NULL,
    vals BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS tensors_by_metric ON tensors (run_id, metric, step);
CREATE INDEX IF NOT EXISTS tensors_by_run ON tensors (run_id, id);
CREATE TABLE IF NOT EXISTS uploads (
    run_id TEXT NOT NULL REFERENCES runs (id),
    server TEXT NOT NULL,
    remote_id TEXT,
    folder_id TEXT,
    chunk_id INTEGER NOT NULL DEFAULT 0,
    chunk_offset INTEGER NOT NULL DEFAULT 0,
    event_id INTEGER NOT NULL DEFAULT 0,
    sent TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    updated REAL,
    PRIMARY KEY (run_id, server)
);
"""


def still_stopping(run: dict[str, Any]) -> bool:
    """Whether ``run`` (as ``Store.run`` returns it) holds a final status stored ahead of
    time: some of its processes had not finished when the job was stopped, and the run's
    last commit, with what they sent meanwhile, is still to come."""
    processes = ((run.get("metadata") or {}).get("simvue") or {}).get("processes")
    return isinstance(processes, dict) and any(
        isinstance(p, dict) and p.get("state") == STOPPING for p in processes.values()
    )


class RunNotFound(LookupError):
    """No run with that name or id in the store."""


def new_id() -> str:
    """A 22-character alphanumeric id, the shape Simvue servers use."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(22))


class SeriesChunk:
    """New points of one metric, column-wise: the arrays the store writes as they are.

    The aggregator appends to the four columns through bound ``append`` methods
    (``appenders()``), which creates no object per point, or adds whole columns whose step
    range it knows (``extend_columns``).  While every row came that way, ``step_range()``
    needs no pass over the steps.
    """

    __slots__ = ("_ranged_rows", "_step_max", "_step_min", "steps", "times", "timestamps", "values")

    def __init__(self) -> None:
        self.steps = array("q")
        self.times = array("d")
        self.timestamps = array("d")
        self.values = array("d")
        # The step range of the first ``_ranged_rows`` rows; -1: unknown (rows came otherwise).
        self._ranged_rows = 0
        self._step_min = 0
        self._step_max = 0

    def __len__(self) -> int:
        return len(self.values)

    def append(self, step: int, time: float, timestamp: float, value: float) -> None:
        self.steps.append(step)
        self.times.append(time)
        self.timestamps.append(timestamp)
        self.values.append(value)

    def appenders(self) -> tuple:
        return (self.steps.append, self.times.append, self.timestamps.append, self.values.append)

    def extend_columns(
        self, steps: array, times: array, timestamps: array, values: array, step_min: int, step_max: int
    ) -> None:
        """Append whole columns of equal length, whose steps lie from ``step_min`` to ``step_max``."""
        ranged = self._ranged_rows == len(self.steps)
        self.steps.extend(steps)
        self.times.extend(times)
        self.timestamps.extend(timestamps)
        self.values.extend(values)
        if ranged:
            self._add_range(step_min, step_max)

    def _add_range(self, step_min: int, step_max: int) -> None:
        if self._ranged_rows:
            step_min, step_max = min(self._step_min, step_min), max(self._step_max, step_max)
        self._step_min, self._step_max, self._ranged_rows = step_min, step_max, len(self.steps)

    def step_range(self) -> tuple[int, int]:
        """The smallest and largest step (of a chunk with points)."""
        if self._ranged_rows == len(self.steps):
            return self._step_min, self._step_max
        return min(self.steps), max(self.steps)

    def extend(self, later: SeriesChunk) -> None:
        """Append the points of ``later`` after these."""
        ranged = self._ranged_rows == len(self.steps) and later._ranged_rows == len(later.steps)
        self.steps.extend(later.steps)
        self.times.extend(later.times)
        self.timestamps.extend(later.timestamps)
        self.values.extend(later.values)
        if not ranged:
            self._ranged_rows = -1
        elif later.steps:
            self._add_range(later._step_min, later._step_max)

    def repair(self) -> None:
        """Cut the columns back to equal length after an append failed half-way."""
        length = min(len(self.steps), len(self.times), len(self.timestamps), len(self.values))
        for column in (self.steps, self.times, self.timestamps, self.values):
            del column[length:]
        self._ranged_rows = -1


@dataclasses.dataclass
class StoreBatch:
    """Everything one aggregator commit writes for one run, applied in one transaction."""

    metrics: dict[str, SeriesChunk] = dataclasses.field(default_factory=dict)
    events: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    tags: list[str] = dataclasses.field(default_factory=list)
    # Set: the run's tags are replaced by these (``Run.set_tags``), then ``tags`` are added.
    tags_set: list[str] | None = None
    folders: list[tuple[str, dict | None, list | None, str | None]] = dataclasses.field(default_factory=list)
    alerts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> definition, status, fired_at
    # Artifact rows {name, category, size, checksum, mime_type, original_path, metadata, created};
    # their content is already in the store's blobs when the batch is written.
    artifacts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Array values (name, step, time, timestamp, shape, little-endian float64 bytes); a later
    # value of a metric at the same step replaces the earlier one.
    tensors: list[tuple[str, int, float, float, list[int], bytes]] = dataclasses.field(default_factory=list)
    grids: dict[str, tuple[str, list[list[float]], list[str]]] = dataclasses.field(default_factory=dict)  # id -> name, axes, labels
    grid_metrics: dict[str, str] = dataclasses.field(default_factory=dict)  # array metric -> its grid's id
    status: str | None = None
    heartbeat: float | None = None
    ended: float | None = None

    def is_empty(self) -> bool:
        return not (
            self.metrics or self.events or self.metadata or self.tags or self.folders or self.alerts or self.artifacts
            or self.tensors or self.grids or self.grid_metrics or self.tags_set is not None
        ) and self.status is None and self.heartbeat is None and self.ended is None

    @property
    def point_count(self) -> int:
        return sum(len(chunk) for chunk in self.metrics.values())

    @property
    def record_count(self) -> int:
        """Points and events, plus one for each other row the batch writes (a folder, an
        alert, an artifact, the metadata and tags, the status): what is lost if it is."""
        return (
            self.point_count + len(self.events) + len(self.folders) + len(self.alerts) + len(self.artifacts)
            + len(self.tensors) + len(self.grids) + len(self.grid_metrics)
            + bool(self.metadata or self.tags or self.tags_set is not None) + (self.status is not None or self.ended is not None)
        )

    def extend(self, later: StoreBatch) -> None:
        """Add ``later`` to this batch: writing the one batch then does what writing this
        batch and then ``later`` would.  Takes ownership of ``later``'s parts."""
        for name, chunk in later.metrics.items():
            mine = self.metrics.get(name)
            if mine is None:
                self.metrics[name] = chunk
            else:
                mine.extend(chunk)
        self.events.extend(later.events)
        if later.metadata:
            # A copy: nested dicts may be shared with the batch they came from.
            self.metadata = merge_dicts(copy.deepcopy(self.metadata), later.metadata)
        if later.tags_set is not None:
            self.tags_set, self.tags = later.tags_set, []
        self.tags = list(dict.fromkeys(self.tags + later.tags))  # the store keeps each tag once
        self.folders.extend(later.folders)
        for name, alert in later.alerts.items():
            earlier = self.alerts.get(name)
            if earlier is not None and earlier.get("fired_at") is not None:
                alert = {**alert, "fired_at": earlier["fired_at"]}  # the store keeps the first firing
            self.alerts[name] = alert
        self.artifacts.extend(later.artifacts)
        self.tensors.extend(later.tensors)
        self.grids.update(later.grids)
        self.grid_metrics.update(later.grid_metrics)
        if later.status is not None:
            self.status = later.status
        if later.heartbeat is not None:
            self.heartbeat = later.heartbeat
        if later.ended is not None:
            self.ended = later.ended

    def split_bulk(self) -> tuple[StoreBatch, StoreBatch]:
        """``(points and events, everything else)``: the part that grows with the data and
        the small part (metadata, tags, folders, alerts, artifact rows, status)."""
        bulk = StoreBatch(metrics=self.metrics, events=self.events, tensors=self.tensors)
        rest = dataclasses.replace(self, metrics={}, events=[], tensors=[])
        return bulk, rest

    def parts(self) -> list[StoreBatch]:
        """This batch as single-row batches (one metric's chunk, one event, one folder,
        ...), in an order that writing them one by one applies them as the whole batch
        would; the status, heartbeat and end come last."""
        out = [StoreBatch(metrics={name: chunk}) for name, chunk in self.metrics.items() if chunk]
        out += [StoreBatch(events=[event]) for event in self.events]
        if self.metadata or self.tags or self.tags_set is not None:
            out.append(StoreBatch(metadata=self.metadata, tags=self.tags, tags_set=self.tags_set))
        out += [StoreBatch(folders=[folder]) for folder in self.folders]
        out += [StoreBatch(alerts={name: alert}) for name, alert in self.alerts.items()]
        out += [StoreBatch(artifacts=[artifact]) for artifact in self.artifacts]
        if self.grids or self.grid_metrics:  # before the arrays on them
            out.append(StoreBatch(grids=self.grids, grid_metrics=self.grid_metrics))
        out += [StoreBatch(tensors=[tensor]) for tensor in self.tensors]
        if self.status is not None or self.heartbeat is not None or self.ended is not None:
            out.append(StoreBatch(status=self.status, heartbeat=self.heartbeat, ended=self.ended))
        return out

    @classmethod
    def joined(cls, batches: list[StoreBatch]) -> StoreBatch:
        """One batch that writes ``batches`` in order (see ``extend``)."""
        out = cls()
        for batch in batches:
            out.extend(batch)
        return out

    def describe(self) -> str:
        """What the batch holds, in words: ``"3 points of 'loss', 1 event"``."""
        words = [f"{len(chunk)} points of {name!r}" for name, chunk in self.metrics.items() if chunk]
        for count, noun in (
            (len(self.events), "event"), (len(self.folders), "folder"), (len(self.alerts), "alert"),
            (len(self.artifacts), "artifact"), (len(self.tensors), "array value"), (len(self.grids), "grid"),
        ):
            if count:
                words.append(f"{count} {noun}{'s' if count > 1 else ''}")
        if self.metadata or self.tags or self.tags_set is not None:
            words.append("metadata")
        if self.status is not None or self.ended is not None:
            words.append("status")
        return ", ".join(words) or "nothing"


def pack_batch(run_id: str, batch: StoreBatch) -> bytes:
    """``batch`` of run ``run_id`` as one msgpack map, the form of a spilled batch: ``format``
    (``SPILLED_BATCH_FORMAT``), ``run_id``, the batch's fields, each metric as its four
    columns packed as the store packs them (little-endian int64 steps, float64 times,
    timestamps, values).  Strings the store could not take (lone surrogates) are kept."""
    fields = {
        "format": SPILLED_BATCH_FORMAT,
        "run_id": run_id,
        "metrics": {
            name: [pack_column(chunk.steps), pack_column(chunk.times), pack_column(chunk.timestamps), pack_column(chunk.values)]
            for name, chunk in batch.metrics.items()
        },
        "events": [list(event) for event in batch.events],
        "metadata": batch.metadata,
        "tags": batch.tags,
        "tags_set": batch.tags_set,
        "folders": [list(folder) for folder in batch.folders],
        "alerts": batch.alerts,
        "artifacts": batch.artifacts,
        "tensors": [list(tensor) for tensor in batch.tensors],
        "grids": {grid_id: list(grid) for grid_id, grid in batch.grids.items()},
        "grid_metrics": batch.grid_metrics,
        "status": batch.status,
        "heartbeat": batch.heartbeat,
        "ended": batch.ended,
    }
    return msgpack.packb(fields, use_bin_type=True, unicode_errors="surrogatepass", default=str)


def read_spilled_batches(path: str | Path) -> Iterator[tuple[str, StoreBatch]]:
    """``(run id, batch)`` of every batch in a spill file written with ``pack_batch``, in
    the order they were spilled; anything else in the file is skipped."""
    with open(path, "rb") as spill:
        unpacker = msgpack.Unpacker(spill, raw=False, strict_map_key=False, unicode_errors="surrogatepass")
        for item in unpacker:
            if not isinstance(item, dict) or item.get("format") != SPILLED_BATCH_FORMAT:
                continue
            metrics = {}
            for name, (steps, times, timestamps, values) in item["metrics"].items():
                chunk = SeriesChunk()
                chunk.steps, chunk.times = unpack_column("q", steps), unpack_column("d", times)
                chunk.timestamps, chunk.values = unpack_column("d", timestamps), unpack_column("d", values)
                metrics[name] = chunk
            yield item["run_id"], StoreBatch(
                metrics=metrics,
                events=[tuple(event) for event in item["events"]],
                metadata=item["metadata"],
                tags=item["tags"],
                tags_set=item.get("tags_set"),
                folders=[tuple(folder) for folder in item["folders"]],
                alerts=item["alerts"],
                artifacts=item["artifacts"],
                tensors=[tuple(tensor) for tensor in item.get("tensors", ())],  # absent from older spill files
                grids={grid_id: tuple(grid) for grid_id, grid in item.get("grids", {}).items()},
                grid_metrics=item.get("grid_metrics", {}),
                status=item["status"],
                heartbeat=item["heartbeat"],
                ended=item["ended"],
            )


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``db`` inside one write transaction: committed at the end of the block, rolled back
    if it (or the commit) raises, and then the error that caused it is raised.  The one
    transaction helper of the store and the server."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # On some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM, ...) SQLite has already
        # rolled the transaction back: a ROLLBACK would fail ("cannot rollback - no
        # transaction is active") and hide the error that matters.
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


class Store:
    """A connection to one store directory.  Each thread should open its own ``Store``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        private_directory(self.directory)
        self.path = self.directory / DATABASE_FILE
        # SQLite would create the database 0644; it gives the -wal and -shm files it creates
        # the database's own mode, so a database created 0600 here keeps all three private.
        # Only ever to create it (O_EXCL): closing any descriptor of the database file drops
        # every POSIX lock this process holds on it, so the SQLite connections already open
        # here would look gone to other processes, and the last of those to close would
        # delete the write-ahead log under them, with every commit in it.
        with contextlib.suppress(OSError):  # it exists; or sqlite3.connect reports what is wrong
            os.close(open_private(self.path, os.O_RDONLY | os.O_EXCL))
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        for name in (DATABASE_FILE, f"{DATABASE_FILE}-wal", f"{DATABASE_FILE}-shm"):
            tighten(self.directory / name, PRIVATE_FILE_MODE)  # a store made by an older simvue
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        self._db.execute(
            "INSERT OR IGNORE INTO store_info (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        self._metric_ids: dict[tuple[str, str], int] = {}
        self._new_metric_ids: list[tuple[str, str]] = []  # cached in the open transaction
        self._lock = threading.Lock()
        self.blobs = BlobStore(self.directory / ARTIFACTS_DIRECTORY)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _add_missing_columns(self) -> None:
        """Columns added since a store was created (``CREATE TABLE IF NOT EXISTS`` keeps an
        older table as it was)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "options" not in columns:
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                self._db.execute("ALTER TABLE runs ADD COLUMN options TEXT NOT NULL DEFAULT '{}'")

    # -- writes ---------------------------------------------------------------------------

    def create_run(
        self,
        *,
        name: str,
        folder: str,
        description: str | None,
        metadata: dict[str, Any],
        tags: list[str],
        status: str,
        system: dict[str, Any],
        heartbeat_timeout_s: float | None,
        options: dict[str, Any] | None = None,
        run_id: str | None = None,
        now: float | None = None,
    ) -> str:
        """Add a run; ``options`` are its settings for a server (``ttl``, ``visibility``,
        ``notifications``, in the server's form).  A run whose ``heartbeat_timeout_s`` is
        None never reads as lost."""
        run_id = run_id or new_id()
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (id, name, folder, description, status, metadata, tags, system, created,"
                " started, heartbeat, heartbeat_timeout_s, options) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    name,
                    folder,
                    description,
                    status,
                    json.dumps(metadata),
                    json.dumps(list(dict.fromkeys(tags))),
                    json.dumps(system),
                    now,
                    now if status == "running" else None,
                    now,
                    heartbeat_timeout_s,
                    json.dumps(options or {}),
                ),
            )
            db.execute("INSERT OR IGNORE INTO folders (path) VALUES (?)", (folder,))
        return run_id

    def resume_run(self, name_or_id: str, now: float | None = None, *, any_status: bool = False) -> dict:
        """Set a ``created`` run running (``Run.reconnect``), or with ``any_status`` a run
        in any state running again (an elastic job's next attempt), and return it."""
        run = self.run(name_or_id)
        if run["status"] != "created" and not any_status:
            raise RunNotFound(f"run {name_or_id!r} is {run['status']}; only a run in the 'created' state can be resumed")
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status='running', started=COALESCE(started, ?), heartbeat=?, ended=NULL WHERE id=?",
                (now, now, run["id"]),
            )
        return self.run(run["id"])

    def write(self, run_id: str, batch: StoreBatch, *, once_key: str | None = None) -> bool:
        """Apply ``batch`` to run ``run_id`` in one transaction.

        With ``once_key``, a batch is applied at most once per run and key, atomically with
        the key's record (a server uses this for ``Idempotency-Key``).  Returns whether the
        batch was applied."""
        if batch.is_empty() and once_key is None:
            return True
        with self._transaction() as db:
            if once_key is not None:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO applied_keys (run_id, key, applied) VALUES (?, ?, ?)",
                    (run_id, once_key, time.time()),
                ).rowcount
                if not inserted:
                    return False
            if batch.metrics:
                rows = []
                for name, chunk in batch.metrics.items():
                    if not chunk:
                        continue
                    step_min, step_max = chunk.step_range()
                    rows.append(
                        (
                            self._metric_id(db, run_id, name),
                            len(chunk),
                            step_min,
                            step_max,
                            pack_column(chunk.steps),
                            pack_column(chunk.times),
                            pack_column(chunk.timestamps),
                            pack_column(chunk.values),
                        )
                    )
                db.executemany(
                    "INSERT INTO metric_chunks (metric_id, count, step_min, step_max, steps, times, timestamps, vals)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    rows,
                )
            if batch.events:
                db.executemany(
                    "INSERT INTO events (run_id, timestamp, message, level) VALUES (?,?,?,?)",
                    [(run_id, ts, message, level) for ts, message, level in batch.events],
                )
            if batch.metadata or batch.tags or batch.tags_set is not None:
                metadata, tags = db.execute("SELECT metadata, tags FROM runs WHERE id=?", (run_id,)).fetchone()
                merged = merge_dicts(json.loads(metadata), batch.metadata)
                kept = json.loads(tags) if batch.tags_set is None else batch.tags_set
                all_tags = list(dict.fromkeys(kept + batch.tags))
                db.execute(
                    "UPDATE runs SET metadata=?, tags=? WHERE id=?", (json.dumps(merged), json.dumps(all_tags), run_id)
                )
            for path, metadata, tags, description in batch.folders:
                self._update_folder(db, path, metadata, tags, description)
            if batch.alerts:
                db.executemany(
                    "INSERT INTO alerts (run_id, name, definition, status, fired_at, updated) VALUES (?,?,?,?,?,?)"
                    " ON CONFLICT (run_id, name) DO UPDATE SET status=excluded.status,"
                    " fired_at=COALESCE(alerts.fired_at, excluded.fired_at), updated=excluded.updated",
                    [
                        (run_id, name, json.dumps(alert["definition"]), alert["status"], alert["fired_at"], time.time())
                        for name, alert in batch.alerts.items()
                    ],
                )
            if batch.artifacts:
                db.executemany(
                    "INSERT OR REPLACE INTO artifacts (run_id, name, category, size, checksum, mime_type,"
                    " original_path, metadata, created) VALUES (?,?,?,?,?,?,?,?,?)",
                    [
                        (run_id, a["name"], a["category"], a["size"], a["checksum"], a["mime_type"],
                         a.get("original_path"), json.dumps(a.get("metadata") or {}), a.get("created") or time.time())
                        for a in batch.artifacts
                    ],
                )
            if batch.grids:
                db.executemany(
                    "INSERT OR IGNORE INTO grids (run_id, id, name, axes, labels) VALUES (?,?,?,?,?)",
                    [(run_id, grid_id, name, json.dumps(axes), json.dumps(labels))
                     for grid_id, (name, axes, labels) in batch.grids.items()],
                )
            if batch.grid_metrics:
                db.executemany(
                    "INSERT OR REPLACE INTO grid_metrics (run_id, metric, grid_id) VALUES (?,?,?)",
                    [(run_id, metric, grid_id) for metric, grid_id in batch.grid_metrics.items()],
                )
            if batch.tensors:
                db.executemany(
                    "INSERT OR REPLACE INTO tensors (run_id, metric, step, time, timestamp, shape, vals)"
                    " VALUES (?,?,?,?,?,?,?)",
                    [(run_id, name, step, t, ts, json.dumps(list(shape)), data)
                     for name, step, t, ts, shape, data in batch.tensors],
                )
            if batch.status is not None:
                db.execute(
                    "UPDATE runs SET status=?, started=COALESCE(started, CASE WHEN ?='running' THEN ? END) WHERE id=?",
                    (batch.status, batch.status, batch.heartbeat or time.time(), run_id),
                )
            if batch.heartbeat is not None:
                db.execute("UPDATE runs SET heartbeat=? WHERE id=?", (batch.heartbeat, run_id))
            if batch.ended is not None:
                db.execute("UPDATE runs SET ended=? WHERE id=?", (batch.ended, run_id))
        return True

    def _update_folder(self, db, path, metadata, tags, description) -> None:
        db.execute("INSERT OR IGNORE INTO folders (path) VALUES (?)", (path,))
        old_metadata, old_tags = db.execute("SELECT metadata, tags FROM folders WHERE path=?", (path,)).fetchone()
        db.execute(
            "UPDATE folders SET metadata=?, tags=?, description=COALESCE(?, description) WHERE path=?",
            (
                json.dumps(merge_dicts(json.loads(old_metadata), metadata or {})),
                json.dumps(list(dict.fromkeys(json.loads(old_tags) + list(tags or [])))),
                description,
                path,
            ),
        )

    def _metric_id(self, db: sqlite3.Connection, run_id: str, name: str) -> int:
        """The id of a run's metric, added if it is new; call inside ``_transaction``."""
        key = (run_id, name)
        metric_id = self._metric_ids.get(key)
        if metric_id is None:
            db.execute("INSERT OR IGNORE INTO metrics (run_id, name) VALUES (?, ?)", key)
            metric_id = db.execute("SELECT id FROM metrics WHERE run_id=? AND name=?", key).fetchone()[0]
            self._metric_ids[key] = metric_id
            self._new_metric_ids.append(key)
        return metric_id

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on this connection; if it fails, the caches forget what it
        added, so that they match the database again."""
        with self._lock:
            if self._db.in_transaction:  # left open by a ROLLBACK that itself failed
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            self._new_metric_ids.clear()
            try:
                with transaction(self._db) as db:
                    yield db
            except BaseException:
                # The ids given to metrics in a rolled-back transaction exist no more, and
                # SQLite hands them to the next metrics inserted: a cached one would send
                # later points of its metric to nowhere, or to another metric.
                for key in self._new_metric_ids:
                    self._metric_ids.pop(key, None)
                raise
            finally:
                self._new_metric_ids.clear()

    # -- reads ----------------------------------------------------------------------------

    def runs(self, *, status: str | None = None, folder: str | None = None, now: float | None = None) -> list[dict]:
        """All runs, oldest first, as dictionaries (see ``run``)."""
        rows = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created").fetchall()
        out = [_run_dict(row, time.time() if now is None else now) for row in rows]
        if folder is not None:
            out = [r for r in out if r["folder"] == folder or r["folder"].startswith(folder.rstrip("/") + "/")]
        if status is not None:
            out = [r for r in out if r["status"] == status]
        return out

    def run(self, name_or_id: str, *, now: float | None = None) -> dict:
        """The run with this id, or else the newest run with this name."""
        row = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id=?", (name_or_id,)).fetchone()
        if row is None:
            row = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE name=? ORDER BY created DESC LIMIT 1", (name_or_id,)
            ).fetchone()
        if row is None:
            raise RunNotFound(f"no run named {name_or_id!r} in {self.path}")
        return _run_dict(row, time.time() if now is None else now)

    def metric_names(self, run_id: str) -> list[str]:
        rows = self._db.execute("SELECT name FROM metrics WHERE run_id=? ORDER BY name", (run_id,)).fetchall()
        return [name for (name,) in rows]

    def metric_series(self, run_id: str, name: str) -> dict[str, array]:
        """``{"steps", "times", "timestamps", "values"}`` arrays of one metric, in logging order."""
        series: dict[str, array] = {
            "steps": array("q"), "times": array("d"), "timestamps": array("d"), "values": array("d")
        }
        rows = self._db.execute(
            "SELECT c.steps, c.times, c.timestamps, c.vals FROM metric_chunks c JOIN metrics m ON m.id = c.metric_id"
            " WHERE m.run_id=? AND m.name=? ORDER BY c.id",
            (run_id, name),
        )
        for steps, times, timestamps, values in rows:
            series["steps"].extend(unpack_column("q", steps))
            series["times"].extend(unpack_column("d", times))
            series["timestamps"].extend(unpack_column("d", timestamps))
            series["values"].extend(unpack_column("d", values))
        return series

    def metric_columns(self, run_id: str, name: str, columns: Sequence[str]) -> dict[str, bytes]:
        """Some columns of one metric (``steps``, ``times``, ``timestamps``, ``values``), each as
        the bytes of its little-endian int64 or float64 values in logging order: what numpy
        reads with ``frombuffer`` (``"<i8"``, ``"<f8"``) without building Python arrays."""
        chosen = [_COLUMN_SQL[column] for column in columns]  # KeyError for an unknown column
        rows = self._db.execute(
            f"SELECT {', '.join(chosen)} FROM metric_chunks c JOIN metrics m ON m.id = c.metric_id"
            " WHERE m.run_id=? AND m.name=? ORDER BY c.id",
            (run_id, name),
        ).fetchall()
        return {column: b"".join(row[i] for row in rows) for i, column in enumerate(columns)}

    def metric_counts(self, run_id: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT m.name, SUM(c.count) FROM metrics m JOIN metric_chunks c ON c.metric_id = m.id"
            " WHERE m.run_id=? GROUP BY m.name ORDER BY m.name",
            (run_id,),
        )
        return dict(rows.fetchall())

    def event_count(self, run_id: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events WHERE run_id=?", (run_id,)).fetchone()[0])

    def events(self, run_id: str) -> list[dict]:
        rows = self._db.execute(
            "SELECT timestamp, message, level FROM events WHERE run_id=? ORDER BY id", (run_id,)
        ).fetchall()
        return [{"timestamp": ts, "message": message, "level": level} for ts, message, level in rows]

    # -- replication to a server (see simvue.upload) ------------------------------

    def metric_chunks_from(self, run_id: str, chunk_id: int, limit: int) -> list[tuple]:
        """Up to ``limit`` metric chunks of a run with id >= ``chunk_id``, in commit order, as
        ``(chunk id, metric name, steps, times, timestamps, values)``."""
        rows = self._db.execute(
            "SELECT c.id, m.name, c.steps, c.times, c.timestamps, c.vals FROM metric_chunks c"
            " JOIN metrics m ON m.id = c.metric_id WHERE m.run_id=? AND c.id>=? ORDER BY c.id LIMIT ?",
            (run_id, chunk_id, limit),
        ).fetchall()
        return [
            (cid, name, unpack_column("q", steps), unpack_column("d", times), unpack_column("d", stamps), unpack_column("d", values))
            for cid, name, steps, times, stamps, values in rows
        ]

    def metric_points_from(self, run_id: str, chunk_id: int) -> int:
        """How many metric points of a run are in chunks with id >= ``chunk_id``."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(c.count), 0) FROM metric_chunks c JOIN metrics m ON m.id = c.metric_id"
            " WHERE m.run_id=? AND c.id>=?",
            (run_id, chunk_id),
        ).fetchone()
        return row[0]

    def events_after(self, run_id: str, event_id: int, limit: int) -> list[tuple[int, float, str, str]]:
        """Up to ``limit`` events of a run with id > ``event_id``: ``(id, timestamp, message, level)``."""
        return self._db.execute(
            "SELECT id, timestamp, message, level FROM events WHERE run_id=? AND id>? ORDER BY id LIMIT ?",
            (run_id, event_id, limit),
        ).fetchall()

    def grids(self, run_id: str) -> list[dict]:
        """The run's grids: ``[{"id", "name", "axes", "labels"}]``, by name."""
        rows = self._db.execute(
            "SELECT id, name, axes, labels FROM grids WHERE run_id=? ORDER BY name, id", (run_id,)
        ).fetchall()
        return [{"id": i, "name": n, "axes": json.loads(a), "labels": json.loads(la)} for i, n, a, la in rows]

    def grid_metrics(self, run_id: str) -> dict[str, str]:
        """The run's array metrics, each with the id of its grid."""
        rows = self._db.execute("SELECT metric, grid_id FROM grid_metrics WHERE run_id=? ORDER BY metric", (run_id,))
        return dict(rows.fetchall())

    def array_values(self, run_id: str, metric: str) -> list[dict]:
        """The values of array metric ``metric``, by step: ``[{"step", "time", "timestamp",
        "shape", "values"}]``, ``values`` the array's numbers in C order (an ``array('d')``)."""
        rows = self._db.execute(
            "SELECT step, time, timestamp, shape, vals FROM tensors WHERE run_id=? AND metric=? ORDER BY step",
            (run_id, metric),
        ).fetchall()
        return [{"step": step, "time": t, "timestamp": ts, "shape": json.loads(shape), "values": unpack_column("d", data)}
                for step, t, ts, shape, data in rows]

    def array_values_after(self, run_id: str, after: int, max_values: int) -> list[tuple]:
        """``(id, metric, step, time, timestamp, shape, values)`` of the run's array values
        stored after row ``after``, in the order stored, as many as hold ``max_values``
        numbers (at least one)."""
        out: list[tuple] = []
        total = 0
        for row_id, metric, step, t, ts, shape, data in self._db.execute(
            "SELECT id, metric, step, time, timestamp, shape, vals FROM tensors WHERE run_id=? AND id>? ORDER BY id",
            (run_id, after),
        ):
            total += len(data) // 8
            if out and total > max_values:
                break
            out.append((row_id, metric, step, t, ts, json.loads(shape), unpack_column("d", data)))
        return out

    def upload(self, run_id: str, server: str) -> dict | None:
        """How far run ``run_id`` has been sent to ``server`` (None: not started)."""
        row = self._db.execute(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE run_id=? AND server=?", (run_id, server)
        ).fetchone()
        return None if row is None else _upload_dict(row)

    def uploads(self) -> list[dict]:
        """Every run's upload state, for every server it was meant for."""
        rows = self._db.execute(f"SELECT {_UPLOAD_COLUMNS} FROM uploads ORDER BY updated").fetchall()
        return [_upload_dict(row) for row in rows]

    def save_upload(self, run_id: str, server: str, **fields: Any) -> None:
        """Create or update the upload state of ``run_id`` for ``server``."""
        if "sent" in fields:
            fields["sent"] = json.dumps(fields["sent"])
        fields["updated"] = time.time()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO uploads (run_id, server) VALUES (?, ?)", (run_id, server))
            db.execute(
                f"UPDATE uploads SET {', '.join(f'{name}=?' for name in fields)} WHERE run_id=? AND server=?",
                (*fields.values(), run_id, server),
            )

    def alerts(self, run_id: str) -> list[dict]:
        """The run's alerts: ``{"definition", "status", "fired_at"}`` with the definition's
        fields (``name``, ``source``, ``rule``, ...) at the top level too."""
        rows = self._db.execute(
            "SELECT definition, status, fired_at FROM alerts WHERE run_id=? ORDER BY rowid", (run_id,)
        ).fetchall()
        return [
            {**json.loads(definition), "definition": json.loads(definition), "status": status, "fired_at": fired_at}
            for definition, status, fired_at in rows
        ]

    def artifacts(self, run_id: str) -> list[dict]:
        """The run's artifacts, by name: ``{name, category, size, checksum, mime_type,
        original_path, metadata, created}``."""
        rows = self._db.execute(
            f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE run_id=? ORDER BY name", (run_id,)
        ).fetchall()
        return [_artifact_dict(row) for row in rows]

    def artifact_bytes(self, run_id: str, name: str) -> bytes:
        """The content of one artifact; ``KeyError`` if the run has no artifact of that name."""
        row = self._db.execute("SELECT checksum FROM artifacts WHERE run_id=? AND name=?", (run_id, name)).fetchone()
        if row is None:
            raise KeyError(f"run {run_id} has no artifact named {name!r}")
        return self.blobs.read(row[0])

    def artifact_uploads(self, run_id: str, server: str) -> dict[str, tuple[str, str]]:
        """Artifacts of a run already uploaded to ``server``: name -> (checksum, remote id)."""
        rows = self._db.execute(
            "SELECT name, checksum, remote_id FROM artifact_uploads WHERE run_id=? AND server=?", (run_id, server)
        ).fetchall()
        return {name: (checksum, remote_id) for name, checksum, remote_id in rows}

    def save_artifact_upload(self, run_id: str, server: str, name: str, checksum: str, remote_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO artifact_uploads (run_id, server, name, checksum, remote_id) VALUES (?,?,?,?,?)",
                (run_id, server, name, checksum, remote_id),
            )

    def folder(self, path: str) -> dict | None:
        row = self._db.execute(
            "SELECT path, description, metadata, tags FROM folders WHERE path=?", (path,)
        ).fetchone()
        if row is None:
            return None
        return {"path": row[0], "description": row[1], "metadata": json.loads(row[2]), "tags": json.loads(row[3])}


_RUN_COLUMNS = (
    "id, name, folder, description, status, metadata, tags, system, created, started, ended, heartbeat,"
    " heartbeat_timeout_s, options"
)


_ARTIFACT_COLUMNS = "name, category, size, checksum, mime_type, original_path, metadata, created"


def _artifact_dict(row: tuple) -> dict:
    artifact = dict(zip(_ARTIFACT_COLUMNS.split(", "), row))
    artifact["metadata"] = json.loads(artifact["metadata"])
    return artifact


_UPLOAD_COLUMNS = "run_id, server, remote_id, folder_id, chunk_id, chunk_offset, event_id, sent, state, error, updated"


def _upload_dict(row: tuple) -> dict:
    upload = dict(zip(_UPLOAD_COLUMNS.split(", "), row))
    upload["sent"] = json.loads(upload["sent"])
    return upload


def _run_dict(row: tuple, now: float) -> dict:
    (run_id, name, folder, description, status, metadata, tags, system, created, started, ended, heartbeat,
     heartbeat_timeout_s, options) = row
    if status == "running" and heartbeat is not None and heartbeat_timeout_s and now - heartbeat > heartbeat_timeout_s:
        status = "lost"  # nobody has written for this run in longer than its heartbeat timeout
    return {
        "id": run_id,
        "name": name,
        "folder": folder,
        "description": description,
        "status": status,
        "metadata": json.loads(metadata),
        "tags": json.loads(tags),
        "system": json.loads(system),
        "created": created,
        "started": started,
        "ended": ended,
        "heartbeat": heartbeat,
        "heartbeat_timeout_s": heartbeat_timeout_s,
        "options": json.loads(options),
    }

