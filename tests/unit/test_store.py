"""The store under failure: a transaction that fails (a record SQLite cannot take, a full
disk) and the run writer that must neither lose good data with it nor flood stderr; and
the store's files, private to their owner.

Everything here is real SQLite: a full disk is SQLite's own ``PRAGMA max_page_count`` on
the connection that writes (inserts then fail with "database or disk is full", SQLITE_FULL,
exactly as on a full file system), and raising it again frees the space.  Whole runs under a
full disk are in ``tests/scenarios/test_disk_full.py``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_script

from simvue.aggregator.writer import RunWriter
from simvue.losses import LossCounter
from simvue.store import SeriesChunk, Store, StoreBatch
from simvue.store.sqlite import DATABASE_FILE

LONE_SURROGATE = "bad \ud800"  # UTF-8 cannot encode it: SQLite refuses the row


def _new_run(store: Store, name: str = "r") -> str:
    return store.create_run(
        name=name, folder="/", description=None, metadata={}, tags=[], status="running", system={},
        heartbeat_timeout_s=None,
    )


def _chunk(steps: range, value: float = 1.0) -> SeriesChunk:
    chunk = SeriesChunk()
    for step in steps:
        chunk.append(step, float(step), 1000.0 + step, value + step)
    return chunk


def _set_full(store: Store, full: bool) -> None:
    """Fill the disk (no page beyond those the database has now) or free it again."""
    with store._lock:  # the writer's connection, between its transactions
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages if full else 1_073_741_823}")


def _stderr_lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


# -- 1. a failed transaction must not poison later writes -----------------------------------


def test_a_failed_transaction_leaves_no_metric_id_behind(store_dir):
    """A metric first seen in a batch that rolls back was given an id that no longer
    exists; later points of that metric must still be visible, and must never land in
    another metric that reuses the id."""
    store = Store(store_dir)
    run_id = _new_run(store)
    poisoned = StoreBatch(metrics={"loss": _chunk(range(0, 1))}, events=[(1.0, LONE_SURROGATE, "info")])
    with pytest.raises(UnicodeEncodeError):
        store.write(run_id, poisoned)
    store.write(run_id, StoreBatch(metrics={"loss": _chunk(range(1, 61)), "acc": _chunk(range(0, 3), 100.0)}))
    assert list(store.metric_series(run_id, "loss")["steps"]) == list(range(1, 61))
    assert list(store.metric_series(run_id, "acc")["values"]) == [100.0, 101.0, 102.0]
    store.close()


def test_a_poison_record_costs_only_itself(store_dir, capfd):
    """One event the store cannot take: the rest of its batch (points, other events,
    metadata) and every later batch are written; only that event is dropped, counted,
    named in one stderr line, and its count lands in the run's metadata."""
    store = Store(store_dir)
    run_id = _new_run(store)
    losses = LossCounter()
    writer = RunWriter(store, run_id, losses)
    writer.write(
        StoreBatch(
            metrics={"loss": _chunk(range(0, 10))},
            events=[(1.0, "before", "info"), (2.0, LONE_SURROGATE, "info"), (3.0, "after", "info")],
            metadata={"epoch": 1},
        )
    )
    for first in range(10, 60, 10):  # 50 more points, as 5 commits
        writer.write(StoreBatch(metrics={"loss": _chunk(range(first, first + 10))}))
    assert list(store.metric_series(run_id, "loss")["steps"]) == list(range(60))
    assert [e["message"] for e in store.events(run_id)] == ["before", "after"]
    assert losses.snapshot() == {"store_failed": 1}
    metadata = store.run(run_id)["metadata"]
    assert metadata["epoch"] == 1
    assert metadata["simvue"]["losses"] == {"store_failed": 1}
    lines = _stderr_lines(capfd)
    assert len(lines) == 1 and "1 event" in lines[0], lines
    assert not writer.complete
    writer.close(1.0)


