"""Jobs under a real Slurm: slurmctld and slurmd on this machine (``bash scripts/slurm-cluster.sh
up``, which ``scripts/test.sh`` runs), real ``srun``, ``sbatch``, ``scancel`` and ``scontrol``.

No ``mpiexec`` anywhere: the tasks of a step find their rank from Slurm's variables and rank 0
through the rendezvous file keyed by the job and step id.  Every test checks every task's
every point (or, where the job is stopped, every task's points up to the signal).

The cluster is never started from here: without ``sinfo``, or without an idle node, the
module is skipped and says why.  What Slurm 22.05 (Debian 12) does, as measured here:

* ``scancel JOB`` (and a time limit): SIGCONT + SIGTERM to every task of every step, SIGKILL
  ``KillWait`` later (3 s in this cluster) to what is left;
* ``scancel JOB.STEP``: SIGKILL to every task of the step at once, no SIGTERM;
* ``--signal=USR1@N``: SIGCONT + SIGUSR1 to every process of every step (not the batch shell)
  about N s before the time limit, checked every 30 s by slurmctld;
* time limits count in whole minutes and are enforced on the same 30 s tick, so the
  shortest real one (``--time=1``) ends a job 60-90 s after it starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from simvue.resources import node_name
from simvue.store import Store

from conftest import read_run, wait_for_status


def _cluster_problem() -> str | None:
    """Why Slurm jobs cannot run here, or None."""
    for tool in ("sinfo", "srun", "sbatch", "scancel", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            return f"Slurm is not installed ({tool} not found)"
    try:
        answer = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s (is slurmctld running?)"
    if answer.returncode != 0:
        last = (answer.stderr.strip().splitlines() or ["no message"])[-1]
        return f"no Slurm cluster answers (sinfo: {last[:300]})"
    states = answer.stdout.split()
    if not any(state in ("idle", "mix") for state in states):
        return f"no idle Slurm node (sinfo: {' '.join(states) or 'no nodes'})"
    return None


_PROBLEM = _cluster_problem()
pytestmark = [
    pytest.mark.skipif(_PROBLEM is not None,
                       reason=f"{_PROBLEM}; start a one-node cluster with `bash scripts/slurm-cluster.sh up` (as root)"),
    pytest.mark.mpi_skip,
    pytest.mark.timeout(100),
]

KILL_WAIT_S = 3.0  # KillWait in scripts/slurm-cluster.sh's slurm.conf
WINDOW_S = 0.5  # data kept up to this long before a signal (docs/reliability.md)
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_", "SLURM_", "SBATCH_",
                      "SRUN_", "SALLOC_")

# Every task of every test runs this.  It reports what it is (rank from simvue.topology, the
# job id, the run it joined) and how many points it logged, in files under argv[1].
JOB = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from simvue import Run
    from simvue.topology import detect

    out = sys.argv[1]
    topology = detect()
    rank = topology.rank
    tag = f"{topology.job_id}-rank{rank}"
    points = int(os.environ.get("JOB_POINTS", "100"))  # 0: until stopped or JOB_MAX_S
    warned = []
    if os.environ.get("JOB_USR1_HANDLER"):  # the usual checkpoint hook for Slurm's warning
        signal.signal(signal.SIGUSR1, lambda *_: warned.append(time.time()))
    if rank == int(os.environ.get("JOB_STUCK_RANK", "-1")):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a rank stuck in C code
    with Run() as run:
        run.init(name=os.environ.get("JOB_RUN_NAME") or None)
        with open(os.path.join(out, f"report-{tag}.json"), "w") as report:
            json.dump({"rank": rank, "size": topology.size, "launcher": topology.launcher,
                       "job_id": topology.job_id, "name": run.name, "id": run.id, "pid": os.getpid(),
                       "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}, report)
        deadline = time.monotonic() + float(os.environ.get("JOB_MAX_S", "60"))
        step = 0
        while (points == 0 or step < points) and time.monotonic() < deadline:
            run.log_metrics({"x": float(step)}, step=step)
            step += 1
            if step == 50:
                open(os.path.join(out, f"running-{tag}"), "w").close()
            if warned and time.time() > warned[0] + 1:
                run.log_event(f"checkpointing: SIGUSR1 at {warned[0]:.3f}")
                break
            time.sleep(0.01)
    with open(os.path.join(out, f"done-{tag}.json"), "w") as done:
        json.dump({"points": step}, done)
    """
)


@pytest.fixture
def job_name():
    """A Slurm job name of this test's own; whatever still runs under it is cancelled after."""
    name = f"simvue-test-{uuid.uuid4().hex[:10]}"
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _squeue(name):
        time.sleep(0.2)


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "job.py").write_text(JOB)
    return tmp_path


