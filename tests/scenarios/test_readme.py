"""The README's blocks, pasted as written into a fresh shell, work without an alarming line.

Each fenced block is taken from README.md and run in bash in an empty directory (with the
repository's ``examples/`` beside it), as a new user would paste it.  The two lines that
install the package are the exception: this environment is the installed one, so
``python3 -m venv``/``. .venv/bin/activate`` and ``pip install`` are skipped; and
``bash scripts/test.sh`` (the test suite itself) is not run from inside the test suite.
The server block has its own file, ``test_readme_server.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, read_run

pytestmark = [pytest.mark.mpi_skip, pytest.mark.timeout(300)]

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)
# What a calm run never prints.
ALARMING = re.compile(r"Traceback|Error|error|warning|Warning|failed|cannot|could not|refused")
_SKIPPED = (re.compile(r"^python3 -m venv \.venv$"), re.compile(r"^\. \.venv/bin/activate$"),
            re.compile(r"^pip install "), re.compile(r"^bash scripts/test\.sh$"))


def _installed_free(line: str) -> str:
    """``line`` without the commands that would install the package (joined by ``&&``)."""
    kept = [part.strip() for part in line.split("&&") if not any(p.match(part.strip()) for p in _SKIPPED)]
    return " && ".join(kept)


def _block(kind: str, needle: str) -> str:
    for block_kind, text in BLOCKS:
        if block_kind == kind and needle in text:
            return text
    raise AssertionError(f"no {kind} block with {needle!r} in README.md")


def _run_bash(text: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    lines = [_installed_free(line) for line in text.splitlines() if not line.lstrip().startswith("#")]
    script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(line for line in lines if line)
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture
def fresh(tmp_path, store_dir) -> tuple[Path, dict[str, str]]:
    """An empty directory with the examples beside it, and a shell environment whose PATH
    has this environment's commands (``python``, ``simvue``, ``mpiexec``)."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_", "HYD"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SIMVUE_RESOURCES_INTERVAL_S", None)  # the defaults a user gets
    env.pop("SIMVUE_STORE", None)  # the store in the working directory, as documented
    env["HOME"] = str(tmp_path / "home")  # nothing of a user's own (config, caches) is read or written
    return tmp_path, env


def test_the_first_block_installs_runs_the_example_and_lists_it(fresh):
    cwd, env = fresh
    result = _run_bash(_block("bash", "examples/mpi_sim.py && simvue runs list"), cwd, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not ALARMING.search(result.stderr), result.stderr
    listing = [line.split() for line in result.stdout.splitlines() if "/examples/mpi" in line]
    assert len(listing) == 1 and listing[0][1] == "completed", result.stdout
    run = read_run(cwd / ".simvue", listing[0][0])
    assert {f"rank{k}/loss" for k in range(4)} <= run["metrics"].keys()


def test_the_python_example_and_the_browsing_commands(fresh):
    cwd, env = fresh
    script = cwd / "example.py"
    script.write_text(textwrap.dedent(_block("python", "from simvue import Run")))
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and not ALARMING.search(result.stderr), result.stderr
    browse = _run_bash(_block("bash", "simvue runs show my-run"), cwd, env)
    assert browse.returncode == 0, browse.stderr
    assert not ALARMING.search(browse.stderr), browse.stderr
    assert "my-run" in browse.stdout and "completed" in browse.stdout
    run = read_run(cwd / ".simvue", "my-run")
    assert run["status"] == "completed" and len(run["metrics"]["loss"]) == 100
    assert [e["message"] for e in run["events"]] == ["converged"]


def test_the_browser_block_serves_the_runs_of_the_store(fresh):
    """``simvue ui`` as the README gives it (with a free port, so that 8766 need not be free):
    the URL it prints opens the page and, with its token, the API lists the store's runs."""
    pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')
    import socket

    import requests

    cwd, env = fresh
    script = cwd / "example.py"
    script.write_text(textwrap.dedent(_block("python", "from simvue import Run")))
    assert subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, timeout=120).returncode == 0
    commands = [line.split("#")[0].strip() for line in _block("bash", "simvue ui").splitlines()]
    commands = [c for c in commands if c and not any(p.match(c) for p in _SKIPPED)]
    assert commands == ["simvue ui"], commands
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen(["simvue", "ui", "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        printed = [ui.stdout.readline() for _ in range(3)]
        url = printed[1].strip()
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/dashboard/runs\?token=\S+", url), printed
        assert "<title>simvue</title>" in requests.get(url, timeout=10).text
        token = url.split("token=")[1]
        runs = requests.get(f"http://127.0.0.1:{port}/api/runs", headers={"Authorization": f"Bearer {token}"},
                            timeout=10).json()["data"]
        assert [run["name"] for run in runs] == ["my-run"]
    finally:
        ui.terminate()
        _, err = ui.communicate(timeout=30)
    assert ui.returncode == 0 and not ALARMING.search(err), err