def _varied_batches() -> list[StoreBatch]:
    """Batches touching every field, the same names again and again."""
    batches = []
    for i in range(4):
        batches.append(
            StoreBatch(
                metrics={"loss": _chunk(range(i * 5, i * 5 + 5)), f"only{i}": _chunk(range(2))},
                events=[(float(i), f"event {i}", "info")],
                metadata={"epoch": i, "nested": {f"k{i}": i}},
                tags=["a", f"t{i}"],
                folders=[("/f", {"i": i}, [f"ft{i}"], f"d{i}")],
                alerts={"high": {"definition": {"name": "high"}, "status": "critical" if i == 1 else "ok",
                                 "fired_at": 5.0 + i if i >= 1 else None}},
                artifacts=[{"name": "a", "category": "output", "size": i, "checksum": "0" * 64,
                            "mime_type": "text/plain", "created": 1.0}],
                status="running" if i < 3 else "completed",
                heartbeat=10.0 + i,
                ended=None if i < 3 else 20.0,
            )
        )
    return batches


def _contents(store: Store, run_id: str) -> dict:
    run = store.run(run_id)
    return {
        "run": {key: run[key] for key in ("status", "metadata", "tags", "heartbeat", "ended")},
        "metrics": {name: {k: list(v) for k, v in store.metric_series(run_id, name).items()}
                    for name in store.metric_names(run_id)},
        "events": store.events(run_id),
        "alerts": [(a["status"], a["fired_at"]) for a in store.alerts(run_id)],
        "artifacts": [(a["name"], a["size"]) for a in store.artifacts(run_id)],
        "folder": store.folder("/f"),
    }


def test_batches_joined_write_what_they_write_one_by_one(tmp_path):
    """What the writer does with the batches it keeps: one joined batch, or its parts one
    by one, leaves the store as the batches written in turn do."""
    one_by_one, joined, in_parts = (Store(tmp_path / name) for name in ("one", "joined", "parts"))
    runs = [_new_run(store) for store in (one_by_one, joined, in_parts)]
    for batch in _varied_batches():
        one_by_one.write(runs[0], batch)
    joined.write(runs[1], StoreBatch.joined(_varied_batches()))
    for part in StoreBatch.joined(_varied_batches()).parts():
        in_parts.write(runs[2], part)
    expected = _contents(one_by_one, runs[0])
    assert expected["alerts"] == [("ok", 6.0)] and expected["run"]["tags"] == ["a", "t0", "t1", "t2", "t3"]
    assert _contents(joined, runs[1]) == expected
    assert _contents(in_parts, runs[2]) == expected
    for store in (one_by_one, joined, in_parts):
        store.close()


def test_a_poison_record_kept_through_a_full_disk_costs_only_itself(store_dir, capfd):
    store = Store(store_dir)
    run_id = _new_run(store)
    losses = LossCounter()
    writer = RunWriter(store, run_id, losses)
    _set_full(store, True)
    writer.write(StoreBatch(metrics={"loss": _chunk(range(1000))}, events=[(1.0, LONE_SURROGATE, "info")]))
    writer.write(StoreBatch(metrics={"loss": _chunk(range(1000, 2000))}, events=[(2.0, "good", "info")]))
    _set_full(store, False)
    writer.write(StoreBatch(metrics={"loss": _chunk(range(2000, 2010))}))
    assert list(store.metric_series(run_id, "loss")["steps"]) == list(range(2010))
    assert [e["message"] for e in store.events(run_id)] == ["good"]
    assert losses.snapshot() == {"store_failed": 1}
    assert store.run(run_id)["metadata"]["simvue"]["losses"] == {"store_failed": 1}
    lines = _stderr_lines(capfd)
    assert len(lines) == 3, lines  # refuses writes; accepts them again; the one event dropped
    writer.close(1.0)


# -- 2. a full disk -------------------------------------------------------------------------


