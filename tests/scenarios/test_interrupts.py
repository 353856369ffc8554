"""Stopping an ``mpiexec -n 4`` job from outside: Ctrl-C (SIGINT to the terminal's whole
process group), SIGTERM to mpiexec, and Slurm-style preemption (SIGTERM to every rank, then
SIGKILL).  Every time, the run ends ``terminated`` and keeps each rank's data up to at most
half a second before the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from simvue.store import Store

from conftest import ROOT, read_run

pytestmark = [pytest.mark.mpi_skip, pytest.mark.timeout(180)]

MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists():
    pytest.skip("no mpiexec in the virtual environment (pip install mpich)", allow_module_level=True)

_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_", "SLURM_")
WINDOW_S = 0.5

JOB = textwrap.dedent(
    """
    import os, sys, time
    from simvue import Run
    from simvue.topology import detect

    rank = detect().rank
    with Run() as run:
        run.init(name=sys.argv[1])
        for step in range(1_000_000):
            run.log_metrics({"x": float(step)}, step=step)
            if step == 50:
                open(os.path.join(sys.argv[2], f"running-{rank}"), "w").close()
            time.sleep(0.01)
    """
)


def launch(tmp_path: Path, name: str) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.pop("SIMVUE_AGGREGATOR", None)
    job = subprocess.Popen([str(MPIEXEC), "-n", "4", sys.executable, str(script), name, str(tmp_path)], env=env,
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"running-{rank}").exists() for rank in range(4)):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1] if job.poll() else "slow"
        time.sleep(0.02)
    time.sleep(0.5)  # a little of a steady state
    return job


def ranks(job: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(job.pid).children(recursive=True) if "job.py" in " ".join(p.cmdline())]


def finish(job: subprocess.Popen, timeout_s: float = 60) -> str:
    try:
        _, err = job.communicate(timeout=timeout_s)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return err


def check(store_dir: Path, name: str, signalled_at: float) -> None:
    run = read_run(store_dir, name)
    assert run["status"] == "terminated", run["events"][-3:]
    store = Store(store_dir)
    try:
        run_id = store.run(name)["id"]
        for rank in range(4):  # every rank's data, up to the window before the signal
            stamps = store.metric_series(run_id, f"rank{rank}/x")["timestamps"]
            assert stamps and stamps[-1] >= signalled_at - WINDOW_S, (rank, signalled_at - stamps[-1])
    finally:
        store.close()


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_ends_the_run_terminated_every_time(store_dir, tmp_path, attempt):
    name = f"ctrl-c-{attempt}"
    job = launch(tmp_path, name)
    signalled_at = time.time()
    os.killpg(job.pid, signal.SIGINT)  # what a terminal sends: mpiexec, its proxy and every rank
    err = finish(job)
    assert job.returncode == 130, err[-2000:]
    check(store_dir, name, signalled_at)


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_to_mpiexec_ends_the_run_terminated_every_time(store_dir, tmp_path, attempt):
    name = f"sigterm-{attempt}"
    job = launch(tmp_path, name)
    signalled_at = time.time()
    job.send_signal(signal.SIGTERM)
    err = finish(job)
    assert job.returncode == 143, err[-2000:]
    check(store_dir, name, signalled_at)


def test_slurm_style_preemption_keeps_everything_up_to_the_signal(store_dir, tmp_path):
    """SIGTERM to every rank at once, SIGKILL to whatever is left 3 s later (Slurm's
    KillWait, shortened)."""
    name = "preempted"
    job = launch(tmp_path, name)
    processes = ranks(job)
    assert len(processes) == 4
    signalled_at = time.time()
    for process in processes:
        process.send_signal(signal.SIGTERM)
    time.sleep(3)
    survivors = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for process in survivors:
        process.kill()
    finish(job)
    assert survivors == [], "a rank was still running 3 s after SIGTERM"
    check(store_dir, name, signalled_at)
