"""How fast a run's points reach a server, in each upload format, beside the offline log rate.

    python bench/upload.py [--points 1000000] [--metrics 10]

Logs one offline run of ``--points`` points (``--metrics`` per ``log_metrics`` call) and
times it; then, for each format, sends a copy of that store to a fresh local ``simvue
server`` (needs ``simvue[server]``) the way ``simvue push`` does, and prints points per
second, requests per second and the bytes sent per point.  ``upstream`` is the Simvue
server's own format (one dict per call); ``columns`` sends the store's packed columns as they
are (what ``simvue server`` offers, see docs/online.md); ``+gzip`` compresses the bodies, as
the uploader does for a server on another machine that takes gzip.  Every point is checked on the server
afterwards.  All numbers come from one run of this script: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from simvue.api.config import ServerConfig
from simvue.api.connection import Connection
from simvue.server.local import ServerProcess
from simvue.store import Store
from simvue.upload import Replicator

LOG = textwrap.dedent(
    """
    import sys, time
    from simvue import Run
    points, width = int(sys.argv[1]), int(sys.argv[2])
    names = [f"m{i}" for i in range(width)]
    with Run(mode="offline") as run:
        run.init(name="upload-bench")
        start = time.perf_counter()
        for step in range(points // width):
            run.log_metrics(dict.fromkeys(names, step * 0.5))
        logged = time.perf_counter() - start
    print(logged, time.perf_counter() - start)
    """
)


def log_offline(directory: Path, points: int, width: int) -> tuple[float, float]:
    env = {**os.environ, "SIMVUE_STORE": str(directory), "SIMVUE_RESOURCES_INTERVAL_S": "0"}
    env.pop("SIMVUE_URL", None)
    result = subprocess.run([sys.executable, "-c", LOG, str(points), str(width)], env=env, check=True,
                            capture_output=True, text=True)
    logged, closed = (float(x) for x in result.stdout.split())
    return logged, closed


def push(store_dir: Path, work: Path, fmt: str, expected: int) -> dict:
    with ServerProcess(work / f"server-{fmt}") as server:
        connection = Connection(ServerConfig(url=server.url + "/api", token=server.token, mode="online"))
        connection.check_version()
        connection.columnar = connection.columnar and fmt.startswith("columns")
        connection.compress = fmt.endswith("+gzip")  # gzip bodies even to this machine
        if fmt.startswith("columns") and not connection.columnar:
            raise SystemExit("the server does not offer the columnar format")
        sent_bytes = 0

        def count(response, *_, **__):
            nonlocal sent_bytes
            sent_bytes += len(response.request.body or b"")

        connection._session.hooks["response"].append(count)
        store = Store(store_dir)
        (run,) = store.runs()
        before = sum(server.stats()["requests"].values())
        started = time.perf_counter()
        Replicator(store, connection, run["id"]).sync(60.0, job_over=True)
        seconds = time.perf_counter() - started
        requests = sum(server.stats()["requests"].values()) - before
        (remote,) = [r for r in server.get("/runs")["data"] if r["name"] == "upload-bench"]
        stored = sum(len(series["values"]) for series in server.metrics(remote["id"]).values())
        store.close()
        connection.close()
    if stored != expected:
        raise SystemExit(f"{fmt}: {stored} of {expected} points arrived")
    return {"seconds": seconds, "requests": requests, "bytes": sent_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--metrics", type=int, default=10, help="metrics per log_metrics call")
    parser.add_argument("--formats", default="upstream,columns,upstream+gzip,columns+gzip")
    args = parser.parse_args()
    points = args.points // args.metrics * args.metrics
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        logged, closed = log_offline(work / "store", points, args.metrics)
        rows = [("offline log_metrics (in the job)", points / logged, "", ""),
                ("offline, to close() returning", points / closed, "", "")]
        for fmt in args.formats.split(","):
            copy = work / f"store-{fmt}"
            shutil.copytree(work / "store", copy)
            result = push(copy, work, fmt, points)
            rows.append((f"push, {fmt} format", points / result["seconds"], f"{result['requests'] / result['seconds']:.1f}",
                         f"{result['bytes'] / points:.1f}"))
    print(f"{points:,} points, {args.metrics} metrics per call\n")
    print("| | points/s | requests/s | bytes/point |")
    print("|---|---:|---:|---:|")
    for label, rate, per_second, per_point in rows:
        print(f"| {label} | {rate:,.0f} | {per_second} | {per_point} |")


if __name__ == "__main__":
    main()
