"""A server that accepts connections and never answers must not hold up the job.

``SilentServer`` is a real TCP listener that accepts every connection and never reads or
writes: what a hung server (or a proxy in front of a dead one) looks like to a client.
``Run.init`` gives the server ``INIT_TIMEOUT_S`` for its first answers, then starts the run
locally; the uploader keeps trying in the background and sends the whole run once a server
answers at that address.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import read_run

from simvue.server.local import ServerProcess
from simvue.upload import INIT_TIMEOUT_S, STARTING_SERVER_WAIT_S

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')

pytestmark = pytest.mark.timeout(90)

# What init may take on top of INIT_TIMEOUT_S: starting the aggregator, on a loaded machine.
INIT_SLACK_S = 3.0
FAST = {"SIMVUE_UPLOAD_INTERVAL_S": "0.2", "SIMVUE_RETRY_MAX_INTERVAL_S": "1", "SIMVUE_ABORT_POLL_INTERVAL_S": "0.3"}

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from simvue import Run
    name, steps = sys.argv[1], int(sys.argv[2])
    with Run() as run:
        started = time.monotonic()
        run.init(name=name, folder="/hangs")
        print("INIT", time.monotonic() - started, flush=True)
        for step in range(steps):
            run.log_metrics({"loss": 1.0 / (step + 1), "x": float(step)})
            if step % 100 == 0:
                run.log_event(f"step {step}")
        print("LOGGED", flush=True)
        closing = time.monotonic()
    print("CLOSED", time.monotonic() - closing, flush=True)
    """
)


class SilentServer:
    """Listens on 127.0.0.1:``port``, accepts every connection and never reads or writes."""

    def __init__(self, port: int = 0) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)

    def close(self) -> None:
        """Stop listening and drop every connection: the clients waiting on them get a reset."""
        if self._listener.fileno() == -1:
            return
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self._thread.join(5)
        for connection in self.accepted:
            connection.close()


class Lines:
    """The lines a child process prints, read on a thread so that waiting for one can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert process.stdout is not None
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line)

    def expect(self, word: str, timeout_s: float) -> str:
        """The rest of the next line starting with ``word``; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {word!r} line within {timeout_s:g} s; saw {self.seen}") from None
            self.seen.append(line)
            if line.startswith(word):
                return line[len(word):].strip()


