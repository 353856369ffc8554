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

# (rank, size, local rank) variables per launcher, most specific first.  Slurm comes last:
# its variables also appear in batch scripts and non-MPI steps.
_LAUNCHERS = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("pmix", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("pals", "PALS_RANKID", "PALS_SIZE", "PALS_LOCAL_RANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)

_imported_mpi_pid: int | None = None


@dataclasses.dataclass(frozen=True)
class Topology:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str | None = None
    job_id: str | None = None
    host: str = dataclasses.field(default_factory=socket.gethostname)

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
        local_size = _first_int(env, _LOCAL_SIZE_VARS, default=size)
        return Topology(
            rank=rank,
            size=size,
            local_rank=local,
            local_size=local_size,
            launcher=launcher,
            job_id=job_id(launcher, env),
        )
    return Topology()


_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


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

    Open MPI/PMIx export a namespace and Slurm a job and step id.  MPICH's Hydra exports
    nothing of the kind, so on one node the ranks' common parent (the Hydra proxy) and its
    start time serve; across nodes without Slurm the user passes mpi4py or an explicit
    aggregator address (see docs/mpi.md).
    """
    if "PMIX_NAMESPACE" in env:
        return f"pmix-{env['PMIX_NAMESPACE']}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    parent = os.getppid()
    return f"{launcher}-{socket.gethostname()}-{parent}-{_start_ticks(parent)}"


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # field 22, starttime, counted after the command name
    except (OSError, IndexError):
        return "0"


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
