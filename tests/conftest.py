"""Shared fixtures: an isolated store per test, helpers to read runs back, and the rule for
tests of time: a run longer than every timeout.

Real jobs run for hours, so every timeout and interval gets a test that lasts several
multiples of it.  Such a test takes the ``scaled_timeouts`` fixture: every timeout scaled
down (``SCALED_TIMEOUTS``, as environment variables for the processes it starts), and a
check, when the test ends, that it lasted at least ``OUTLIVES`` times the longest of them.
State logic is tested over simulated hours with an injected clock
(tests/unit/test_aggregator_state.py)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simvue.cli import export_run
from simvue.store import Store

ROOT = Path(__file__).resolve().parent.parent



def _importable(*modules: str) -> bool:
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


# Tests of an optional extra skip cleanly where it is not installed.
needs_server = pytest.mark.skipif(
    not _importable("fastapi", "uvicorn", "jwt"), reason='the server extra is not installed: pip install "simvue[server]"'
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Every test gets its own store and rendezvous directory, and no inherited run."""
    if os.environ.get("SIMVUE_TEST_KEEP_ENV"):
        yield
        return
    base = tmp_path_factory.mktemp("simvue")
    monkeypatch.setenv("SIMVUE_STORE", str(base / "store"))
    monkeypatch.setenv("SIMVUE_RENDEZVOUS_DIR", str(base / "rendezvous"))
    monkeypatch.delenv("SIMVUE_AGGREGATOR", raising=False)
    for name in ("SIMVUE_URL", "SIMVUE_TOKEN", "SIMVUE_MODE", "SIMTRACK_URL", "SIMTRACK_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Resource series only where a test asks for them (run.config(...) or this variable);
    # tests/test_resources.py covers the default.
    monkeypatch.setenv("SIMVUE_RESOURCES_INTERVAL_S", "0")
    yield


# Every timeout and interval of a run, scaled down; the longest is LONGEST_TIMEOUT_S.
SCALED_TIMEOUTS = {
    "SIMVUE_SENDER_TIMEOUT_S": "2",
    "SIMVUE_HEARTBEAT_INTERVAL_S": "0.4",
    "SIMVUE_RUN_HEARTBEAT_TIMEOUT_S": "2",
    "SIMVUE_REDUCE_WAIT_S": "1",
    "SIMVUE_CLOSE_TIMEOUT_S": "2",
    "SIMVUE_RESOURCES_INTERVAL_S": "1",
}
LONGEST_TIMEOUT_S = 2.0
OUTLIVES = 5


@pytest.fixture
def scaled_timeouts():
    """The environment of a run whose every timeout is scaled down; the test must last at
    least ``OUTLIVES`` times the longest one, or it fails at teardown."""
    started = time.monotonic()
    yield dict(SCALED_TIMEOUTS)
    lasted = time.monotonic() - started
    assert lasted >= OUTLIVES * LONGEST_TIMEOUT_S, (
        f"a scaled-timeout test must outlive its timeouts {OUTLIVES}x: it lasted {lasted:.1f} s,"
        f" the longest timeout is {LONGEST_TIMEOUT_S:g} s"
    )


@pytest.fixture
def store_dir() -> Path:
    return Path(os.environ["SIMVUE_STORE"])


def read_run(store_dir: Path, name: str) -> dict:
    """The run as ``simvue export --format json`` prints it."""
    store = Store(store_dir)
    try:
        return export_run(store, name)
    finally:
        store.close()


def wait_for_status(store_dir: Path, name: str, timeout_s: float = 60.0, not_in=("running", "created")) -> dict:
    """Poll the store until the run has ended (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_run(store_dir, name)
        if run["status"] not in not_in or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def run_script(code: str, *args: str, env: dict | None = None, timeout: float = 120, cwd: Path | None = None):
    """Run ``code`` in a fresh Python process; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def mpiexec(n: int, *argv: str, env: dict | None = None, timeout: float = 180, cwd: Path | None = None):
    """``mpiexec -n N argv...`` under an outer timeout; returns the CompletedProcess."""
    mpiexec_bin = Path(sys.executable).parent / "mpiexec"
    command = ["timeout", "-k", "10", str(int(timeout)), str(mpiexec_bin if mpiexec_bin.exists() else "mpiexec"),
               "-n", str(n), *argv]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=timeout + 30)


_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_")


def job_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment for a job the test starts: no launcher variables of an outer MPI job,
    no run to join, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.pop("SIMVUE_AGGREGATOR", None)
    env.update(extra)
    return env


def write_job(tmp_path: Path, code: str, name: str = "job.py") -> Path:
    """``code`` (indented as in the test) as a script file."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
