"""``simvue push``: send runs from the local store to the configured server.

Pushing is the online sink's replicator run to completion: it resumes where the last push
(or the job's own uploader) stopped, so pushing twice sends nothing twice, and an
interrupted push is finished by the next one.  Runs still being written by a live job are
left to that job.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from ..api import config as api_config
from ..api.connection import Backoff, Connection, ServerRejected, ServerUnavailable, retrying
from ..config import from_environment
from ..store import Store
from ..upload import Replicator
from .progress import Progress


def add_push_command(commands: argparse._SubParsersAction) -> None:
    push = commands.add_parser("push", help="send runs from the local store to the server")
    push.add_argument("runs", nargs="*", metavar="RUN", help="run names or ids (default: every run not yet sent)")
    push.add_argument(
        "--timeout", type=float, default=300.0, help="give up after retrying an unreachable server this long (s)"
    )
    push.set_defaults(handler=push_runs)


def push_runs(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    server = api_config.resolve("online")
    if not server.online:
        print("simvue: no server configured: set SIMVUE_URL and SIMVUE_TOKEN (or simvue.toml [server])", file=sys.stderr)
        return 1
    connection = Connection(server)
    deadline = time.monotonic() + args.timeout
    try:
        retrying(connection.check_version, deadline)
        runs = [store.run(name) for name in args.runs] if args.runs else _unsent(store, server.url or "")
        failed = 0
        for run in runs:
            if run["status"] == "running":
                out.write(f"{run['name']}: still running; its job sends it (push it once it has ended)\n")
                continue
            replicator = Replicator(store, connection, run["id"], upload_format=from_environment().upload_format)
            if replicator.complete:
                out.write(f"{run['name']}: already sent as {replicator.remote_id}\n")
                continue
            try:
                _push_one(replicator, run["name"], deadline, out)
            except ServerRejected as exc:
                replicator.reject(str(exc))
                print(f"simvue: {run['name']}: {exc}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    except ServerUnavailable as exc:
        print(
            f"simvue: the server at {server.url} {exc.reason}; gave up after {args.timeout:g} s."
            " Nothing is lost: run simvue push again.",
            file=sys.stderr,
        )
        return 1
    finally:
        connection.close()


def _unsent(store: Store, server: str) -> list[dict]:
    sent = {u["run_id"] for u in store.uploads() if u["server"] == server and u["state"] == "sent"}
    return [run for run in store.runs() if run["id"] not in sent]


def _push_one(replicator: Replicator, name: str, deadline: float, out: TextIO) -> None:
    points = Progress(name, replicator.points_left(), sys.stderr)
    files = Progress(f"{name} files", replicator.artifact_bytes_left(), sys.stderr, unit="bytes")

    def file_bytes(count: int) -> None:
        points.done()  # the points have all gone: the files' bar goes on the next line
        files.add(count)

    heartbeat_interval_s = from_environment().server_heartbeat_interval_s
    # The job has ended (push skips running runs): a final status completes the run even if
    # the job was killed before it could store its end.
    retrying(
        lambda: replicator.sync(heartbeat_interval_s, points.add, job_over=True, artifact_progress=file_bytes),
        deadline,
        Backoff(),
    )
    points.done()
    files.done()
    out.write(f"{name}: sent as {replicator.remote_id}\n")

