"""Runs longer than every timeout, in real processes: a single process, fork and spawn
pools, and ``mpiexec -n 4``, each logging in bursts and idling between them for longer than
the sender timeout.  Every one must end ``completed`` with nothing lost.  And a process
that dies on the aggregator's node is seen within seconds, not after the sender timeout.

The timeouts are scaled down (``conftest.SCALED_TIMEOUTS``) and each test lasts at least
five times the longest of them (the ``scaled_timeouts`` fixture checks)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from simvue.store import RunNotFound

from conftest import LONGEST_TIMEOUT_S, ROOT, job_env, mpiexec, read_run, write_job

pytestmark = [pytest.mark.mpi_skip, pytest.mark.timeout(120)]

MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec in the virtual environment (pip install mpich)")

BURSTS, BURST_STEPS = 4, 50
IDLE_S = 1.5 * LONGEST_TIMEOUT_S  # longer than the sender timeout: only heartbeats keep a sender alive


def _watch(job: subprocess.Popen, store_dir: Path, name: str) -> list[str]:
    """Every status the run had in the store while the job ran (read four times a second)."""
    seen: list[str] = []
    while job.poll() is None:
        try:
            status = read_run(store_dir, name)["status"]
        except (RunNotFound, FileNotFoundError, Exception):  # not created yet, or the store is busy
            status = None
        if status is not None and (not seen or seen[-1] != status):
            seen.append(status)
        time.sleep(0.25)
    return seen


def _assert_nothing_lost(run: dict) -> None:
    assert run["status"] == "completed", run["events"][-5:]
    assert "lost" not in run["metadata"]["simvue"]
    assert "losses" not in run["metadata"]["simvue"], run["metadata"]["simvue"]["losses"]
    assert not [e for e in run["events"] if " lost: " in e["message"]]
    assert {p["state"] for p in run["metadata"]["simvue"]["processes"].values()} == {"done"}


SINGLE = f"""
    import sys, time
    from simvue import Run

    with Run() as run:
        run.init(name=sys.argv[1])
        step = 0
        for burst in range({BURSTS}):
            for _ in range({BURST_STEPS}):
                run.log_metrics({{"x": float(step)}})
                step += 1
            run.log_event(f"burst {{burst}}")
            time.sleep({IDLE_S})
"""


def test_a_single_process_that_idles_longer_than_every_timeout_ends_completed(store_dir, tmp_path, scaled_timeouts):
    job = subprocess.Popen([sys.executable, str(write_job(tmp_path, SINGLE)), "long-single"], env=job_env(scaled_timeouts),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _watch(job, store_dir, "long-single")
    assert job.wait() == 0, job.stderr.read()
    assert seen and set(seen) <= {"running", "completed"}, seen  # never read as lost meanwhile
    run = read_run(store_dir, "long-single")
    _assert_nothing_lost(run)
    assert [p[0] for p in run["metrics"]["x"]] == list(range(BURSTS * BURST_STEPS))
    assert [e["message"] for e in run["events"]] == [f"burst {b}" for b in range(BURSTS)]
    lasted = datetime.fromisoformat(run["ended"]) - datetime.fromisoformat(run["created"])
    assert lasted.total_seconds() >= BURSTS * IDLE_S


POOL = f"""
    import multiprocessing, os, sys, time
    from simvue import Run

    def task(args):
        run, number = args
        for i in range({BURST_STEPS}):
            step = number * {BURST_STEPS} + i
            run.log_metrics({{"x": float(step)}}, step=step)
        time.sleep({IDLE_S})
        return os.getpid()

    if __name__ == "__main__":
        method, name = sys.argv[1], sys.argv[2]
        with Run() as run:
            run.init(name=name)
            with multiprocessing.get_context(method).Pool(2) as pool:
                pids = pool.map(task, [(run, n) for n in range({2 * BURSTS})], chunksize=1)
            run.log_event("pool done")
        print(len(set(pids)))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_pool_whose_workers_idle_longer_than_every_timeout_ends_completed(method, store_dir, tmp_path, scaled_timeouts):
    name = f"long-pool-{method}"
    job = subprocess.Popen([sys.executable, str(write_job(tmp_path, POOL)), method, name], env=job_env(scaled_timeouts),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _watch(job, store_dir, name)
    out, err = job.communicate()
    assert job.returncode == 0, err
    assert seen and set(seen) <= {"running", "completed"}, seen
    run = read_run(store_dir, name)
    _assert_nothing_lost(run)
    series = {n: points for n, points in run["metrics"].items() if n.endswith("/x")}
    assert set(series) == {"worker0/x", "worker1/x"}, set(series)
    steps = sorted(p[0] for points in series.values() for p in points)
    assert steps == list(range(2 * BURSTS * BURST_STEPS))
    assert [e["message"] for e in run["events"]] == ["pool done"]


MPI_JOB = f"""
    import os, sys, time
    from simvue import Run
    from simvue.topology import detect

    rank = detect().rank
    with Run() as run:
        run.init(name=sys.argv[1], reduce={{"y": ["mean", "namespace"]}})
        step = 0
        for burst in range({BURSTS}):
            for _ in range({BURST_STEPS}):
                run.log_metrics({{"x": float(rank * 1000 + step), "y": float(rank)}}, step=step)
                step += 1
            time.sleep({IDLE_S})
        run.log_event(f"rank {{rank}} done")
"""


@needs_mpiexec
def test_an_mpi_job_whose_ranks_idle_longer_than_every_timeout_ends_completed(store_dir, tmp_path, scaled_timeouts):
    script = write_job(tmp_path, MPI_JOB)
    result = mpiexec(4, sys.executable, str(script), "long-mpi", env=job_env(scaled_timeouts), cwd=ROOT, timeout=90)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "long-mpi")
    _assert_nothing_lost(run)
    steps = list(range(BURSTS * BURST_STEPS))
    for rank in range(4):  # every rank's result, not just rank 0's
        assert [(p[0], p[2]) for p in run["metrics"][f"rank{rank}/x"]] == [(s, rank * 1000 + s) for s in steps]
        assert [p[0] for p in run["metrics"][f"rank{rank}/y"]] == steps
    # Each reduced step waited for every rank, across the idle stretches.
    assert [(p[0], p[2]) for p in run["metrics"]["y.count"]] == [(s, 4.0) for s in steps]
    assert {p[2] for p in run["metrics"]["y.mean"]} == {1.5}
    assert sorted(e["message"] for e in run["events"]) == [f"[rank{k}] rank {k} done" for k in range(4)]


