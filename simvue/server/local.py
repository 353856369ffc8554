"""``simvue server`` as a child process: start, stop and restart it, and read from it.

Used by the test suite and the benchmarks, and handy in a notebook::

    from simvue.server.local import ServerProcess
    server = ServerProcess(Path("server-data"))
    os.environ.update(server.env)      # runs of this process now go to it

or, stopped for certain at the end of a block::

    with ServerProcess(tmp / "server", options=["--max-body-mb", "1"]) as server:
        server.api.get(f"{server.url}/api/runs")        # an authorised requests.Session
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import quote

import requests

LISTENING = re.compile(r"listening on (http://\S+)")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class ServerProcess:
    """``python -m simvue.cli server`` on a data directory; restarts keep the same port.

    ``faults`` are ``--fault`` rules; ``options`` other command-line options; ``env`` extra
    environment for the server (``SIMVUE_SERVER_FAULTS`` is not inherited from this process).
    Everything the server prints is kept in ``output``.
    """

    def __init__(
        self, data: Path, *faults: str, options: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> None:
        self.data = data
        self.faults = list(faults)
        self.options = list(options)
        self.extra_env = dict(env or {})
        self.url: str | None = None
        self.port = 0
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.start()
        try:
            self.token = subprocess.run(
                [sys.executable, "-m", "simvue.cli", "server", "token", "--data", str(data)],
                capture_output=True, text=True, check=True, timeout=60,
            ).stdout.strip().splitlines()[-1]
        except BaseException:
            self.stop()
            raise
        self.api = requests.Session()
        self.api.headers["Authorization"] = f"Bearer {self.token}"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, *faults: str) -> None:
        command = [sys.executable, "-m", "simvue.cli", "server", "--port", str(self.port), "--data", str(self.data)]
        for fault in faults or self.faults:
            command += ["--fault", fault]
        command += self.options
        env = {key: value for key, value in os.environ.items() if not key.startswith("SIMVUE_SERVER_FAULTS")}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env | self.extra_env
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        first_line = len(self.output)
        stdout = cast(IO[str], self.process.stdout)  # stdout=PIPE
        while time.monotonic() < deadline:
            line = stdout.readline()
            if not line:
                break
            self.output.append(line)
            match = LISTENING.search(line)
            if match:
                self.url = match.group(1)
                self.port = int(self.url.rsplit(":", 1)[1])
                # keep reading, or a server that logs a lot would block on a full pipe
                threading.Thread(target=self._keep_output, args=(self.process,), daemon=True).start()
                return
        self.stop()
        raise RuntimeError("simvue server did not start:\n" + "".join(self.output[first_line:]))

    def _keep_output(self, process: subprocess.Popen[str]) -> None:
        for line in cast(IO[str], process.stdout):  # started with stdout=PIPE
            self.output.append(line)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the server with ``sig`` (killing it if it does not stop); its exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        return process.returncode

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to use this server."""
        # start() set the URL, or __init__ raised
        return {"SIMVUE_URL": cast(str, self.url), "SIMVUE_TOKEN": self.token}

    def get(self, path: str, **params: Any) -> Any:
        response = requests.get(
            f"{self.url}/api{path}", params=params, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )
        response.raise_for_status()
        return response.json()

    def put(self, path: str, body: dict | None = None) -> Any:
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

    def unreadable(self, *run_ids: str) -> dict[str, str]:
        """Every read the API offers, over everything the server holds; the ones that failed.

        Reads each list (runs, folders, alerts, artifacts, tags), each object it lists, and for
        each run (those listed and ``run_ids``, which are read even if the run list fails) its
        metrics in every form, events, artifacts, abort flag, alert statuses and tensor metrics
        (their grids, last values and spans); an uploaded artifact's content too.  Returns ``{request: "status body..."}`` for each read that did
        not answer 200, so an empty dict means that everything stored can be read.
        """
        failed: dict[str, str] = {}

        def read(path: str, **params: Any) -> Any:
            label = path + (f" {params}" if params else "")
            try:
                response = self.api.get(f"{self.url}/api{path}", params=params, timeout=30)
            except requests.RequestException as exc:
                failed[label] = f"no answer: {exc}"
                return None
            if response.status_code != 200:
                failed[label] = f"{response.status_code} {response.text[:300]}"
                return None
            try:
                return response.json()
            except ValueError:
                return response.content

        read("/version")
        read("/server/stats")
        listed: dict[str, list[dict]] = {}
        for collection in ("runs", "folders", "alerts", "artifacts", "tags"):
            answer = read(f"/{collection}")
            listed[collection] = answer["data"] if isinstance(answer, dict) else []
        for collection in ("folders", "alerts", "artifacts", "tags"):
            for item in listed[collection]:
                read(f"/{collection}/{item['id']}")
                if collection == "artifacts" and item.get("uploaded"):
                    read(f"/artifacts/{item['id']}/content")
        for run_id in dict.fromkeys([*run_ids, *(run["id"] for run in listed["runs"])]):
            run = read(f"/runs/{run_id}")
            names = read(f"/runs/{run_id}/metrics/names")
            read(f"/runs/{run_id}/metrics")
            read("/metrics/names", runs=json.dumps([run_id]))
            if names:
                for xaxis in ("step", "time", "timestamp"):
                    read("/metrics", runs=json.dumps([run_id]), metrics=json.dumps(names), xaxis=xaxis)
                read("/metrics", runs=json.dumps([run_id]), metrics=json.dumps(names), aggregate="true")
            read("/events", run=run_id)
            read(f"/runs/{run_id}/abort")
            for artifact in read(f"/runs/{run_id}/artifacts") or []:
                read(f"/runs/{run_id}/artifacts/{artifact['id']}")
            for alert in (run or {}).get("alerts", []):
                read(f"/alerts/{alert['alert']['id']}/status/{run_id}")
            for grid in read(f"/runs/{run_id}/grids") or []:
                read(f"/grids/{grid['id']}")
                metric = quote(grid["metric"], safe="/")
                span = read(f"/runs/{run_id}/metrics/{metric}/span")
                if span and span[0].get("steps"):  # a metric put on a grid may have no values yet
                    read(f"/runs/{run_id}/metrics/{metric}/values")
        return failed

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