def _squeue(name: str) -> str:
    return subprocess.run(["squeue", "-h", "--name", name, "-o", "%i"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (SLURM_CONF stays), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) or k == "SLURM_CONF"}
    env.pop("SIMVUE_AGGREGATOR", None)
    env.update(extra)
    return env


def _srun(out: Path, job_name: str, *options: str, tasks: int = 4, timeout: int = 60) -> list[str]:
    """``srun -n TASKS python job.py OUT`` under an outer timeout.  ``--overcommit``: a node of
    2 CPUs runs 4 tasks."""
    return ["timeout", "-k", "5", str(timeout), "srun", "--job-name", job_name, "-n", str(tasks), "--overcommit",
            *options, sys.executable, str(out / "job.py"), str(out)]


def _start(command: list[str], out: Path, env: dict[str, str], tasks: int = 4) -> tuple[subprocess.Popen, list[dict]]:
    """Start ``command``; return once every task has logged 50 points, with their reports."""
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out,
                           start_new_session=True)
    deadline = time.monotonic() + 30
    while len(list(out.glob("running-*"))) < tasks:
        if job.poll() is not None or time.monotonic() > deadline:
            _, err = _finish(job, 1)
            raise AssertionError(f"the job's {tasks} tasks did not all start (rc {job.returncode}): {err[-3000:]}")
        time.sleep(0.02)
    time.sleep(0.5)  # a little of a steady state
    return job, _reports(out, tasks)


def _finish(job: subprocess.Popen, timeout_s: float = 20) -> tuple[str, str]:
    try:
        return job.communicate(timeout=timeout_s)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)
            job.communicate()


def _reports(out: Path, expected: int) -> list[dict]:
    reports = [json.loads(path.read_text()) for path in sorted(out.glob("report-*.json"))]
    assert len(reports) == expected, reports
    return reports


def _points(out: Path, report: dict) -> int:
    """How many points the task of ``report`` logged (it wrote this when its run ended)."""
    return json.loads((out / f"done-{report['job_id']}-rank{report['rank']}.json").read_text())["points"]


def _one_job(reports: list[dict], tasks: int = 4) -> dict:
    """The tasks of one step: ranks 0..tasks-1 of one Slurm job and step, in one run."""
    assert sorted(r["rank"] for r in reports) == list(range(tasks)), reports
    assert {(r["launcher"], r["size"]) for r in reports} == {("slurm", tasks)}, reports
    assert len({r["job_id"] for r in reports}) == 1 and re.fullmatch(r"slurm-\d+\.\d+", reports[0]["job_id"]), reports
    assert len({(r["name"], r["id"]) for r in reports}) == 1 and reports[0]["id"], reports  # one run, every task in it
    return reports[0]


def _runs(store_dir: Path) -> list[dict]:
    store = Store(store_dir)
    try:
        return store.runs()
    finally:
        store.close()


def _stored(store_dir: Path, run_id: str) -> dict:
    store = Store(store_dir)
    try:
        return store.run(run_id)
    finally:
        store.close()


def _check_complete(store_dir: Path, out: Path, reports: list[dict]) -> None:
    """Every task's every point, once, in order, in its own series of the run."""
    store = Store(store_dir)
    try:
        for report in reports:
            points = _points(out, report)
            series = store.metric_series(report["id"], f"rank{report['rank']}/x")
            assert points >= 50 and list(series["steps"]) == list(range(points)), (report, points, len(series["steps"]))
            assert list(series["values"]) == [float(step) for step in range(points)], report
    finally:
        store.close()


def _check_window(store_dir: Path, reports: list[dict], signalled_at: float) -> None:
    """Every task's points up to at most WINDOW_S before the signal."""
    store = Store(store_dir)
    try:
        for report in reports:
            series = store.metric_series(report["id"], f"rank{report['rank']}/x")
            stamps = series["timestamps"]
            assert stamps and stamps[-1] >= signalled_at - WINDOW_S, (report["rank"], signalled_at - stamps[-1])
            assert list(series["steps"]) == list(range(len(series["steps"]))), report["rank"]  # no gap before it
    finally:
        store.close()


def _gone_after(pids: list[int], since: float, timeout_s: float = 20) -> dict[int, float]:
    """When (seconds after ``since``) each process ended, polled every 20 ms."""
    gone: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(gone) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in gone:
                try:
                    alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive:
                    gone[pid] = time.time() - since
        time.sleep(0.02)
    return gone