def test_a_full_disk_raises_its_own_error_and_leaves_no_transaction_open(store_dir):
    """SQLite rolls the transaction back itself on SQLITE_FULL: the error the caller sees is
    the full disk, not "cannot rollback - no transaction is active", and the connection can
    write again once there is room."""
    store = Store(store_dir)
    run_id = _new_run(store)
    _set_full(store, True)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.write(run_id, StoreBatch(metrics={"loss": _chunk(range(5000))}))
    assert not store._db.in_transaction
    _set_full(store, False)
    store.write(run_id, StoreBatch(metrics={"loss": _chunk(range(5000))}))
    assert store.metric_counts(run_id) == {"loss": 5000}
    store.close()


def test_a_full_disk_keeps_the_batches_and_writes_them_in_order_when_space_returns(store_dir, capfd):
    store = Store(store_dir)
    run_id = _new_run(store)
    losses = LossCounter()
    writer = RunWriter(store, run_id, losses)
    writer.write(StoreBatch(metrics={"loss": _chunk(range(0, 1000))}))
    _set_full(store, True)
    for commit in range(1, 21):  # twenty refused commits, each with a metric new in it
        writer.write(
            StoreBatch(
                metrics={"loss": _chunk(range(commit * 1000, commit * 1000 + 1000)), f"new{commit}": _chunk(range(3))},
                events=[(float(commit), f"event {commit}", "info")],
            )
        )
    assert store.metric_counts(run_id) == {"loss": 1000}
    assert not writer.complete  # kept in memory, not yet in the store
    _set_full(store, False)
    writer.write(StoreBatch(metrics={"loss": _chunk(range(21000, 21010))}, status="completed"))
    assert list(store.metric_series(run_id, "loss")["steps"]) == list(range(21010))
    assert all(store.metric_counts(run_id)[f"new{c}"] == 3 for c in range(1, 21))
    assert [e["message"] for e in store.events(run_id)] == [f"event {c}" for c in range(1, 21)]
    assert store.run(run_id)["status"] == "completed"
    assert losses.snapshot() == {}
    assert writer.complete
    lines = _stderr_lines(capfd)
    assert len(lines) == 2, lines  # the store refuses writes; it accepts them again
    assert "full" in lines[0] and "again" in lines[1]
    assert not any("rollback" in line for line in lines)
    writer.close(1.0)


