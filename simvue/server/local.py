"""``simvue server`` as a child process: start, stop and restart it, and read from it.

Used by the test suite and the benchmarks, and handy in a notebook::

    from simvue.server.local import ServerProcess
    server = ServerProcess(Path("server-data"))
    os.environ.update(server.env)      # runs of this process now go to it
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """``python -m simvue.cli server`` on a data directory; restarts keep the same port."""

    def __init__(self, data: Path, *faults: str) -> None:
        self.data = data
        self.faults = list(faults)
        self.url: str | None = None
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.start()
        self.token = subprocess.run(
            [sys.executable, "-m", "simvue.cli", "server", "token", "--data", str(data)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip().splitlines()[-1]

    def start(self, *faults: str) -> None:
        command = [sys.executable, "-m", "simvue.cli", "server", "--port", str(self.port), "--data", str(self.data)]
        for fault in faults or self.faults:
            command += ["--fault", fault]
        env = {key: value for key, value in os.environ.items() if not key.startswith("SIMVUE_SERVER_FAULTS")}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = LISTENING.search(line)
            if match:
                self.url = match.group(1)
                self.port = int(self.url.rsplit(":", 1)[1])
                return
        self.stop()
        raise RuntimeError("simvue server did not start:\n" + "".join(lines))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.process = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to use this server."""
        return {"SIMVUE_URL": self.url, "SIMVUE_TOKEN": self.token}

    def get(self, path: str, **params) -> object:
        response = requests.get(
            f"{self.url}/api{path}", params=params, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )
        response.raise_for_status()
        return response.json()

    def put(self, path: str, body: dict | None = None) -> object:
        response = requests.put(
            f"{self.url}/api{path}", json=body or {}, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )
        response.raise_for_status()
        return response.json()

    def run_named(self, name: str) -> dict:
        runs = self.get("/runs", filters=json.dumps([f"name == {name}"]))["data"]
        assert len(runs) == 1, runs
        return runs[0]

    def metrics(self, run_id: str) -> dict[str, dict[str, list]]:
        return self.get(f"/runs/{run_id}/metrics")["data"]

    def events(self, run_id: str) -> list[dict]:
        return self.get("/events", run=run_id, count=100_000)["data"]

    def stats(self) -> dict:
        return self.get("/server/stats")

    def wait_for_status(self, name: str, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                run = self.run_named(name)
                if run["status"] not in ("running", "created") or time.monotonic() > deadline:
                    return run
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
