"""Requests per second a run makes to its server, at 1 and 4 processes.

    python bench/server_requests.py [--seconds 10] [--rate 2000]

Starts a local ``simvue server`` (needs ``simvue[server]``), runs a job that logs ``--rate``
``log_metrics`` calls per second per process (4 metrics each, an event every 100 calls) for
``--seconds``, as one process and as ``mpiexec -n 4``, and prints the requests the server
received, per second of the job, by kind.  Settings are the defaults (one upload pass a
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
    """
)


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
    subprocess.run(command, env=env, check=True, cwd=workdir, timeout=360)
    elapsed = time.monotonic() - started
    after = server.stats()["requests"]
    counts = {key: after.get(key, 0) - before.get(key, 0) for key in after if key not in OWN_READS}
    run = server.run_named(name)
    points = sum(len(series["values"]) for series in server.metrics(run["id"]).values())
    return {"processes": processes, "elapsed": elapsed, "counts": counts, "points": points}


OFFLINE_JOB = textwrap.dedent(
    """
    import sys
    from simvue import Run
    with Run(mode="offline") as run:
        run.init(name=sys.argv[2])
        for call in range(int(sys.argv[1])):
            run.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0, "d": float(call)})
            if call % 100 == 0:
                run.log_event(f"call {call}")
    """
)


def measure_push(server: ServerProcess, calls: int, workdir: Path) -> dict:
    """Time ``simvue push`` of an offline run of ``calls`` x 4 points."""
    env = {**os.environ, **server.env, "SIMVUE_STORE": str(workdir / "store-push")}
    subprocess.run([sys.executable, "-c", OFFLINE_JOB, str(calls), "bench-push"], env=env, check=True, timeout=600)
    before = server.stats()["requests"]
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "simvue.cli", "push", "bench-push"], env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    after = server.stats()["requests"]
    return {"points": 4 * calls, "elapsed": elapsed, "metrics_requests": after["POST /api/metrics"] - before.get(
        "POST /api/metrics", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="log_metrics calls per second per process")
    parser.add_argument("--push-calls", type=int, default=250_000, help="size of the pushed offline run, in calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = ServerProcess(workdir / "server-data")
        try:
            results = [measure(server, n, args.seconds, args.rate, workdir) for n in (1, 4)]
            clients = server.stats()["clients"]
            pushed = measure_push(server, args.push_calls, workdir)
        finally:
            server.stop()
    kinds = sorted({kind for result in results for kind in result["counts"]})
    print(f"# {args.rate:g} log_metrics calls/s per process (4 metrics each) for {args.seconds:g} s")
    print(f"{'requests/s of job time':<34}" + "".join(f"{'n=' + str(r['processes']):>10}" for r in results))
    for kind in kinds:
        print(f"{kind:<34}" + "".join(f"{r['counts'].get(kind, 0) / r['elapsed']:>10.2f}" for r in results))
    print(f"{'all requests':<34}" + "".join(f"{sum(r['counts'].values()) / r['elapsed']:>10.2f}" for r in results))
    print(f"{'points stored':<34}" + "".join(f"{r['points']:>10,}" for r in results))
    print(f"{'points per metrics request':<34}" + "".join(
        f"{r['points'] / max(1, r['counts'].get('POST /api/metrics', 0)):>10,.0f}" for r in results
    ))
    print(f"distinct client processes seen by the server over both jobs: {len(clients)}")
    print(
        f"simvue push of {pushed['points']:,} points: {pushed['elapsed']:.1f} s "
        f"({pushed['points'] / pushed['elapsed']:,.0f} points/s, {pushed['metrics_requests']} metrics requests)"
    )


if __name__ == "__main__":
    main()