DYING_RANK = """
    import os, sys, time
    from simvue import Run
    from simvue.topology import detect

    rank = detect().rank
    run = Run()
    run.init(name=sys.argv[1])
    for step in range(20):
        run.log_metrics({"x": float(step)}, step=step)
    if rank == 1:
        run.flush(10)
        os._exit(1)  # no goodbye: the launcher sees exit code 1 and waits for the others
    time.sleep(3)
    run.log_event(f"rank {rank} done")
    run.close()
"""


@needs_mpiexec
def test_a_rank_that_dies_on_the_aggregators_node_is_lost_in_seconds_not_at_the_timeout(store_dir, tmp_path):
    """With the default 120 s sender timeout, rank 1 calling ``os._exit(1)`` is seen at
    once by its pid: the job ends a few seconds after the other ranks finish."""
    env = job_env({})
    for name in ("SIMVUE_SENDER_TIMEOUT_S", "SIMVUE_HEARTBEAT_INTERVAL_S"):
        env.pop(name, None)
    started = time.monotonic()
    result = mpiexec(4, sys.executable, str(write_job(tmp_path, DYING_RANK)), "dying-rank", env=env, cwd=ROOT, timeout=150)
    took = time.monotonic() - started
    assert result.returncode != 0  # rank 1's exit code
    assert took < 60, f"the job took {took:.0f} s: rank 1 was only found lost by the 120 s timeout"
    run = read_run(store_dir, "dying-rank")
    assert run["status"] == "failed"
    assert run["metadata"]["simvue"]["lost"] == {"rank1": "its process ended without closing its part of the run"}
    for rank in range(4):
        assert [p[0] for p in run["metrics"][f"rank{rank}/x"]] == list(range(20)), f"rank{rank}"
    assert sorted(e["message"] for e in run["events"] if "done" in e["message"]) == [
        f"[rank{k}] rank {k} done" for k in (0, 2, 3)
    ]


DYING_CHILD = """
    import multiprocessing, os, sys, time
    from simvue import Run

    def child(run):
        run.log_metrics({"c": 1.0})
        run.flush(10)
        os._exit(3)

    if __name__ == "__main__":
        with Run() as run:
            run.init(name=sys.argv[1])
            process = multiprocessing.get_context("fork").Process(target=child, args=(run,))
            process.start()
            for step in range(30):
                run.log_metrics({"x": float(step)})
                time.sleep(0.1)
        started = time.monotonic()
        print(process.exitcode)  # never joined: a zombie until the parent exits
"""


def test_a_worker_process_that_dies_is_lost_in_seconds_and_the_run_fails(store_dir, tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(write_job(tmp_path, DYING_CHILD)), "dying-child"], env=job_env({}),
                            capture_output=True, text=True, timeout=100)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < 30, f"the parent took {took:.0f} s to finish its run"
    run = read_run(store_dir, "dying-child")
    assert run["status"] == "failed"
    assert run["metadata"]["simvue"]["lost"] == {"worker0": "its process ended without closing its part of the run"}
    assert [p[2] for p in run["metrics"]["worker0/c"]] == [1.0]
    assert len(run["metrics"]["x"]) == 30
