"""Launchers and executors other than a plain ``mpiexec -n N python``: wrappers between the
launcher and Python, torchrun-style jobs (with ``launchers/torchrun_like.py``, which gives
its workers exactly torchrun's environment), ``concurrent.futures`` and ``mpi4py.futures``.
Every rank's or task's every point is checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, mpiexec, read_run

pytestmark = [pytest.mark.mpi_skip, pytest.mark.timeout(180)]

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec in the virtual environment")
_LAUNCHER_VARS = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_", "SLURM_", "TORCHELASTIC_")

RANKS = textwrap.dedent(
    """
    import os, sys, time
    from simvue import Run
    with Run() as run:
        run.init(name=sys.argv[1])
        fail_at = int(os.environ.get("FAIL_RANK_AT", "-1"))
        for step in range(100):
            run.log_metrics({"x": float(run.rank * 1000 + step)}, step=step)
            if run.rank == 2 and step == fail_at and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                run.flush(10)
                os._exit(1)
            time.sleep(0.002)
        run.log_event(f"rank {run.rank} of {run.size} done")
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.pop("SIMVUE_AGGREGATOR", None)
    env.update(extra)
    return env


def _script(tmp_path: Path, code: str = RANKS) -> Path:
    path = tmp_path / "ranks.py"
    path.write_text(code)
    return path


def _assert_every_rank(store_dir: Path, name: str, size: int, status: str = "completed", *, once: bool = True) -> dict:
    run = read_run(store_dir, name)
    assert run["status"] == status, run["events"][-3:]
    for rank in range(size):
        points = run["metrics"][f"rank{rank}/x"]
        assert [(p[0], p[2]) for p in points][-100:] == [(s, rank * 1000 + s) for s in range(100)], f"rank{rank}"
    messages = [e["message"] for e in run["events"] if " done" in e["message"]]
    expected = [f"[rank{k}] rank {k} of {size} done" for k in range(size)]
    assert (sorted(messages) if once else sorted(set(messages))) == expected
    return run


WRAPPERS = {
    "bash -c without exec": lambda py, script, name: ["bash", "-c", f"{py} {script} {name}; true"],
    "env": lambda py, script, name: ["env", "OMP_NUM_THREADS=1", py, str(script), name],
    "a job script": None,  # written below
    "/usr/bin/time": lambda py, script, name: ["/usr/bin/time", "-f", "%e s", py, str(script), name],
}


