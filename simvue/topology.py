"""Where this process stands in its job, read from the launcher's environment.

Importing ``mpi4py.MPI`` initialises MPI (60-1200 ms) and, in a child process of a rank, can
steal the rank's identity or abort the job, so this module never imports it.  It only looks
at an ``mpi4py.MPI`` module the user has already imported in this very process.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Mapping

from . import lifecycle

# (rank, size, local rank) variables per launcher, most specific first.  torchrun (and
# accelerate, DeepSpeed, which follow its conventions) comes first: under srun its workers
# also carry the Slurm task's variables.  Slurm comes last: its variables also appear in batch
# scripts and non-MPI steps.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("pmix", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("pals", "PALS_RANKID", "PALS_SIZE", "PALS_LOCAL_RANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)

_imported_mpi_pid: int | None = None
# This node's name for simvue, instead of the host name: for testing (several simulated
# nodes on one machine) and for nodes whose host names are not unique.
HOST_ENV = "SIMVUE_HOST"


def this_host() -> str:
    """This node's name: ``$SIMVUE_HOST`` if set, else the host name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


@dataclasses.dataclass(frozen=True)
class Topology:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str | None = None
    job_id: str | None = None
    host: str = dataclasses.field(default_factory=this_host)  # SIMVUE_HOST overrides it

    @property
    def is_mpi(self) -> bool:
        return self.launcher is not None and self.size > 1

    @property
    def single_node(self) -> bool:
        """True when every rank of the job runs on this host (as far as the launcher says)."""
        return self.local_size >= self.size


def detect(environ: Mapping[str, str] | None = None) -> Topology:
    """The topology described by ``environ`` (default ``os.environ``); a single process if none."""
    env = os.environ if environ is None else environ
    for launcher, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var not in env:
            continue
        try:
            rank = int(env[rank_var])
            size = int(env.get(size_var, "0")) or _size_fallback(env)
            local = int(env.get(local_var, rank if size else 0))
        except ValueError:
            continue
        if size < 1 or not 0 <= rank < size:
            continue
        if launcher == "slurm" and "SLURM_STEP_ID" not in env:
            continue  # inside an sbatch script but not an srun step
        if launcher == "torchrun" and "TORCHELASTIC_RUN_ID" not in env and "MASTER_ADDR" not in env:
            continue  # RANK and WORLD_SIZE alone are too common to mean torchrun
        local_size = (_slurm_tasks_on_this_node(env) if launcher == "slurm" else None) or _first_int(
            env, _LOCAL_SIZE_VARS.get(launcher, ()) + _LOCAL_SIZE_VARS[None], default=size
        )
        return Topology(
            rank=rank,
            size=size,
            local_rank=local,
            local_size=local_size,
            launcher=launcher,
            job_id=job_id(launcher, env),
        )
    return Topology()


_LOCAL_SIZE_VARS: dict[str | None, tuple[str, ...]] = {
    "torchrun": ("LOCAL_WORLD_SIZE",),
    None: ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"),
}


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """The number of the step's tasks on this node, from ``SLURM_STEP_TASKS_PER_NODE``
    (``"2(x3),1"``: 2 on each of three nodes, then 1) and ``SLURM_NODEID``; srun sets
    ``SLURM_NTASKS_PER_NODE`` only when asked for it, so ``srun -N 2 -n 4`` has only these."""
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        number, _, repeat = part.partition("(x")
        try:
            counts += [int(number)] * (int(repeat.rstrip(")")) if repeat else 1)
        except ValueError:
            return None
    try:
        node = int(env.get("SLURM_NODEID", "0"))
    except ValueError:
        node = 0
    if not counts:
        return None
    return counts[node] if 0 <= node < len(counts) else max(counts)


def _first_int(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        try:
            return int(env[name])
        except (KeyError, ValueError):
            continue
    return default


def _size_fallback(env: Mapping[str, str]) -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "MV2_COMM_WORLD_SIZE"):
        if var in env:
            return int(env[var])
    return 0


def job_id(launcher: str, env: Mapping[str, str]) -> str:
    """A string the ranks of one job share and no other job has.

    torchrun exports its run id (``TORCHELASTIC_RUN_ID``, or the master's address) and the
    attempt; Open MPI/PMIx export a namespace and Slurm a job and step id.  MPICH's Hydra
    exports nothing of the kind, so on one node the Hydra proxy that started the ranks, and
    its start time, serve: the nearest ``hydra_pmi_proxy`` among the process's ancestors, so
    that a wrapper between it and Python (``bash -c``, ``time``, ``numactl``, a job script)
    changes nothing.  Across nodes without Slurm the user passes mpi4py or an explicit
    aggregator address (see docs/launchers.md).
    """
    if launcher == "torchrun":
        run = env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
        return f"torchrun-{run}.{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if "PMIX_NAMESPACE" in env:
        return f"pmix-{env['PMIX_NAMESPACE']}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    parent = _launcher_process(os.getppid(), "hydra_pmi_proxy" if launcher == "mpich" else None)
    return f"{launcher}-{socket.gethostname()}-{parent}-{_stat(parent)[2]}"


def _launcher_process(parent: int, name: str | None, max_depth: int = 32) -> int:
    """The nearest ancestor called ``name``, starting at ``parent``; ``parent`` itself if
    there is none (or no ``/proc`` to tell)."""
    if name is None:
        return parent
    pid = parent
    for _ in range(max_depth):
        command, ppid, _ = _stat(pid)
        if command == name:
            return pid
        if ppid <= 1:
            break
        pid = ppid
    return parent


def _stat(pid: int) -> tuple[str, int, str]:
    """``(command name, parent pid, start time in clock ticks)`` of ``pid`` from
    ``/proc/<pid>/stat``; ``("", 0, "0")`` where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            head, _, tail = stat.read().rpartition(b")")
        fields = tail.split()
        command = head.partition(b"(")[2].decode(errors="replace")
        return command, int(fields[1]), fields[19].decode()  # ppid (field 4), starttime (22)
    except (OSError, IndexError, ValueError):
        return "", 0, "0"


def elastic_attempt(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """``(run id, attempt)`` of a torchrun elastic job (``TORCHELASTIC_RUN_ID``,
    ``TORCHELASTIC_RESTART_COUNT``): a restarted attempt resumes the same run."""
    env = os.environ if environ is None else environ
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    try:
        return run_id, int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return run_id, 0


def initialised_mpi():
    """``mpi4py.MPI`` if the user imported and initialised it in this process, else None."""
    global _imported_mpi_pid
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return None
    if _imported_mpi_pid is None:
        _imported_mpi_pid = os.getpid()
    if _imported_mpi_pid != os.getpid():
        return None  # a forked child holds a copy of MPI state it must not touch
    try:
        if mpi.Is_initialized() and not mpi.Is_finalized():
            return mpi
    except Exception:  # noqa: BLE001 - a broken MPI must not break tracking
        return None
    return None


def _forget_mpi_in_child() -> None:
    global _imported_mpi_pid
    if "mpi4py.MPI" in sys.modules:
        _imported_mpi_pid = -1


lifecycle.on_fork_in_child(_forget_mpi_in_child)
