"""Real MPI jobs launched with ``mpiexec`` (MPICH's hydra from the venv) from an ordinary test.

The scripts never import mpi4py, so the ranks find rank 0's aggregator through the
rendezvous file.  Three ways a job ends: every rank completes; one rank stops answering
(SIGSTOP) and is declared lost; one rank is SIGKILLed and hydra then SIGKILLs every other
rank, rank 0 and its aggregator included, so only what was committed survives.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simvue.resources import node_name
from simvue.store import RunNotFound, Store

from conftest import ROOT, mpiexec, read_run

# Under ``mpiexec ... pytest --with-mpi`` each rank would start nested MPI jobs: skip there.
pytestmark = pytest.mark.mpi_skip

MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists():
    pytest.skip("no mpiexec in the virtual environment (pip install mpich)", allow_module_level=True)

# Variables a launcher puts into a rank's environment: a job started from inside a rank
# (pytest itself under mpiexec) must not inherit them.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_")


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.pop("SIMVUE_AGGREGATOR", None)
    env.update(extra)
    return env


def simvue_cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "simvue"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "simvue.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def _write(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def _launch(n: int, script: Path, env: dict[str, str], timeout: int = 60) -> subprocess.Popen:
    """``mpiexec -n N python script`` in its own session, under an outer timeout."""
    return subprocess.Popen(
        ["timeout", "-k", "10", str(timeout), str(MPIEXEC), "-n", str(n), sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(env),
        cwd=ROOT,
        start_new_session=True,
    )


def _wait_until_ended(store_dir: Path, name: str, timeout_s: float) -> str:
    """Poll the store (which rank 0 creates) until the run has a final status."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        if (store_dir / "simvue.db").exists():
            try:
                status = read_run(store_dir, name)["status"]
            except RunNotFound:
                status = None
            if status not in (None, "running", "created"):
                return status
        time.sleep(0.05)
    raise AssertionError(f"run {name!r} did not end within {timeout_s:g} s (status {status!r})")


def _stop_job(job: subprocess.Popen) -> None:
    if job.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(job.pid, sig)
            except ProcessLookupError:
                pass
        job.wait(30)


# -- 1. a whole job ------------------------------------------------------------------------


