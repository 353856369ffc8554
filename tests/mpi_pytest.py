"""Run pytest under mpiexec with one readable report: rank 0 writes to the console, every
other rank to ``.mpi-pytest-logs/rank<N>.log`` (printed by scripts/test.sh on failure).

    mpiexec -n 4 python tests/mpi_pytest.py --only-mpi tests/mpi
"""

import os
import sys
import tempfile

rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") if v in os.environ), "0")
# Each rank gets its own pytest temp root: ranks sharing one race to clean up each other's
# numbered directories (PytestWarning "(rm_rf) error removing ...").  pytest-mpi's
# mpi_tmp_path still hands every rank rank 0's directory.
if "PYTEST_DEBUG_TEMPROOT" not in os.environ:
    temproot = os.path.join(tempfile.gettempdir(), f"pytest-mpi-rank{rank}")
    os.makedirs(temproot, exist_ok=True)
    os.environ["PYTEST_DEBUG_TEMPROOT"] = temproot
if rank != "0":
    os.makedirs(".mpi-pytest-logs", exist_ok=True)
    log = os.open(f".mpi-pytest-logs/rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)

import pytest  # noqa: E402 - after the redirection, so that pytest writes to the log

sys.exit(pytest.main(sys.argv[1:]))