def test_kept_batches_are_bounded_then_spilled_to_a_private_file(store_dir, capfd):
    """Past ``max_kept_records`` the kept points and events go to the store's spill/
    directory (counted as ``store_spilled``, the count in the run's metadata once the store
    accepts writes again); the small parts of a batch (metadata, status) stay in memory and
    still reach the store."""
    from simvue.store import read_spilled_batches

    store = Store(store_dir)
    run_id = _new_run(store)
    losses = LossCounter()
    writer = RunWriter(store, run_id, losses, run_name="r", max_kept_records=2500)
    _set_full(store, True)
    for commit in range(10):
        writer.write(
            StoreBatch(
                metrics={"loss": _chunk(range(commit * 1000, commit * 1000 + 1000))},
                events=[(float(commit), f"event {commit}", "info")],
                metadata={"epoch": commit},
            )
        )
    spill_files = list((store_dir / "spill").glob("*.store-batches"))
    assert len(spill_files) == 1
    assert stat.S_IMODE(spill_files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(spill_files[0].parent.stat().st_mode) == 0o700
    spilled = list(read_spilled_batches(spill_files[0]))
    assert spilled and all(spilled_run == run_id for spilled_run, _ in spilled)
    spilled_steps = [s for _, batch in spilled for s in batch.metrics["loss"].steps]
    spilled_events = [e[1] for _, batch in spilled for e in batch.events]
    assert all(not batch.metadata and batch.status is None for _, batch in spilled)
    _set_full(store, False)
    writer.write(StoreBatch(metrics={"loss": _chunk(range(10000, 10010))}))
    stored_steps = list(store.metric_series(run_id, "loss")["steps"])
    assert sorted(spilled_steps + stored_steps) == list(range(10010))  # every point, once
    assert stored_steps[-10:] == list(range(10000, 10010))
    stored_events = [e["message"] for e in store.events(run_id)]
    assert sorted(spilled_events + stored_events) == sorted(f"event {c}" for c in range(10))
    spilled_count = len(spilled_steps) + len(spilled_events)
    assert losses.snapshot() == {"store_spilled": spilled_count}
    metadata = store.run(run_id)["metadata"]
    assert metadata["epoch"] == 9
    assert metadata["simvue"]["losses"] == {"store_spilled": spilled_count}
    assert not writer.complete
    lines = _stderr_lines(capfd)
    assert 2 <= len(lines) <= 3, lines  # refused; spilled (once); accepts writes again
    writer.close(1.0)
    summary = _stderr_lines(capfd)
    assert len(summary) == 1 and str(spilled_count) in summary[0], summary


def test_closing_on_a_full_disk_spills_what_is_kept_status_included(store_dir, capfd):
    from simvue.store import read_spilled_batches

    store = Store(store_dir)
    run_id = _new_run(store)
    losses = LossCounter()
    writer = RunWriter(store, run_id, losses, run_name="r")
    _set_full(store, True)
    writer.write(StoreBatch(metrics={"loss": _chunk(range(1000))}, events=[(1.0, "e", "info")]))
    writer.write(StoreBatch(metrics={"loss": _chunk(range(1000, 2000))}, status="completed", ended=2.0))
    writer.close(1.0)
    assert not writer.complete
    (spill_file,) = (store_dir / "spill").glob("*.store-batches")
    spilled = [batch for _, batch in read_spilled_batches(spill_file)]
    assert [s for batch in spilled for s in batch.metrics["loss"].steps] == list(range(2000))
    assert spilled[-1].status == "completed" and spilled[-1].ended == 2.0
    assert losses.snapshot()["store_spilled"] >= 2001
    lines = _stderr_lines(capfd)
    assert len(lines) == 2, lines  # the store refuses writes; what was spilled, at close
    assert str(spill_file) in lines[1]


def test_when_spilling_fails_too_the_records_are_counted_lost(store_dir, capfd):
    store = Store(store_dir)
    run_id = _new_run(store)
    (store_dir / "spill").write_text("a file where the spill directory should be")
    losses = LossCounter()
    writer = RunWriter(store, run_id, losses, max_kept_records=500)
    _set_full(store, True)
    writer.write(StoreBatch(metrics={"loss": _chunk(range(1000))}, metadata={"kept": True}))
    assert losses.snapshot() == {"store_failed": 1000}
    _set_full(store, False)
    writer.write(StoreBatch())
    metadata = store.run(run_id)["metadata"]
    assert metadata["kept"] is True and metadata["simvue"]["losses"] == {"store_failed": 1000}
    writer.close(1.0)
    assert not writer.complete
    assert len(_stderr_lines(capfd)) <= 4


# -- 3. private files -----------------------------------------------------------------------

PRIVATE_RUN = r"""
import json, os, stat, sys
from pathlib import Path
os.umask(0o022)
import simvue
store = Path(os.environ["SIMVUE_STORE"])
with simvue.Run() as run:
    run.init(name="private")
    for step in range(50):
        run.log_metrics({"loss": float(step)})
    run.save_object({"a": 1}, category="output", name="obj")
    run.flush()
    scratch = None
    from simvue.store import Store
    other = Store(store)
    writer = other.blobs.writer()  # a transfer's scratch file, as it is being written
    scratch = writer.path
    modes = {str(p.relative_to(store)): stat.S_IMODE(p.stat().st_mode) for p in [store, *store.rglob("*")]}
    writer.discard()
    other.close()
print(json.dumps({"modes": modes, "scratch": str(scratch.relative_to(store))}))
"""


def test_the_store_is_private_to_its_owner_whatever_the_umask(store_dir):
    result = run_script(PRIVATE_RUN)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    modes = report["modes"]
    for name in (".", "simvue.db", "simvue.db-wal", "simvue.db-shm", "artifacts", report["scratch"]):
        assert name in modes, sorted(modes)
    blobs = [name for name in modes if name.startswith("artifacts/") and not name.startswith("artifacts/.")]
    assert blobs, sorted(modes)
    for name, mode in modes.items():
        is_dir = (store_dir / name).is_dir() if name != "." else True
        assert mode == (0o700 if is_dir else 0o600), f"{name}: {oct(mode)}"
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700


def test_an_existing_store_is_tightened_when_opened(store_dir):
    Store(store_dir).close()
    os.chmod(store_dir, 0o755)
    os.chmod(store_dir / "simvue.db", 0o644)
    (store_dir / "artifacts").mkdir()
    os.chmod(store_dir / "artifacts", 0o755)
    store = Store(store_dir)
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((store_dir / "artifacts").stat().st_mode) == 0o700
    for name in ("simvue.db", "simvue.db-wal", "simvue.db-shm"):
        path = Path(store_dir / name)
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    store.close()


def test_a_second_store_in_a_process_keeps_the_first_one_s_commits_visible_to_other_processes(tmp_path):
    """Opening a Store must not open and close the database file itself: that drops the POSIX
    locks of every SQLite connection of the process, and the next reader in another process
    to close then deletes the write-ahead log under them (seen as a server's deletions, and a
    running job's commits, vanishing for every other process)."""
    store = Store(tmp_path)
    run_id = store.create_run(name="r", folder="/", description=None, metadata={}, tags=[], status="running",
                              system={}, heartbeat_timeout_s=None)
    assert store.write(run_id, StoreBatch(events=[(1.0, "first", "info")]))
    second = Store(tmp_path)  # the uploader's, a server's next handle, ...
    read = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute('SELECT COUNT(*) FROM events').fetchone()[0]); c.close()"
    database = str(tmp_path / DATABASE_FILE)
    assert subprocess.run([sys.executable, "-c", read, database], capture_output=True, text=True).stdout.strip() == "1"
    assert store.write(run_id, StoreBatch(events=[(2.0, "second", "info")]))
    assert (tmp_path / f"{DATABASE_FILE}-wal").exists()
    assert subprocess.run([sys.executable, "-c", read, database], capture_output=True, text=True).stdout.strip() == "2"
    second.close()
    store.close()