def test_mpi_sim_example_with_four_ranks_records_one_complete_run(store_dir):
    steps, name = 1200, f"mpi-sim-{os.getpid()}"  # long enough for a resource sample a second
    job = mpiexec(4, sys.executable, "examples/mpi_sim.py", cwd=ROOT, timeout=60,
                  env=_clean_env({"MPI_SIM_STEPS": str(steps), "MPI_SIM_NAME": name, "SIMVUE_RESOURCES_INTERVAL_S": "1"}))
    assert job.returncode == 0, job.stderr
    assert job.stdout.strip() == name  # only rank 0 prints, and it knows the run's name

    run = read_run(store_dir, name)
    assert run["status"] == "completed"
    assert run["folder"] == "/examples/mpi" and run["tags"] == ["mpi"] and run["metadata"]["steps"] == steps
    assert set(run["metadata"]["simvue"]["processes"]) == {f"rank{k}" for k in range(4)}
    assert "lost" not in run["metadata"]["simvue"]
    metrics = {name: points for name, points in run["metrics"].items() if not name.startswith("resources/")}
    assert set(metrics) == {f"rank{k}/loss" for k in range(4)} | {"residual.mean", "residual.max", "residual.count"}
    # Resource series for every rank and for the node (docs/resources.md).
    host = node_name(socket.gethostname())
    for k in range(4):
        assert run["metrics"].get(f"resources/rank{k}/cpu.usage.percentage"), f"no resource series for rank{k}"
        assert all(p[2] > 10 for p in run["metrics"][f"resources/rank{k}/memory.usage"])
    assert len(run["metrics"][f"resources/node/{host}/memory.available"]) >= 2
    assert {n.split("/")[1] for n in run["metrics"] if n.startswith("resources/")} == {"node"} | {f"rank{k}" for k in range(4)}

    def loss(k: int, step: int) -> float:  # as examples/mpi_sim.py computes it
        return math.exp(-step / 50.0) * (1 + 0.1 * k)

    for k in range(4):
        points = metrics[f"rank{k}/loss"]
        assert [p[0] for p in points] == list(range(steps)), f"rank{k}/loss is incomplete"
        assert [p[2] for p in points] == [loss(k, s) for s in range(steps)]
    for op, reference in (("mean", lambda v: math.fsum(v) / len(v)), ("max", max), ("count", len)):
        points = metrics[f"residual.{op}"]
        assert [p[0] for p in points] == list(range(steps)), f"residual.{op} is incomplete"
        for step, _, value in points:
            residuals = [loss(k, step) * (k + 1) for k in range(4)]
            assert value == pytest.approx(reference(residuals), rel=1e-12), (op, step)
    messages = [e["message"] for e in run["events"]]
    assert sorted(messages) == [f"[rank{k}] rank {k} finished" for k in range(4)]

    # The command-line tool shows the same run.
    listing = simvue_cli("runs", "list")
    assert listing.returncode == 0, listing.stderr
    assert any(line.split()[:3] == [name, "completed", "/examples/mpi"] for line in listing.stdout.splitlines())
    show = simvue_cli("runs", "show", name)
    assert show.returncode == 0, show.stderr
    assert "status:      completed" in show.stdout
    for k in range(4):
        assert f"rank{k}/loss: {steps} points, last step {steps - 1}" in show.stdout
    assert f"residual.count: {steps} points, last step {steps - 1} = 4" in show.stdout
    exported = simvue_cli("export", name, "--format", "json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout) == json.loads(json.dumps(run))


# -- 2. a rank stops answering -----------------------------------------------------------

STOPPING_RANK = """
    import os, signal, sys, time
    from simvue import Run
    from simvue.topology import detect

    rank, out = detect().rank, os.environ["OUT_DIR"]
    steps, stop_at = int(os.environ["STEPS"]), int(os.environ["STOP_AT"])
    run = Run()
    run.init(name=os.environ["RUN_NAME"])
    for step in range(steps):
        run.log_metrics({"x": rank * 1000 + step}, step=step)
        if rank == 2 and step == stop_at:
            assert run.flush(10), "rank 2 could not flush before stopping"
            with open(os.path.join(out, "rank2.pid"), "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
            # Continued by the test once the run has ended without us: nothing more arrives.
            run.log_metrics({"x": -1.0}, step=step + 1)
            run.log_event("rank 2 woke up")
            break
        time.sleep(0.01)
    run.log_event("done")
    closed = run.close()
    with open(os.path.join(out, f"rank{rank}.closed"), "w") as f:
        f.write(repr(closed))
"""


def test_a_rank_that_stops_answering_is_lost_and_the_run_fails(store_dir, tmp_path):
    steps, stop_at, name = 80, 19, f"mpi-stop-{os.getpid()}"
    script = _write(tmp_path, "stopping_rank.py", STOPPING_RANK)
    env = {
        "OUT_DIR": str(tmp_path), "STEPS": str(steps), "STOP_AT": str(stop_at), "RUN_NAME": name,
        "SIMVUE_SENDER_TIMEOUT_S": "3", "SIMVUE_HEARTBEAT_INTERVAL_S": "0.2", "SIMVUE_CLOSE_TIMEOUT_S": "1",
    }
    started = time.monotonic()
    job = _launch(4, script, env)
    try:
        ended = _wait_until_ended(store_dir, name, timeout_s=45)
        ended_after = time.monotonic() - started
        # The run has ended without rank 2: let it go on (its remaining records cannot arrive).
        os.kill(int((tmp_path / "rank2.pid").read_text()), signal.SIGCONT)
        out, err = job.communicate(timeout=45)
    finally:
        _stop_job(job)
    assert job.returncode == 0, err
    print(f"\nrun ended {ended_after:.1f} s after launch, status {ended!r} (sender timeout 3 s)")

    run = read_run(store_dir, name)
    assert run["status"] == "failed"
    lost = run["metadata"]["simvue"]["lost"]
    assert lost == {"rank2": "silent for more than 3 s"}
    assert run["metadata"]["simvue"]["processes"]["rank2"]["state"] == "lost"
    assert {run["metadata"]["simvue"]["processes"][f"rank{k}"]["state"] for k in (0, 1, 3)} == {"done"}
    lost_events = [e for e in run["events"] if "lost" in e["message"]]
    assert len(lost_events) == 1 and lost_events[0]["level"] == "error"
    assert lost_events[0]["message"].startswith("rank2 (pid ") and "lost: silent for more than 3 s" in lost_events[0][
        "message"]
    assert sorted(e["message"] for e in run["events"] if "lost" not in e["message"]) == [
        f"[rank{k}] done" for k in (0, 1, 3)
    ]
    for k in (0, 1, 3):
        points = run["metrics"][f"rank{k}/x"]
        assert [(p[0], p[2]) for p in points] == [(s, k * 1000 + s) for s in range(steps)], f"rank{k} incomplete"
    # Rank 2 flushed before it stopped: all of that is there, and nothing after it.
    assert [(p[0], p[2]) for p in run["metrics"]["rank2/x"]] == [(s, 2000 + s) for s in range(stop_at + 1)]
    # Every rank's close() said whether its records were delivered; rank 2's were not, and
    # they were kept in a spill file rather than dropped silently.
    assert {k: (tmp_path / f"rank{k}.closed").read_text() for k in range(4)} == {
        0: "True", 1: "True", 2: "False", 3: "True"
    }
    assert list((store_dir / "spill").glob(f"{name}-rank2-*.msgpack")), "rank 2's late records were not spilled"
    assert read_run(store_dir, name)["status"] == "failed"  # and it stays so


# -- 3. the launcher kills the whole job --------------------------------------------------

KILLED_JOB = """
    import os, signal, time
    from simvue import Run
    from simvue.topology import detect

    rank, out = detect().rank, os.environ["OUT_DIR"]
    kill_at, interval = int(os.environ["KILL_AT"]), float(os.environ["INTERVAL_S"])
    progress = os.open(os.path.join(out, f"progress-rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    run = Run()
    run.init(name=os.environ["RUN_NAME"])
    for step in range(int(os.environ.get("STEPS", "100000"))):  # until hydra kills this rank
        run.log_metrics({"x": rank * 1_000_000 + step}, step=step)
        os.write(progress, f"{step} {time.time()!r}\\n".encode())
        if rank == 3 and step == kill_at:
            with open(os.path.join(out, "killed.txt"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(interval)
"""


def _last_logged(path: Path) -> tuple[int, float]:
    """The last complete ``step time`` line a rank wrote after logging that step."""
    step, logged_at = path.read_text().splitlines()[-1].split()  # one os.write per line
    return int(step), float(logged_at)


# Intel MPI's Hydra leaves the other ranks running when one is killed; MPICH's and Open MPI's
# launchers kill them all.  scripts/test-mpi.sh says which MPI this is.
LAUNCHER_LEAVES_THE_OTHERS = os.environ.get("SIMVUE_TEST_MPI") == "impi"


@pytest.mark.skipif(LAUNCHER_LEAVES_THE_OTHERS, reason="this launcher does not kill the other ranks (next test)")
@pytest.mark.parametrize("aggregate_in", ["process", "thread"])
def test_when_the_launcher_kills_every_rank_the_committed_data_survives_and_the_run_reads_lost(
    store_dir, tmp_path, aggregate_in
):
    """The launcher SIGKILLs every rank.  With the aggregator in a process of its own (the
    default), that process is not among them: it ends the run ``failed`` with everything that
    reached it.  With the aggregator a thread of rank 0, it dies too: what it had committed
    survives, and the run reads ``lost`` once its heartbeat is old."""
    name, kill_at, interval, heartbeat_timeout = f"mpi-kill-{os.getpid()}", 100, 0.01, 2.0
    script = _write(tmp_path, "killed_job.py", KILLED_JOB)
    env = {
        "OUT_DIR": str(tmp_path), "KILL_AT": str(kill_at), "INTERVAL_S": str(interval), "RUN_NAME": name,
        "SIMVUE_RUN_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout), "SIMVUE_AGGREGATE_IN": aggregate_in,
    }
    job = _launch(4, script, env, timeout=60)
    try:
        out, err = job.communicate(timeout=90)
    finally:
        _stop_job(job)
    assert job.returncode not in (0, 124, 137), f"rc={job.returncode}\n{err}"  # 124/137: our outer timeout
    assert (tmp_path / "killed.txt").exists(), err
    killed_at = float((tmp_path / "killed.txt").read_text())
    if aggregate_in == "process":
        assert _wait_until_ended(store_dir, name, 30) == "failed"

    store = Store(store_dir)  # readable after its writer was SIGKILLed mid-run
    try:
        raw = store.run(name)
        windows, counts = {}, {}
        for k in range(4):
            series = store.metric_series(raw["id"], f"rank{k}/x")
            steps = list(series["steps"])
            assert steps, f"nothing of rank {k} was committed"
            # A prefix of what the rank logged: no holes, no duplicates, the right values.
            assert steps == list(range(len(steps))), f"rank{k}/x has holes"
            assert list(series["values"]) == [k * 1_000_000 + s for s in steps]
            last_step, last_logged_at = _last_logged(tmp_path / f"progress-rank{k}.txt")
            assert steps[-1] <= last_step + 1  # (+1: killed between logging and noting it)
            windows[k] = max(0.0, last_logged_at - series["timestamps"][-1])
            counts[k] = (len(steps), last_step + 1)
        assert store.metric_names(raw["id"]) == [f"rank{k}/x" for k in range(4)]
        assert counts[3][1] == kill_at + 1
        heartbeat = raw["heartbeat"]
    finally:
        store.close()
    lines = [
        f"rank{k}: {counts[k][0]} of {counts[k][1]} logged points committed, "
        f"last committed point {windows[k]:.3f} s before its last logged one" for k in range(4)
    ]
    window = max(windows.values())
    print("\n".join(["", *lines, f"loss window: {window:.3f} s (max over ranks); "
                     f"last heartbeat {killed_at - heartbeat:+.3f} s before the kill"]))
    assert window < 2.0, lines
    if aggregate_in == "process":
        run = read_run(store_dir, name)
        assert set(run["metadata"]["simvue"]["lost"]) == {f"rank{k}" for k in range(4)}
        return

    # The run was never ended: it reads as running until its heartbeat is older than
    # heartbeat_timeout_s, then as lost, and stays so.
    assert raw["heartbeat_timeout_s"] == heartbeat_timeout
    assert killed_at - heartbeat < 2.0  # the aggregator was writing its heartbeat until the kill
    probe = Store(store_dir)
    try:
        assert probe.run(name, now=heartbeat + heartbeat_timeout / 2)["status"] == "running"
        assert probe.run(name, now=heartbeat + heartbeat_timeout + 0.01)["status"] == "lost"
    finally:
        probe.close()
    time.sleep(max(0.0, heartbeat + heartbeat_timeout + 0.1 - time.time()))
    assert read_run(store_dir, name)["status"] == "lost"
    listing = simvue_cli("runs", "list", "--status", "lost", "--json")
    assert [r["name"] for r in json.loads(listing.stdout)] == [name]


@pytest.mark.skipif(not LAUNCHER_LEAVES_THE_OTHERS, reason="this launcher kills the other ranks too (test above)")
def test_when_the_launcher_leaves_the_others_running_a_killed_rank_is_lost_and_the_run_fails(store_dir, tmp_path):
    """Intel MPI: rank 3 is SIGKILLed at step 100 and the others go on to step 300 and close.
    Rank 0 finds rank 3's process gone: the run ends ``failed`` with rank 3 lost, every point
    of the others and rank 3's up to its death."""
    name, kill_at, steps = f"mpi-kill-one-{os.getpid()}", 100, 300
    script = _write(tmp_path, "killed_job.py", KILLED_JOB)
    env = {"OUT_DIR": str(tmp_path), "KILL_AT": str(kill_at), "INTERVAL_S": "0.01", "RUN_NAME": name,
           "STEPS": str(steps)}
    job = _launch(4, script, env, timeout=60)
    try:
        out, err = job.communicate(timeout=90)
    finally:
        _stop_job(job)
    assert job.returncode not in (0, 124, 137), f"rc={job.returncode}\n{err}"
    run = read_run(store_dir, name)
    assert run["status"] == "failed", run["events"][-3:]
    assert list(run["metadata"]["simvue"]["lost"]) == ["rank3"]
    for k in range(3):
        assert [p[0] for p in run["metrics"][f"rank{k}/x"]] == list(range(steps)), f"rank{k}"
    rank3 = [p[0] for p in run["metrics"]["rank3/x"]]
    assert rank3 == list(range(len(rank3))) and kill_at - 50 <= len(rank3) <= kill_at + 1
