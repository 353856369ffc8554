"""The README's "Send runs to a server" block, pasted as is into a shell in a fresh clone.

The server is started in the background and the job right after it, as a user does: the job
must not race the server (no alarming line, the run arrives), the server must show its URL
and token, and the clone must stay clean (``git status`` shows nothing new).  The only change
to the block is the port, so that the test does not need 8765 to be free: ``simvue server``
gets ``--port`` and the URL names the same port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, needs_server

pytestmark = [needs_server, pytest.mark.timeout(120)]

BLOCK_TIMEOUT_S = 90


def readme_block() -> list[str]:
    """The commands of the README's server block, without the install line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Send runs to a server", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's server section has no bash block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert lines[0].startswith("pip install"), lines
    return lines[1:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git(clone: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=clone, capture_output=True,
        text=True, timeout=60, check=True,
    )
    return done.stdout


@pytest.fixture(scope="module")
def pasted(tmp_path_factory) -> dict:
    """The block run in a fresh clone (README, .gitignore and the example, committed), with a
    home directory of its own; what it printed, and the clone's state afterwards."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    base = tmp_path_factory.mktemp("readme")
    clone, home = base / "clone", base / "home"
    (clone / "examples").mkdir(parents=True)
    home.mkdir()
    for name in ("README.md", ".gitignore", "examples/mpi_sim.py"):
        shutil.copy(ROOT / name, clone / name)
    git(clone, "init", "-q")
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "-m", "clone")

    port = free_port()
    commands = [line.replace(":8765", f":{port}") for line in readme_block()]
    mpiexec = Path(sys.executable).parent / "mpiexec"
    script = "\n".join([
        # The port: `simvue server` (not `simvue server token`) listens where the URL says; exec,
        # so that the background job is the server itself, as it is without this function.
        f'simvue() {{ if [ "$1" = server ] && [ "$2" != token ]; then exec simvue "$@" --port {port};'
        ' else command simvue "$@"; fi; }',
        *([] if mpiexec.exists() or shutil.which("mpiexec") else ["mpiexec() { shift 2; \"$@\"; }"]),
        *commands,
        "kill %1; wait",
    ])
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "MPI_SIM_NAME": "from-the-readme",
        "MPI_SIM_STEPS": "50",
    }  # nothing else: the local store is the default one, ./.simvue in the clone
    process = subprocess.Popen(["bash", "-c", script], cwd=clone, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
    finally:  # the background server too, whatever happened
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    return {
        "returncode": process.returncode, "output": output, "home": home,
        "status": git(clone, "status", "--porcelain", "--untracked-files=all"),
    }


def test_the_readme_server_block_works_as_pasted_without_an_alarming_line(pasted):
    output = pasted["output"]
    assert pasted["returncode"] == 0, output
    # the job did not find the server missing: no line about it at all, cut or whole
    alarming = [line for line in output.splitlines() if line.startswith("simvue:") or "Error" in line
                or "Failed to establish" in line or "kept locally" in line or line.rstrip().endswith("...")]
    assert not alarming, output
    # the run arrived and `simvue runs list` read it back from the server
    listed = [line.split() for line in output.splitlines() if line.startswith("from-the-readme")]
    assert listed and listed[-1][1] == "completed", output


def test_the_readme_server_shows_its_url_and_token_on_first_start(pasted):
    output = pasted["output"]
    assert re.search(r"export SIMVUE_URL=http://127\.0\.0\.1:\d+", output), output
    assert re.search(r"export SIMVUE_TOKEN=\S+\.\S+\.\S+", output), output
    assert "listening on http://127.0.0.1:" in output, output


def test_the_readme_server_block_leaves_the_clone_clean(pasted):
    assert pasted["status"] == "", pasted["status"]
