"""Requests per second a run makes to its server, at 1 and 4 processes.

    python bench/server_requests.py [--seconds 10] [--rate 2000]

Starts a local ``simvue server`` (needs ``simvue[server]``), runs a job that logs ``--rate``
``log_metrics`` calls per second per process (4 metrics each, an event every 100 calls) for
``--seconds``, as one process and as ``mpiexec -n 4``, and prints the requests the server
received, per second of the job, by kind, and whether every point logged was on the server
when the job's ``close()`` returned.  Settings are the defaults (one upload pass a
second), except the abort poll, left at its default of 10 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from simvue.server.local import ServerProcess

# What this benchmark itself asks the server, not counted.
OWN_READS = {"GET /api/server/stats", "GET /api/runs", "GET /api/runs/{run_id}/metrics"}

JOB = textwrap.dedent(
    """
    import os, sys, time
    from simvue import Run
    seconds, rate = float(sys.argv[1]), float(sys.argv[2])
    with Run() as run:
        run.init(name=sys.argv[3])
        start = time.perf_counter()
        calls = 0
        while (now := time.perf_counter() - start) < seconds:
            target = int(now * rate)
            while calls < target:
                run.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0, "d": float(calls)})
                if calls % 100 == 0:
                    run.log_event(f"call {calls}")
                calls += 1
            time.sleep(0.001)
    print("CALLS", calls)
    """
)

# The two routes metric points may take (docs/online.md#upload-formats).
METRICS_ROUTES = ("POST /api/metrics", "POST /api/runs/{run_id}/columns")


def measure(server: ServerProcess, processes: int, seconds: float, rate: float, workdir: Path) -> dict:
    before = server.stats()["requests"]
    script = workdir / "job.py"
    script.write_text(JOB)
    name = f"bench-{processes}"
    command = [sys.executable, str(script), str(seconds), str(rate), name]
    if processes > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        command = ["timeout", "300", str(mpiexec), "-n", str(processes), *command]
    env = {**os.environ, **server.env, "SIMVUE_STORE": str(workdir / f"store-{processes}")}
    started = time.monotonic()
    job = subprocess.run(command, env=env, check=True, cwd=workdir, timeout=360, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    logged = 4 * sum(int(line.split()[1]) for line in job.stdout.splitlines() if line.startswith("CALLS "))
    after = server.stats()["requests"]
    counts = {key: after.get(key, 0) - before.get(key, 0) for key in after if key not in OWN_READS}
    run = server.run_named(name)
    points = sum(len(series["values"]) for series in server.metrics(run["id"]).values())
    return {"processes": processes, "elapsed": elapsed, "counts": counts, "points": points, "logged": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="log_metrics calls per second per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = ServerProcess(workdir / "server-data")
        try:
            results = [measure(server, n, args.seconds, args.rate, workdir) for n in (1, 4)]
            clients = server.stats()["clients"]
        finally:
            server.stop()
    kinds = sorted({kind for result in results for kind in result["counts"]})
    print(f"# {args.rate:g} log_metrics calls/s per process (4 metrics each) for {args.seconds:g} s")
    print(f"{'requests/s of job time':<34}" + "".join(f"{'n=' + str(r['processes']):>10}" for r in results))
    for kind in kinds:
        print(f"{kind:<34}" + "".join(f"{r['counts'].get(kind, 0) / r['elapsed']:>10.2f}" for r in results))
    print(f"{'all requests':<34}" + "".join(f"{sum(r['counts'].values()) / r['elapsed']:>10.2f}" for r in results))
    print(f"{'points logged':<34}" + "".join(f"{r['logged']:>10,}" for r in results))
    print(f"{'points on the server at close':<34}" + "".join(f"{r['points']:>10,}" for r in results))
    print(f"{'points per metrics request':<34}" + "".join(
        f"{r['points'] / max(1, sum(r['counts'].get(route, 0) for route in METRICS_ROUTES)):>10,.0f}" for r in results
    ))
    print(f"distinct client processes seen by the server over both jobs: {len(clients)}")
    print("(simvue push: bench/upload.py)")


if __name__ == "__main__":
    main()
