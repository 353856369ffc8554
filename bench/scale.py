"""What tracking costs as a job grows: 1, 4, 16 and 64 ranks on this machine.

    python bench/scale.py                    # n = 1, 4, 16, 64; a few minutes on 2 cores
    python bench/scale.py --ranks 1,4 --steps 300

For each number of ranks the same job runs twice under ``mpiexec -n N`` (one plain process
for N = 1): tracked, and with tracking disabled (``Run(mode="disabled")``).  Every rank runs a
fixed loop of ``--steps`` steps, each a fixed piece of pure-Python work followed by one
``log_metrics`` of 4 values, and reports the time of each call, its loop's time and its peak
memory.  The table gives, per N:

* every rank's caller cost: the median and 99th percentile of ``log_metrics`` over all ranks;
* rank 0's loop slowdown: its loop's time tracked over its time untracked (rank 0 starts the
  aggregator, so this is what aggregation takes from the job);
* wall time of the tracked job, rank 0's extra peak memory (tracked minus untracked: its
  buffers and sender, and the aggregator when it is a thread of rank 0) and the peak memory of
  the aggregator's own process (``aggregate_in``: by default rank 0 of an MPI job starts one);
* whether every point of every rank was stored.

This machine has 2 cores: with more ranks than cores the ranks share them, so read the 16- and
64-rank rows as oversubscribed (the slowdown then includes the ranks' own contention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simvue.store import Store  # noqa: E402

JOB = textwrap.dedent(
    """
    import json, os, resource, sys, time
    from simvue import Run
    steps, work, mode, name, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    clock = time.perf_counter_ns
    calls = []
    with Run(mode=mode) as run:
        run.init(name=name)
        rank = run.rank
        started = time.perf_counter()
        for step in range(steps):
            total = 0
            for i in range(work):
                total += i * i
            before = clock()
            run.log_metrics({"loss": 1.0 / (step + 1), "energy": float(total % 1000), "rank": float(rank),
                             "step": float(step)})
            calls.append(clock() - before)
        loop = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    helper_kib = 0
    if rank == 0 and mode != "disabled":  # the aggregator's own process, if it has one: its peak
        import psutil
        for child in psutil.Process().children():
            if "simvue.aggregator.host" in " ".join(child.cmdline()):
                child.wait(300)
                helper_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.path.join(out, f"{mode}-{rank}.json"), "w") as result:  # a file each: ranks' prints interleave
        json.dump({"rank": rank, "loop": loop, "calls": calls, "peak_kib": peak_kib, "helper_kib": helper_kib}, result)
    """
)


def launch(ranks: int, steps: int, work: int, mode: str, name: str, store: Path, timeout: int) -> tuple[float, list[dict]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDI_", "OMPI_"))}
    env.update({"SIMVUE_STORE": str(store), "SIMVUE_RESOURCES_INTERVAL_S": "0"})
    env.pop("SIMVUE_URL", None)
    out = store.parent / f"results-{ranks}"
    out.mkdir(exist_ok=True)
    command = [sys.executable, "-c", JOB, str(steps), str(work), mode, name, str(out)]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        command = ["timeout", "-k", "10", str(timeout), str(mpiexec), "-n", str(ranks), *command]
    started = time.perf_counter()
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout + 30)
    wall = time.perf_counter() - started
    if job.returncode != 0:
        raise SystemExit(f"{ranks} ranks, {mode}: the job failed\n{job.stderr[-2000:]}")
    results = [json.loads(path.read_text()) for path in sorted(out.glob(f"{mode}-*.json"))]
    if len(results) != ranks:
        raise SystemExit(f"{ranks} ranks, {mode}: {len(results)} ranks reported")
    return wall, results


def stored_points(store: Path, name: str) -> int:
    reader = Store(store)
    try:
        run = reader.run(name)
        return sum(reader.metric_counts(run["id"]).values())
    finally:
        reader.close()


def percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--work", type=int, default=2000, help="loop iterations of work per step")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--aggregate-in", choices=["auto", "thread", "process"], default="auto",
                        help="where the aggregator runs (auto: a process of its own under mpiexec)")
    args = parser.parse_args()
    os.environ["SIMVUE_AGGREGATE_IN"] = args.aggregate_in
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (int(n) for n in args.ranks.split(",")):
            name = f"scale-{ranks}"
            store = Path(tmp) / f"store-{ranks}"
            _, plain = launch(ranks, args.steps, args.work, "disabled", name, Path(tmp) / "unused", args.timeout)
            wall, tracked = launch(ranks, args.steps, args.work, "offline", name, store, args.timeout)
            calls = [ns for result in tracked for ns in result["calls"]]
            rank0 = next(r for r in tracked if r["rank"] == 0)
            plain0 = next(r for r in plain if r["rank"] == 0)
            expected = ranks * args.steps * 4
            rows.append({
                "ranks": ranks,
                "median_us": statistics.median(calls) / 1e3,
                "p99_us": percentile(calls, 0.99) / 1e3,
                "slowdown": rank0["loop"] / plain0["loop"],
                "wall_s": wall,
                "extra_mib": (rank0["peak_kib"] - plain0["peak_kib"]) / 1024,
                "helper_mib": rank0["helper_kib"] / 1024,
                "stored": f"{stored_points(store, name):,} of {expected:,}",
            })
    print(f"{args.steps} steps per rank, 4 values per call, {args.work} iterations of work per step;"
          f" {os.cpu_count()} cores\n")
    print("| ranks | log_metrics median µs | p99 µs | rank 0 loop slowdown | wall s | rank 0 extra peak MiB |"
          " aggregator process peak MiB | points stored |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        helper = f"{row['helper_mib']:.1f}" if row["helper_mib"] else "(a thread of rank 0)"
        print(f"| {row['ranks']} | {row['median_us']:.2f} | {row['p99_us']:.1f} | {row['slowdown']:.2f}x |"
              f" {row['wall_s']:.1f} | {row['extra_mib']:.1f} | {helper} | {row['stored']} |")


if __name__ == "__main__":
    main()