def start_script(env: dict[str, str], name: str, steps: int) -> tuple[subprocess.Popen[str], Lines]:
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, name, str(steps)], env={**os.environ, **FAST, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return process, Lines(process)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(0.05)


def test_init_does_not_wait_for_a_silent_server_and_the_run_arrives_when_one_answers(tmp_path):
    server = ServerProcess(tmp_path / "server")  # for its port, and to serve that port later
    server.stop()
    silent = SilentServer(server.port)
    process, lines = start_script({**server.env, "SIMVUE_CLOSE_TIMEOUT_S": "45"}, "hang-then-answer", 600)
    try:
        init_s = float(lines.expect("INIT", INIT_TIMEOUT_S + INIT_SLACK_S + 5))
        assert init_s <= INIT_TIMEOUT_S + INIT_SLACK_S, init_s
        lines.expect("LOGGED", 30)
        # init's own request and, after it, the uploader's: it keeps trying in the background
        wait_for(lambda: len(silent.accepted) >= 2, 10, "a retry by the uploader")
        silent.close()
        server.start()  # a real server at the same address
        lines.expect("CLOSED", 60)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        told = [line for line in err.splitlines() if "hang-then-answer" in line]
        assert len(told) == 1 and "sent when the server answers" in told[0], err
        run = server.wait_for_status("hang-then-answer")
        assert run["status"] == "completed"
        metrics = server.metrics(run["id"])
        assert metrics["x"]["values"] == [float(step) for step in range(600)]
        assert [e["message"] for e in server.events(run["id"])] == [f"step {s}" for s in range(0, 600, 100)]
        assert len(server.get("/runs", filters='["name == hang-then-answer"]')["data"]) == 1  # created once
    finally:
        process.kill()
        silent.close()
        server.stop()


def test_a_run_against_a_server_that_never_answers_completes_locally(tmp_path):
    silent = SilentServer()
    env = {"SIMVUE_URL": f"http://127.0.0.1:{silent.port}", "SIMVUE_TOKEN": "not.checked.here",
           "SIMVUE_CLOSE_TIMEOUT_S": "2"}
    started = time.monotonic()
    process, lines = start_script(env, "hang-forever", 300)
    try:
        init_s = float(lines.expect("INIT", INIT_TIMEOUT_S + INIT_SLACK_S + 5))
        lines.expect("CLOSED", 30)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
        silent.close()
    elapsed = time.monotonic() - started
    assert process.returncode == 0, err
    assert init_s <= INIT_TIMEOUT_S + INIT_SLACK_S, init_s
    # init, then close_timeout_s for the uploader; never a full request timeout (30 s)
    assert elapsed < INIT_TIMEOUT_S + 2 + 15, elapsed
    assert len(silent.accepted) >= 2, "the uploader never tried again after init"
    kept = [line for line in err.splitlines() if "sent when the server answers" in line or "retrying" in line]
    assert len(kept) == 1, err
    assert "Send it with: simvue push" in err
    local = read_run(Path(os.environ["SIMVUE_STORE"]), "hang-forever")
    assert local["status"] == "completed" and len(local["metrics"]["x"]) == 300


WAITING_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from simvue import Run
    with Run() as run:
        print("READY", flush=True)
        started = time.monotonic()
        run.init(name=sys.argv[1], folder="/hangs")
        print("INIT", time.monotonic() - started, flush=True)
        for step in range(50):
            run.log_metrics({"x": float(step)})
    print("CLOSED", flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_token(data: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "simvue.cli", "server", "token", "--data", str(data)],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_a_job_started_just_before_its_local_server_waits_for_it(tmp_path):
    """``simvue server &`` then the job at once, as the README does: the job's ``init`` finds
    nothing listening yet, waits for the server (on this machine) a moment, and says nothing."""
    data, port = tmp_path / "server", free_port()
    env = {"SIMVUE_URL": f"http://127.0.0.1:{port}", "SIMVUE_TOKEN": server_token(data)}
    process = subprocess.Popen([sys.executable, "-c", WAITING_SCRIPT, "before-its-server"],
                               env={**os.environ, **FAST, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines, server = Lines(process), None
    try:
        lines.expect("READY", 60)
        time.sleep(0.5)  # init is knocking at a closed port by now
        server = ServerProcess(data, options=["--port", str(port)])
        init_s = float(lines.expect("INIT", 30))
        lines.expect("CLOSED", 60)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0 and err == "", err
        assert 0.4 <= init_s <= STARTING_SERVER_WAIT_S + INIT_SLACK_S, init_s  # it waited, briefly
        run = server.wait_for_status("before-its-server")
        assert run["status"] == "completed" and server.metrics(run["id"])["x"]["steps"] == list(range(50))
    finally:
        process.kill()
        if server is not None:
            server.stop()


def test_a_local_server_that_never_starts_costs_seconds_and_one_whole_calm_line(tmp_path):
    port = free_port()  # nothing will listen there
    env = {"SIMVUE_URL": f"http://127.0.0.1:{port}", "SIMVUE_TOKEN": "not.checked.here", "SIMVUE_CLOSE_TIMEOUT_S": "2"}
    process, lines = start_script(env, "never-served", 100)
    try:
        init_s = float(lines.expect("INIT", STARTING_SERVER_WAIT_S + INIT_SLACK_S + 5))
        lines.expect("CLOSED", 30)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert STARTING_SERVER_WAIT_S - 0.5 <= init_s <= STARTING_SERVER_WAIT_S + INIT_SLACK_S, init_s
    told = err.splitlines()
    assert len(told) == 2, err  # at init, and at close how to send the run later
    assert told[0] == (f"simvue: the server at http://127.0.0.1:{port} is not listening (connection refused); run"
                       " 'never-served' is recorded locally and will be sent when the server answers")
    assert told[1].startswith("simvue: run 'never-served' was not fully sent (") and "simvue push" in told[1]
    for line in told:  # whole words, no library internals
        assert "..." not in line and "HTTPConnectionPool" not in line and " 0x" not in line, line