def test_a_chunks_step_range_is_right_however_its_points_came():
    """The commit takes a chunk's step range from what ``extend_columns`` was told when every
    row came that way, and measures it otherwise: appends, merged batches, repairs."""
    from array import array

    def columns(steps):
        return array("q", steps), array("d", [0.0] * len(steps)), array("d", [0.0] * len(steps)), array("d", [1.0] * len(steps))

    ranged = SeriesChunk()
    ranged.extend_columns(*columns([5, 3, 9]), 3, 9)
    ranged.extend_columns(*columns([1, 2]), 1, 2)
    assert ranged.step_range() == (1, 9)
    mixed = SeriesChunk()
    mixed.append(100, 0.0, 0.0, 1.0)
    mixed.extend_columns(*columns([4, 6]), 4, 6)
    assert mixed.step_range() == (4, 100)
    appended_after = SeriesChunk()
    appended_after.extend_columns(*columns([4, 6]), 4, 6)
    appended_after.append(0, 0.0, 0.0, 1.0)
    assert appended_after.step_range() == (0, 6)
    merged = SeriesChunk()
    merged.extend(ranged)
    merged.extend(appended_after)
    assert merged.step_range() == (0, 9)
    both_ranged = SeriesChunk()
    both_ranged.extend_columns(*columns([7]), 7, 7)
    both_ranged.extend(ranged)
    assert both_ranged.step_range() == (1, 9)
    both_ranged.steps.append(50)  # a half-done append, cut back by repair
    both_ranged.repair()
    assert both_ranged.step_range() == (1, 9) and len(both_ranged) == 6