@needs_mpiexec
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_wrapper_between_the_launcher_and_python_changes_nothing(store_dir, tmp_path, wrapper):
    """The ranks find rank 0 through the Hydra proxy they share, whatever sits in between:
    the run completes at once, not after the rendezvous and sender timeouts."""
    if wrapper == "/usr/bin/time" and not Path("/usr/bin/time").exists():
        pytest.skip("/usr/bin/time is not installed here")
    script = _script(tmp_path)
    name = "wrapped-" + wrapper.split()[0].strip("/").replace("/", "-")
    if wrapper == "a job script":
        job = tmp_path / "job.sh"
        job.write_text(f"#!/bin/sh\necho starting >&2\n{sys.executable} {script} \"$@\"\necho done >&2\n")
        job.chmod(0o755)
        command = [str(job), name]
    else:
        command = WRAPPERS[wrapper](sys.executable, script, name)
    started = time.monotonic()
    result = mpiexec(4, *command, env=_env(), cwd=ROOT, timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < 30, f"{took:.0f} s: the ranks did not find rank 0 at once"
    assert "spill" not in result.stderr and "have not joined" not in result.stderr, result.stderr
    _assert_every_rank(store_dir, name, 4)


def test_a_torchrun_job_is_one_run_with_every_rank(store_dir, tmp_path):
    script = _script(tmp_path)
    launcher = HERE / "launchers" / "torchrun_like.py"
    result = subprocess.run([sys.executable, str(launcher), "--nproc-per-node", "4", str(script), "torch-job"],
                            env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run = _assert_every_rank(store_dir, "torch-job", 4)
    assert run["metadata"]["simvue"]["elastic"]["attempts"] == 1


def test_a_torchrun_job_over_two_nodes_joins_over_the_network_through_the_shared_rendezvous(store_dir, tmp_path):
    """Two "nodes" of 2 workers (GROUP_RANK 0 and 1, LOCAL_WORLD_SIZE 2, MASTER_ADDR this
    host's name): the job spans nodes, so rank 0 listens on the network interface (with
    CURVE), not loopback, and the other node's ranks find it through the rendezvous
    directory, shared as a home directory is on a cluster."""
    script = _script(tmp_path, RANKS.replace(
        "run.init(name=sys.argv[1])",
        "run.init(name=sys.argv[1])\n"
        "    address = run._membership.address.address if run._membership.address else None\n"
        "    os.write(1, f'ADDRESS {run.rank} {address}\\n'.encode())  # one write: lines of the ranks do not mix",
    ))
    launcher = HERE / "launchers" / "torchrun_like.py"
    result = subprocess.run(
        [sys.executable, str(launcher), "--nnodes", "2", "--nproc-per-node", "2", str(script), "two-nodes"],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    addresses = dict(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("ADDRESS"))
    assert sorted(addresses) == ["0", "1", "2", "3"], result.stdout
    assert len(set(addresses.values())) == 1, addresses  # every rank talks to one aggregator
    assert addresses["0"].startswith("tcp://") and "127.0.0.1" not in addresses["0"], addresses
    _assert_every_rank(store_dir, "two-nodes", 4)


def test_an_elastic_restart_goes_on_in_the_same_run_with_the_attempt_recorded(store_dir, tmp_path):
    """Attempt 0: rank 2 fails at step 40, the agent stops the others; attempt 1 (same run id)
    goes on in the same run, which ends completed with every rank's points of attempt 1."""
    script = _script(tmp_path)
    launcher = HERE / "launchers" / "torchrun_like.py"
    result = subprocess.run(
        [sys.executable, str(launcher), "--nproc-per-node", "4", "--max-restarts", "2", "--rdzv-id", "job-7",
         str(script), "elastic"],
        env=_env(FAIL_RANK_AT="40"), cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stderr
    run = _assert_every_rank(store_dir, "elastic", 4, once=False)  # some ranks may have ended attempt 0
    assert run["metadata"]["simvue"]["elastic"] == {"run_id": "job-7", "attempts": 2}
    assert any("elastic restart: attempt 1 of job job-7" in e["message"] for e in run["events"])
    assert [p[0] for p in run["metrics"]["rank2/x"]][:41] == list(range(41))  # attempt 0's points stay
    from simvue.store import Store

    store = Store(store_dir)
    try:
        assert [r["name"] for r in store.runs()] == ["elastic"]  # one run for the whole job
    finally:
        store.close()


POOL = textwrap.dedent(
    """
    import concurrent.futures, multiprocessing, sys
    from simvue import Run

    def task(args):
        run, number = args
        for i in range(100):
            run.log_metrics({"x": float(number * 100 + i)}, step=number * 100 + i)
        return number

    if __name__ == "__main__":
        method, name = sys.argv[1], sys.argv[2]
        with Run() as run:
            run.init(name=name)
            context = multiprocessing.get_context(method)
            with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
                done = list(pool.map(task, [(run, n) for n in range(8)]))
        print(done)
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_process_pool_executor_keeps_every_point(store_dir, tmp_path, method):
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    name = f"executor-{method}"
    result = subprocess.run([sys.executable, str(script), method, name], env=_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, name)
    assert run["status"] == "completed"
    steps = sorted(p[0] for metric, points in run["metrics"].items() if metric.endswith("/x") for p in points)
    assert steps == list(range(800))
    values = sorted(p[2] for metric, points in run["metrics"].items() if metric.endswith("/x") for p in points)
    assert values == [float(s) for s in range(800)]


MPI_EXECUTOR = textwrap.dedent(
    """
    import sys
    from mpi4py import MPI
    from mpi4py.futures import MPICommExecutor
    from simvue import Run

    def task(args):
        run, number = args
        for i in range(100):
            run.log_metrics({"x": float(number * 100 + i)}, step=number * 100 + i)
        return MPI.COMM_WORLD.Get_rank()

    if __name__ == "__main__":
        with Run() as run:
            run.init(name=sys.argv[1])  # every rank: rank 0 makes the run, the others join it
            with MPICommExecutor(MPI.COMM_WORLD, root=0) as executor:
                if executor is not None:
                    ranks = list(executor.map(task, [(run, n) for n in range(8)]))
                    print(sorted(set(ranks)))
    """
)


@needs_mpiexec
def test_mpi4py_comm_executor_keeps_every_point(store_dir, tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    script = tmp_path / "mpi_executor.py"
    script.write_text(MPI_EXECUTOR)
    result = mpiexec(3, sys.executable, str(script), "mpi-executor", env=_env(), cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "mpi-executor")
    assert run["status"] == "completed"
    series = {metric: points for metric, points in run["metrics"].items() if metric.endswith("/x")}
    assert set(series) <= {"rank1/x", "rank2/x"} and series  # the tasks ran on the worker ranks
    assert sorted(p[0] for points in series.values() for p in points) == list(range(800))


MPI_POOL = textwrap.dedent(
    """
    import sys
    from mpi4py import MPI
    from mpi4py.futures import MPIPoolExecutor
    from simvue import Run

    def task(args):
        run, number = args
        for i in range(100):
            run.log_metrics({"x": float(number * 100 + i)}, step=number * 100 + i)
        return MPI.COMM_WORLD.Get_rank()

    if __name__ == "__main__":
        with Run() as run:
            run.init(name=sys.argv[1])  # rank 0 only: the other ranks are the pool's workers
            with MPIPoolExecutor() as executor:
                print(sorted(set(executor.map(task, [(run, n) for n in range(8)]))))
    """
)


@needs_mpiexec
@pytest.mark.parametrize("how", [
    "python -m mpi4py.futures",
    pytest.param("spawned workers", marks=pytest.mark.skipif(
        os.environ.get("SIMVUE_TEST_MPI") == "impi",
        reason="Intel MPI 2021.18's MPI_Comm_spawn dies of SIGSEGV here, without simvue too (docs/openmpi.md)")),
])
def test_mpi4py_pool_executor_keeps_every_point(store_dir, tmp_path, how):
    """``mpiexec -n 3 python -m mpi4py.futures``: ranks 1 and 2 serve the pool and never call
    init, yet the run waits for neither the join warning nor the close timeout.  ``mpiexec -n 1``:
    the pool spawns its workers (MPI_Comm_spawn)."""
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    script = tmp_path / "mpi_pool.py"
    script.write_text(MPI_POOL)
    name = how.split()[0]
    args = (3, sys.executable, "-m", "mpi4py.futures") if how.startswith("python") else (1, sys.executable)
    started = time.monotonic()
    result = mpiexec(*args, str(script), name, env=_env(MPI4PY_FUTURES_MAX_WORKERS="2"), cwd=ROOT, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "have not joined" not in result.stderr, result.stderr
    run = read_run(store_dir, name)
    assert run["status"] == "completed", run["events"][-3:]
    assert not run["metadata"]["simvue"].get("lost"), run["metadata"]["simvue"].get("lost")
    steps = sorted(p[0] for metric, points in run["metrics"].items() if metric.endswith("/x") for p in points)
    assert steps == list(range(800))
    assert elapsed < 30, f"{elapsed:.0f} s: the run waited for its workers"  # the close timeout is 30 s


WARNED = textwrap.dedent(
    """
    import os, signal, sys, time
    from simvue import Run
    with Run() as run:
        run.init(name=sys.argv[1])
        run.log_metrics({"x": 0.0})
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.5)
        run.log_metrics({"x": 1.0})
    print("went on")
    """
)


@pytest.mark.parametrize("in_slurm_step", [True, False], ids=["slurm-step", "elsewhere"])
def test_slurms_warning_signal_is_an_event_in_a_slurm_step_and_left_alone_elsewhere(store_dir, tmp_path, in_slurm_step):
    """``--signal=USR1@60``: in a Slurm step simvue records SIGUSR1 as a warning event and the
    job goes on; elsewhere SIGUSR1 keeps its default action (it ends the process).  The real
    Slurm cluster's version of this is in test_slurm.py."""
    script = _script(tmp_path, WARNED)
    slurm = dict(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")
    result = subprocess.run([sys.executable, str(script), "warned"], env=_env(**(slurm if in_slurm_step else {})),
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    if not in_slurm_step:
        assert result.returncode == -signal.SIGUSR1 and "went on" not in result.stdout  # SIGUSR1's default: the process ends
        return
    assert result.returncode == 0 and "went on" in result.stdout, result.stderr
    run = read_run(store_dir, "warned")
    assert run["status"] == "completed" and [p[2] for p in run["metrics"]["x"]] == [0.0, 1.0]
    [event] = [e for e in run["events"] if "SIGUSR1" in e["message"]]
    assert event["level"] == "warning" and "the job goes on" in event["message"]
