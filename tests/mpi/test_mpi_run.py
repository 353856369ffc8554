"""One run from every rank of an MPI job, run by pytest-mpi at 2 and 4 ranks:

    mpiexec -n 4 python tests/mpi_pytest.py -q --timeout=120 --timeout-method=thread --only-mpi tests/mpi

pytest-mpi has imported and initialised mpi4py, so the ranks find rank 0's aggregator
through the mpi4py broadcast.  Every rank takes part in every test; rank 0 reads the store
and shares what it found, and every rank asserts on every rank's results, so that a failure
is reported (identically) by all ranks and the collectives stay in step across tests.

Waits that may be long use non-blocking requests and sleeps: MPICH busy-polls in blocking
calls and would starve rank 0 (the aggregator) on an oversubscribed machine.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from simvue import Run
from simvue.topology import initialised_mpi

from conftest import read_run, wait_for_status

pytestmark = pytest.mark.mpi

STEPS = 500
WAIT_S = 60.0


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def shared_store(mpi_tmp_path: Path, monkeypatch) -> Path:
    """One store (rank 0's tmp dir) for every rank: the autouse fixture gave each rank its own."""
    monkeypatch.setenv("SIMVUE_STORE", str(mpi_tmp_path / "store"))
    monkeypatch.setenv("SIMVUE_RENDEZVOUS_DIR", str(mpi_tmp_path / "rendezvous"))
    return mpi_tmp_path / "store"


def _wait(request, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not request.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"MPI {what} did not complete within {WAIT_S:g} s (another rank failed?)")
        time.sleep(0.002)


def allgather(comm, obj):
    """Every rank's ``obj``, on every rank; the long wait is a polled Ibarrier."""
    _wait(comm.Ibarrier(), "barrier")
    return comm.allgather(obj)


def from_root(comm, obj):
    """Rank 0's ``obj`` on every rank, while the others sleep until rank 0 is ready."""
    _wait(comm.Ibarrier(), "barrier")
    return comm.bcast(obj, root=0)


def _finished_run(comm, store: Path, name: str, check) -> tuple[dict | None, list[str]]:
    """On rank 0: wait for the run to end, then ``check(run)`` -> problems; shared with all."""
    report: tuple[dict | None, list[str]] = (None, [])
    if comm.Get_rank() == 0:
        try:
            run = wait_for_status(store, name, timeout_s=WAIT_S)
            report = (run, list(check(run)))
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            report = (None, [f"rank 0 could not check the store: {exc!r}"])
    return from_root(comm, report)


def test_every_point_of_every_rank_is_stored_after_close(comm, shared_store):
    rank, size = comm.Get_rank(), comm.Get_size()
    # Only rank 0's name counts: the others pass none and must learn rank 0's.
    wanted = f"mpi-points-n{size}-{os.getpid()}" if rank == 0 else None
    run = Run()
    started = run.init(name=wanted, folder="/mpi", tags=["mpi-test"])
    for step in range(STEPS):
        assert run.log_metrics({"x": rank * 100_000 + step, "y": step * 0.5 - rank}, step=step)
    closed = run.close()
    # The ranks met through mpi4py (initialised by pytest-mpi), not through a rendezvous file.
    via_mpi = initialised_mpi() is not None and not any(Path(os.environ["SIMVUE_RENDEZVOUS_DIR"]).glob("*"))
    mine = {"rank": rank, "init": started, "closed": closed, "name": run.name, "via_mpi": via_mpi}
    everyone = allgather(comm, mine)
    name = everyone[0]["name"]

    def check(stored: dict):
        if stored["status"] != "completed":
            yield f"status {stored['status']!r}, expected 'completed'"
        expected_names = {f"rank{k}/{m}" for k in range(size) for m in ("x", "y")}
        if set(stored["metrics"]) != expected_names:
            yield f"metric names {sorted(stored['metrics'])}, expected {sorted(expected_names)}"
        for k in range(size):
            for metric, value in (("x", lambda s: k * 100_000 + s), ("y", lambda s: s * 0.5 - k)):
                points = stored["metrics"].get(f"rank{k}/{metric}", [])
                steps = [p[0] for p in points]
                if steps != list(range(STEPS)):
                    missing = sorted(set(range(STEPS)) - set(steps))
                    yield f"rank{k}/{metric}: {len(points)} points, steps missing {missing[:10]}"
                    continue
                wrong = [p for p in points if p[2] != value(p[0])]
                if wrong:
                    yield f"rank{k}/{metric}: wrong values, e.g. {wrong[:3]}"
                times = [p[1] for p in points]
                if times != sorted(times) or times[0] < 0:
                    yield f"rank{k}/{metric}: times not increasing from the run's start"

    stored, problems = _finished_run(comm, shared_store, name, check)
    for result in everyone:
        assert result["init"] is True, result
        assert result["closed"] is True, f"close() returned False on rank {result['rank']}"
        assert result["name"] == name, f"rank {result['rank']} sees run {result['name']!r}, rank 0 {name!r}"
        assert result["via_mpi"], f"rank {result['rank']} did not use the mpi4py rendezvous"
    assert name == wanted or rank != 0
    assert not problems, "\n".join(problems)
    assert stored["name"] == name and stored["tags"] == ["mpi-test"]


def test_reduced_values_equal_a_reference_computed_over_ranks(comm, shared_store):
    rank, size = comm.Get_rank(), comm.Get_size()
    steps = 200

    def loss(k: int, step: int) -> float:
        return math.sin(0.1 * step + k) * (k + 1) + step / 7.0

    run = Run()
    started = run.init(
        name=f"mpi-reduce-n{size}-{os.getpid()}" if rank == 0 else None,
        reduce={"loss": ["mean", "min", "max", "sum"]},
    )
    for step in range(steps):
        run.log_metrics({"loss": loss(rank, step), "other": float(rank)}, step=step)
    closed = run.close()
    everyone = allgather(comm, {"rank": rank, "init": started, "closed": closed, "name": run.name})
    name = everyone[0]["name"]

    def check(stored: dict):
        if stored["status"] != "completed":
            yield f"status {stored['status']!r}, expected 'completed'"
        metrics = stored["metrics"]
        expected_names = {f"loss.{op}" for op in ("mean", "min", "max", "sum", "count")}
        expected_names |= {f"rank{k}/other" for k in range(size)}
        if set(metrics) != expected_names:
            yield f"metric names {sorted(metrics)}, expected {sorted(expected_names)}"
        ops = {
            "mean": lambda v: math.fsum(v) / len(v),
            "min": min,
            "max": max,
            "sum": math.fsum,
            "count": lambda v: float(len(v)),
        }
        for op, reference in ops.items():
            points = metrics.get(f"loss.{op}", [])
            if [p[0] for p in points] != list(range(steps)):
                yield f"loss.{op}: steps {[p[0] for p in points][:10]}..., expected 0..{steps - 1}"
                continue
            for step, _, value in points:
                want = reference([loss(k, step) for k in range(size)])
                if value != pytest.approx(want, rel=1e-12, abs=1e-12):
                    yield f"loss.{op} at step {step}: {value!r}, reference {want!r}"
                    break
        if any(p[2] != float(size) for p in metrics.get("loss.count", [])):
            yield f"loss.count is not {size} at every step"
        for k in range(size):
            if [p[2] for p in metrics.get(f"rank{k}/other", [])] != [float(k)] * steps:
                yield f"rank{k}/other (not reduced) is not complete"

    _, problems = _finished_run(comm, shared_store, name, check)
    for result in everyone:
        assert result["init"] is True and result["closed"] is True, result
        assert result["name"] == name, result
    assert not problems, "\n".join(problems)


def test_events_and_metadata_of_every_rank_arrive_and_the_run_completes(comm, shared_store):
    rank, size = comm.Get_rank(), comm.Get_size()
    run = Run()
    started = run.init(
        name=f"mpi-events-n{size}-{os.getpid()}" if rank == 0 else None,
        metadata={"ranks": {"r0": 0}, "base": "rank0"} if rank == 0 else {"ignored": rank},
    )
    results = [started]
    results.append(run.log_event(f"hello from {rank}"))
    results.append(run.log_event(f"rank {rank} warns", log_level="warning"))
    if rank:
        results.append(run.update_metadata({"ranks": {f"r{rank}": rank}, f"only{rank}": {"pid": os.getpid()}}))
        results.append(run.update_tags([f"tag{rank}"]))
    run.log_metrics({"z": 1.0})
    results.append(run.close())
    everyone = allgather(comm, {"rank": rank, "results": results, "name": run.name, "pid": os.getpid()})
    name = everyone[0]["name"]
    pids = {r["rank"]: r["pid"] for r in everyone}

    def check(stored: dict):
        if stored["status"] != "completed":
            yield f"status {stored['status']!r}, expected 'completed'"
        messages = [(e["message"], e["level"]) for e in stored["events"]]
        for k in range(size):
            for message in ((f"[rank{k}] hello from {k}", "info"), (f"[rank{k}] rank {k} warns", "warning")):
                if messages.count(message) != 1:
                    yield f"event {message} appears {messages.count(message)} times in {messages}"
        metadata = stored["metadata"]
        if metadata.get("ranks") != {f"r{k}": k for k in range(size)}:
            yield f"metadata 'ranks' not merged from every rank: {metadata.get('ranks')}"
        if metadata.get("base") != "rank0":
            yield "rank 0's initial metadata was lost"
        if "ignored" in metadata:
            yield "a non-zero rank's init() metadata was applied"
        for k in range(1, size):
            if metadata.get(f"only{k}") != {"pid": pids[k]}:
                yield f"rank {k}'s metadata update is missing: {metadata.get(f'only{k}')}"
        processes = metadata.get("simvue", {}).get("processes", {})
        for k in range(size):
            described = processes.get(f"rank{k}", {})
            if described.get("pid") != pids[k] or described.get("state") != "done":
                yield f"process rank{k} described as {described}, pid {pids[k]}"
        if "lost" in metadata.get("simvue", {}):
            yield f"ranks declared lost: {metadata['simvue']['lost']}"
        if sorted(stored["tags"]) != sorted(f"tag{k}" for k in range(1, size)):
            yield f"tags {stored['tags']}"
        if stored["metrics"].keys() != {f"rank{k}/z" for k in range(size)}:
            yield f"metrics {sorted(stored['metrics'])}"

    _, problems = _finished_run(comm, shared_store, name, check)
    for result in everyone:
        assert all(r is True for r in result["results"]), result
        assert result["name"] == name, result
    assert not problems, "\n".join(problems)
    if rank == 0:  # the CLI's reader agrees (rank 0 only: one reader is enough)
        assert read_run(shared_store, name)["status"] == "completed"