def _tasks_exited(err: str, code: int) -> set[int]:
    """The tasks srun says exited with ``code`` (it groups them: "tasks 0-1,3", "task 2")."""
    tasks: set[int] = set()
    for group in re.findall(rf"tasks? ([\d,-]+): Exited with exit code {code}\b", err):
        for part in group.split(","):
            first, _, last = part.partition("-")
            tasks.update(range(int(first), int(last or first) + 1))
    return tasks


def _slurm_jobs(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job``, one dictionary per job (every element of an array); Slurm keeps
    ended jobs for MinJobAge (300 s)."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                          timeout=30).stdout
    return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in text.splitlines()]


def _slurm_job(job_id: str, timeout_s: float = 20) -> dict[str, str]:
    """The job's final state, once slurmctld has finished ending it (COMPLETING lasts until
    every process of the job is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        (job,) = _slurm_jobs(job_id)
        if job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def _sbatch(out: Path, job_name: str, script: str, *options: str, env: dict[str, str], timeout_s: float = 60) -> str:
    """Submit ``script`` and wait (polling squeue, faster than ``sbatch --wait``) until every
    job it made has ended, each COMPLETED with exit code 0; its job id."""
    (out / "batch.sh").write_text(f"#!/bin/bash\nset -e\n{script}")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--job-name", job_name, "--overcommit", "-o", str(out / "slurm-%j.out"), *options,
         str(out / "batch.sh")], capture_output=True, text=True, env=env, cwd=out, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout_s
    while _squeue(job_name):
        assert time.monotonic() < deadline, f"job {job} still queued or running after {timeout_s:g} s"
        time.sleep(0.1)
    ended = _slurm_jobs(job)
    logs = "".join(path.read_text() for path in out.glob("slurm-*.out"))
    assert ended and {(j["JobState"], j["ExitCode"]) for j in ended} == {("COMPLETED", "0:0")}, (ended, logs[-3000:])
    return job


def _job_number(report: dict) -> str:
    return report["job_id"].removeprefix("slurm-").split(".")[0]


# -- whole jobs ------------------------------------------------------------------------------


def test_srun_of_four_tasks_without_mpiexec_makes_one_complete_run(store_dir, out, job_name):
    result = subprocess.run(_srun(out, job_name), capture_output=True, text=True, env=_env(), cwd=out, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]

    run = _one_job(_reports(out, 4))
    assert run["job_id"].endswith(".0")  # the rendezvous key: job and step
    stored = read_run(store_dir, run["name"])
    assert stored["status"] == "completed" and stored["id"] == run["id"]
    assert [r["name"] for r in _runs(store_dir)] == [run["name"]]  # one run, not one per task
    processes = stored["metadata"]["simvue"]["processes"]
    assert {label: p["state"] for label, p in processes.items()} == {f"rank{k}": "done" for k in range(4)}
    _check_complete(store_dir, out, _reports(out, 4))


def test_two_job_steps_in_one_sbatch_allocation_make_two_complete_runs(store_dir, out, job_name):
    step = f"srun -n 4 --overcommit {sys.executable} {out / 'job.py'} {out}\n"
    job = _sbatch(out, job_name, step + step, "-n", "4", env=_env())

    reports = _reports(out, 8)
    steps = {r["job_id"] for r in reports}
    assert steps == {f"slurm-{job}.0", f"slurm-{job}.1"}, steps  # two steps of one allocation
    runs = [_one_job([r for r in reports if r["job_id"] == step_id]) for step_id in sorted(steps)]
    assert runs[0]["id"] != runs[1]["id"]  # one run per step, not one for the whole allocation
    stored = _runs(store_dir)
    assert sorted(r["id"] for r in stored) == sorted(r["id"] for r in runs)
    assert {r["status"] for r in stored} == {"completed"}
    _check_complete(store_dir, out, reports)


def _array(out: Path, job_name: str, **env: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """A job array of 3, each element a step of 2 tasks; its reports, by array index."""
    step = f"srun -n 2 --overcommit {sys.executable} {out / 'job.py'} {out}\n"
    _sbatch(out, job_name, step, "--array=0-2", "-n", "2", env=_env(**env))
    reports = _reports(out, 6)
    by_task = {task: [r for r in reports if r["array_task"] == task] for task in ("0", "1", "2")}
    for task_reports in by_task.values():
        _one_job(task_reports, tasks=2)
    return reports, by_task


def test_a_job_array_of_three_named_by_the_user_makes_three_runs_with_that_name(store_dir, out, job_name):
    reports, by_task = _array(out, job_name, JOB_RUN_NAME="sweep")
    runs = {task: task_reports[0] for task, task_reports in by_task.items()}
    assert len({run["id"] for run in runs.values()}) == 3  # one run per array element
    assert {run["name"] for run in runs.values()} == {"sweep"}  # the user's name, unchanged
    stored = _runs(store_dir)
    assert sorted(r["id"] for r in stored) == sorted(run["id"] for run in runs.values())
    assert {(r["name"], r["status"]) for r in stored} == {("sweep", "completed")}
    _check_complete(store_dir, out, reports)


def test_a_job_array_of_three_without_names_makes_three_runs_named_after_their_index(store_dir, out, job_name):
    reports, by_task = _array(out, job_name)
    _check_complete(store_dir, out, reports)
    assert {r["status"] for r in _runs(store_dir)} == {"completed"}
    names = {task: task_reports[0]["name"] for task, task_reports in by_task.items()}
    assert len(set(names.values())) == 3, names
    for task, name in names.items():
        assert re.search(rf"[-_]{task}$", name), f"array task {task}'s run is named {name!r}"


# -- stopped from outside --------------------------------------------------------------------


@pytest.mark.parametrize("stuck_rank", [None, 2], ids=["every-task-stops-on-sigterm", "rank-2-ignores-sigterm"])
def test_scancel_of_the_job_sigterm_then_sigkill_ends_the_run_terminated_with_every_tasks_data(
        store_dir, out, job_name, stuck_rank):
    """``scancel JOB``: SIGTERM to every task, SIGKILL KillWait later.  A task that blocks SIGTERM
    (stuck in C code) is SIGKILLed then; the others end on SIGTERM at once, with status 143."""
    env = _env(JOB_POINTS="0", **({"JOB_STUCK_RANK": str(stuck_rank)} if stuck_rank is not None else {}))
    job, reports = _start(_srun(out, job_name), out, env)
    run = _one_job(reports)
    pids = {r["rank"]: r["pid"] for r in reports}
    signalled_at = time.time()
    subprocess.run(["scancel", _job_number(run)], check=True, timeout=30)
    gone = _gone_after(list(pids.values()), signalled_at)
    _, err = _finish(job)

    assert len(gone) == 4, f"ranks still running 20 s after scancel: {set(pids.values()) - set(gone)}"
    ended = {rank: gone[pid] for rank, pid in pids.items()}
    if stuck_rank is None:  # every rank ends through its own SIGTERM handler, long before KillWait
        assert max(ended.values()) < KILL_WAIT_S - 1, (ended, err[-2000:])
        assert _tasks_exited(err, 143) == {0, 1, 2, 3}, err[-2000:]
    else:  # the stuck rank dies of Slurm's SIGKILL, KillWait after the SIGTERM; ranks 1 and 3 at once
        assert KILL_WAIT_S - 0.5 <= ended[stuck_rank] <= KILL_WAIT_S + 5, ended
        assert ended[1] < KILL_WAIT_S - 1 and ended[3] < KILL_WAIT_S - 1, ended
        assert ended[0] <= KILL_WAIT_S + 5, ended  # rank 0 waits for the stuck rank, at most until the SIGKILL
    assert read_run(store_dir, run["name"])["status"] == "terminated"
    _check_window(store_dir, reports, signalled_at)


def test_a_run_cancelled_while_a_task_ignores_sigterm_still_records_its_end(store_dir, out, job_name):
    job, reports = _start(_srun(out, job_name), out, _env(JOB_POINTS="0", JOB_STUCK_RANK="2"))
    run = _one_job(reports)
    signalled_at = time.time()
    subprocess.run(["scancel", _job_number(run)], check=True, timeout=30)
    gone = _gone_after([r["pid"] for r in reports], signalled_at)
    _finish(job)
    assert len(gone) == 4
    stored = _stored(store_dir, run["id"])
    assert stored["status"] == "terminated"
    assert stored["ended"] is not None and signalled_at <= stored["ended"] <= signalled_at + KILL_WAIT_S + 1, stored
    assert all(p["state"] != "live" for p in stored["metadata"]["simvue"]["processes"].values()), stored["metadata"]


@pytest.mark.timeout(110)
def test_scancel_of_a_step_sigkills_every_task_at_once_and_the_run_reads_lost_with_its_data(
        store_dir, out, job_name, scaled_timeouts):
    """``scancel JOB.STEP`` (Slurm 22.05): SIGKILL to every task of the step, rank 0 and its
    aggregator included, with no SIGTERM first: what was committed survives, and the run reads
    ``lost`` once its heartbeat is older than run_heartbeat_timeout_s (2 s here)."""
    job, reports = _start(_srun(out, job_name), out, _env(JOB_POINTS="0", **scaled_timeouts))
    run = _one_job(reports)
    time.sleep(8)  # longer than every scaled timeout, as a long run would be
    signalled_at = time.time()
    subprocess.run(["scancel", run["job_id"].removeprefix("slurm-")], check=True, timeout=30)
    gone = _gone_after([r["pid"] for r in reports], signalled_at)
    _finish(job)
    assert len(gone) == 4 and max(gone.values()) < 1.5, gone  # at once: no KillWait
    assert wait_for_status(store_dir, run["name"], timeout_s=20)["status"] == "lost"
    _check_window(store_dir, reports, signalled_at)


@pytest.mark.timeout(110)
def test_a_job_past_its_time_limit_ends_terminated_with_every_tasks_data(store_dir, out, job_name):
    """Slurm counts limits in minutes and checks them every 30 s, so ``--time=1`` would end
    the job 60-90 s after it starts.  Once the tasks run, the test lowers the limit to zero as
    an administrator can (``scontrol update TimeLimit=0``); slurmctld's next check (within 30 s)
    times the job out like any other: state TIMEOUT, SIGTERM, SIGKILL KillWait later."""
    job, reports = _start(_srun(out, job_name, "--time=1", timeout=90), out, _env(JOB_POINTS="0", JOB_MAX_S="85"))
    run = _one_job(reports)
    number = _job_number(run)
    subprocess.run(["scontrol", "update", f"JobId={number}", "TimeLimit=0"], check=True, timeout=30)
    gone = _gone_after([r["pid"] for r in reports], time.time(), timeout_s=40)
    _, err = _finish(job)
    assert len(gone) == 4, f"the job was not timed out within 40 s: {err[-2000:]}"

    slurm = _slurm_job(number, timeout_s=10)
    assert slurm["JobState"] == "TIMEOUT", slurm
    assert "DUE TO TIME LIMIT" in err and _tasks_exited(err, 143) == {0, 1, 2, 3}, err[-2000:]
    stored = _stored(store_dir, run["id"])
    assert stored["status"] == "terminated"
    # The run ended when Slurm timed the job out (EndTime has a resolution of a second)...
    timed_out_at = datetime.fromisoformat(slurm["EndTime"]).timestamp()
    assert timed_out_at - 0.5 <= stored["ended"] <= timed_out_at + 2.5, (stored["ended"], timed_out_at)
    # ...and holds every task's points up to then.
    _check_window(store_dir, reports, stored["ended"])


# -- Slurm's warning before the time limit (--signal=USR1@N) ---------------------------------


def _warned_job(out: Path, job_name: str, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """A 4-task step with a 1-minute limit asking for SIGUSR1 60 s before it: slurmctld sends
    it at its first time-limit check, within 30 s of the start."""
    command = _srun(out, job_name, "--time=1", "--signal=USR1@60", timeout=80)
    result = subprocess.run(command, capture_output=True, text=True, env=_env(JOB_POINTS="0", JOB_MAX_S="45", **env),
                            cwd=out, timeout=90)
    return result, _reports(out, 4)


def test_a_users_sigusr1_handler_gets_slurms_warning_and_the_run_completes_with_its_events(
        store_dir, out, job_name):
    """Today's way to act on the warning: the script's own handler (checkpoint, then stop).
    simvue leaves SIGUSR1 to it; the events it logs and every point reach the run."""
    result, reports = _warned_job(out, job_name, JOB_USR1_HANDLER="1")
    assert result.returncode == 0, result.stderr[-3000:]
    run = _one_job(reports)
    stored = read_run(store_dir, run["name"])
    assert stored["status"] == "completed"
    messages = sorted(event["message"].split(": SIGUSR1")[0] for event in stored["events"])
    assert messages == [f"[rank{k}] checkpointing" for k in range(4)], stored["events"]
    _check_complete(store_dir, out, reports)


def test_slurms_warning_signal_is_recorded_as_an_event_and_the_run_goes_on(store_dir, out, job_name):
    result, reports = _warned_job(out, job_name, SIMVUE_RESOURCES_INTERVAL_S="1")
    run = _one_job(reports)
    stored = _stored(store_dir, run["id"])
    assert result.returncode == 0 and stored["status"] == "completed", (result.stderr[-2000:], stored["status"])
    store = Store(store_dir)
    try:
        warnings = [e for e in store.events(run["id"]) if "SIGUSR1" in e["message"]]
        assert warnings, store.events(run["id"])
        samples = store.metric_series(run["id"], f"resources/node/{node_name(socket.gethostname())}/memory.available")
        assert samples["timestamps"] and samples["timestamps"][-1] > warnings[0]["timestamp"] + 1.5  # sampler alive
    finally:
        store.close()
    _check_complete(store_dir, out, reports)
