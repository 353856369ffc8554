"""Shared fixtures: an isolated store per test, and helpers to read runs back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simvue.cli import export_run
from simvue.store import Store

ROOT = Path(__file__).resolve().parent.parent


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


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
