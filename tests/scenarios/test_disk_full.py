"""A real run whose store's disk fills up mid-run, and maybe frees up again.

The disk is filled with SQLite itself: ``PRAGMA max_page_count`` on the aggregator's own
store connection, set to the pages the database has, makes every insert that needs a new
page fail with "database or disk is full" (SQLITE_FULL), exactly as a full file system does;
raising it again frees the space.  Each run logs 200 metrics per call, so every commit
needs new pages and the first commit after the fill is refused, and the metrics are new in
the refused commits (the case that poisoned the metric-id cache).

The outage lasts about 2 s: ten commits (``commit_interval_s`` is 0.2 s), so the
refused-then-kept path runs many times over, not once.
"""

from __future__ import annotations

import json

from conftest import read_run, run_script

SCRIPT = r"""
import json, sys, time
import simvue
from simvue.aggregator import writer

name, max_kept, free_again = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "free"
if max_kept:
    writer.MAX_KEPT_RECORDS = max_kept  # small, so that this short run goes past it

def set_full(run, full):
    # The aggregator's own connection (a full disk must be seen by the writer's connection).
    store = run._membership.aggregator._writer.store
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages if full else 1_073_741_823}")

WIDTH = 200
calls = 0
def log(run, phase, n, pause):
    global calls
    for _ in range(n):
        run.log_metrics({f"{phase}{i}": float(calls) for i in range(WIDTH)})
        calls += 1
        time.sleep(pause)

run = simvue.Run()
run.init(name=name)
log(run, "before", 20, 0.0)
assert run.flush(10.0)
set_full(run, True)
run.log_event("while the disk is full")
log(run, "full", 100, 0.02)  # about 2 s: ten refused commits
if free_again:
    set_full(run, False)
    log(run, "after", 20, 0.02)
started = time.monotonic()
closed = run.close()
print(json.dumps({"closed": closed, "close_s": time.monotonic() - started, "calls": calls}))
"""


def _run(name: str, max_kept: int, free: bool) -> tuple[dict, list[str]]:
    result = run_script(SCRIPT, name, str(max_kept), "free" if free else "full", timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), [line for line in result.stderr.splitlines() if line.strip()]


def _no_noise(lines: list[str]) -> None:
    assert not any("rollback" in line or "Traceback" in line for line in lines), "\n".join(lines)


def test_a_disk_that_fills_and_frees_again_loses_nothing(store_dir):
    report, lines = _run("refilled", 0, True)
    _no_noise(lines)
    assert report["closed"] is True
    assert len(lines) == 2, lines  # the store refuses writes; it accepts them again
    assert "full" in lines[0]
    run = read_run(store_dir, "refilled")
    assert run["status"] == "completed"
    expected = {"before": 20, "full": 100, "after": 20}
    for phase, count in expected.items():
        for i in (0, 77, 199):
            points = run["metrics"][f"{phase}{i}"]
            assert len(points) == count, (phase, i, len(points))
    calls = [value for _, _, value in run["metrics"]["full0"]]
    assert calls == [float(c) for c in range(20, 120)]  # in order
    assert "while the disk is full" in [e["message"] for e in run["events"]]
    assert "losses" not in run["metadata"].get("simvue", {})


def test_a_full_disk_past_the_memory_bound_spills_and_close_says_so(store_dir):
    report, lines = _run("spilled", 3000, True)
    assert report["closed"] is False
    _no_noise(lines)
    from simvue.store import read_spilled_batches

    run = read_run(store_dir, "spilled")
    assert run["status"] == "completed"  # the small parts of a batch are never spilled
    spilled = run["metadata"]["simvue"]["losses"]["store_spilled"]
    (spill_file,) = (store_dir / "spill").glob("*.store-batches")
    batches = [batch for _, batch in read_spilled_batches(spill_file)]
    in_spill = sum(batch.point_count + len(batch.events) for batch in batches)
    assert in_spill == spilled > 0
    stored = sum(len(points) for metric, points in run["metrics"].items() if metric.startswith("full"))
    spilled_points = sum(batch.point_count for batch in batches)
    assert stored + spilled_points == 100 * 200  # every point of the outage: stored or spilled
    assert all(len(run["metrics"][f"after{i}"]) == 20 for i in range(200))
    assert 3 <= len(lines) <= 4, lines  # refused; spilled; accepts writes again; what was lost
    assert str(spilled) in lines[-1] and str(spill_file) in lines[-1]
    # With space back, `simvue spill import` puts the spilled points in, once.
    from simvue.cli import main as simvue_main

    for _ in range(2):
        assert simvue_main(["--store", str(store_dir), "spill", "import", str(spill_file)]) == 0
    imported = read_run(store_dir, "spilled")
    assert sum(len(points) for metric, points in imported["metrics"].items() if metric.startswith("full")) == 100 * 200


def test_a_disk_still_full_at_close_ends_the_run_promptly_and_close_says_so(store_dir):
    report, lines = _run("never-freed", 0, False)
    assert report["closed"] is False
    assert report["close_s"] < 10
    _no_noise(lines)
    from simvue.store import read_spilled_batches

    assert len(lines) == 2, lines  # the store refuses writes; what was spilled at close
    (spill_file,) = (store_dir / "spill").glob("*.store-batches")
    batches = [batch for _, batch in read_spilled_batches(spill_file)]
    assert sum(batch.point_count for batch in batches) == 100 * 200
    assert batches[-1].status == "completed"
    assert str(spill_file) in lines[-1]
    run = read_run(store_dir, "never-freed")
    assert run["status"] == "running"  # never written: it reads as lost once its heartbeat is old
    assert all(len(run["metrics"][f"before{i}"]) == 20 for i in range(200))
