"""Resource sampling benchmark: what a sampler tick costs, and what sampling costs rank 0.

    python bench/resources.py            # about 1.5 minutes on a 2-core VM
    python bench/resources.py --quick    # smaller sizes, about 30 s

Prints one markdown report (described in docs/performance.md, "Resource sampling"):

1. **Sampler tick**: ``NodeSampler.sample()`` timed in this process (what the sampler process,
   ``python -m simvue.resources.agent``, spends per sample) for 1, 4, 16 and 64 sampled
   processes: idle children of this script, started here and killed at the end.  Two kinds of
   tick, interleaved: one that re-reads the node's process tree (every ``TREE_REFRESH_S``, and
   the first after ``set_processes``) and an ordinary one (tree cached).
2. **Rank-0 slowdown**: ``run.log_metrics`` (4 floats) calls per second in a single-process
   offline run, with sampling off (``resources_metrics_interval=0``) and on at 1 s, in fresh
   interpreters, alternating off/on; flat out, and with a CPU-bound loop between calls.  In
   the "on" runs, the sampler process (the run process's child whose command line holds
   ``simvue.resources.agent``) is measured with psutil: CPU seconds per second and RSS.

No simvue code is changed; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from overhead import run_phase as run_in_fresh_interpreter  # noqa: E402 - bench/ is sys.path[0]

AGENT_MODULE = "simvue.resources.agent"
SIZES = (1, 4, 16, 64)
METRICS = ("loss", "energy", "residual", "dt")
# An idle child that also exits by itself if this script dies without killing it.
IDLE_CHILD = "import os, time\nparent = os.getppid()\nwhile os.getppid() == parent:\n    time.sleep(1.0)\n"


# ---------------------------------------------------------------------------------------------
# 1. sampler tick, in this process
# ---------------------------------------------------------------------------------------------


def start_idle_children(n: int) -> list[subprocess.Popen]:
    children: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            children.append(subprocess.Popen([sys.executable, "-S", "-c", IDLE_CHILD], stdin=subprocess.DEVNULL))
    except BaseException:
        stop_children(children)
        raise
    return children


def stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        try:
            child.kill()
        except OSError:
            pass
    for child in children:
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            pass


def time_tick(sampler, refresh: bool) -> tuple[int, int]:
    """Wall and thread-CPU ns of one ``sampler.sample()``."""
    if refresh:
        sampler._tree_read_at = float("-inf")  # force a process-tree read, as every TREE_REFRESH_S
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    sampler.sample()
    return time.perf_counter_ns() - w0, time.thread_time_ns() - c0


def bench_ticks(ticks: int, pause_s: float) -> list[dict]:
    from simvue.resources.gpu import Gpus
    from simvue.resources.sampler import NodeSampler, Proc

    children = start_idle_children(max(SIZES))
    try:
        time.sleep(1.0)  # let the children finish starting
        results = []
        for n in SIZES:
            # As the agent builds it: NVML if there is one (there is none on the VM).
            sampler = NodeSampler(platform.node(), plain_pid=None, gpus=Gpus.open(os.environ.get("SIMVUE_NVML_MODULE") or "pynvml"))
            try:
                sampler.set_processes(Proc(f"rank{i}", child.pid) for i, child in enumerate(children[:n]))
                first_wall, first_cpu = time_tick(sampler, refresh=False)  # new psutil handles + tree read
                values = sampler.sample()  # a second warm-up tick: node rates now exist
                refresh_wall, refresh_cpu, plain_wall, plain_cpu = [], [], [], []
                for _ in range(ticks):
                    time.sleep(pause_s)
                    w, c = time_tick(sampler, refresh=True)
                    refresh_wall.append(w)
                    refresh_cpu.append(c)
                    time.sleep(pause_s)
                    w, c = time_tick(sampler, refresh=False)
                    plain_wall.append(w)
                    plain_cpu.append(c)
                missing = [i for i in range(n) if f"resources/rank{i}/cpu.usage.percentage" not in values]
                if missing:
                    raise RuntimeError(f"sampler missed processes {missing} of {n}")
                results.append({
                    "n": n, "node_processes": len(psutil.pids()), "series": len(values),
                    "first_wall_ns": first_wall, "first_cpu_ns": first_cpu,
                    "refresh_wall_ns": refresh_wall, "refresh_cpu_ns": refresh_cpu,
                    "plain_wall_ns": plain_wall, "plain_cpu_ns": plain_cpu,
                })
            finally:
                sampler.close()
        return results
    finally:
        stop_children(children)


# ---------------------------------------------------------------------------------------------
# 2. rank-0 slowdown: one run per fresh interpreter (--phase run)
# ---------------------------------------------------------------------------------------------


def find_agent() -> psutil.Process | None:
    for child in psutil.Process().children(recursive=True):
        try:
            if any(AGENT_MODULE in part for part in child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def cpu_s(process: psutil.Process | None) -> float:
    """CPU seconds of ``process``: from ``/proc/PID/task/*/schedstat`` (ns) where Linux has it,
    since psutil's ``cpu_times`` counts in 10 ms ticks and a sampler tick takes a few ms."""
    if process is None:
        return float("nan")
    try:
        tasks = Path(f"/proc/{process.pid}/task")
        return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        times = process.cpu_times()
        return times.user + times.system


def phase_run(args) -> dict:
    """One run: ``--warmup-s`` of logging, then ``--seconds`` timed; returns calls/s and the
    sampler process's CPU and RSS."""
    from simvue import Run

    work = args.work
    metrics = [{name: float(i + j) for j, name in enumerate(METRICS)} for i in range(1000)]

    def block(log) -> None:
        x = 1.0
        for record in metrics:
            for _ in range(work):  # the "simulation" between two calls (none when work=0)
                x = x * 0.999999 + 1e-9
            log(record)

    name = f"bench-resources-{args.interval:g}-{work}"
    with Run(mode="offline") as run:
        run.config(resources_metrics_interval=args.interval)
        run.init(name=name)
        log = run.log_metrics
        warmup_calls = 0
        end = time.perf_counter() + args.warmup_s
        while time.perf_counter() < end:
            block(log)
            warmup_calls += len(metrics)
        agent = find_agent()
        if (agent is None) != (args.interval == 0):
            raise RuntimeError(f"sampler process {'missing' if agent is None else 'running'} at interval {args.interval}")
        agent_cpu0 = cpu_s(agent)
        own_cpu0 = time.process_time()
        calls = 0
        t0 = time.perf_counter()
        end = t0 + args.seconds
        while True:
            block(log)
            calls += len(metrics)
            if (t1 := time.perf_counter()) >= end:
                break
        own_cpu1 = time.process_time()
        agent_cpu1 = cpu_s(agent)
        agent_rss = agent.memory_info().rss if agent is not None else 0
        own_rss = psutil.Process().memory_info().rss
        c0 = time.perf_counter()
    close_s = time.perf_counter() - c0
    elapsed = t1 - t0
    result = {
        "interval": args.interval, "work": work, "calls": calls, "all_calls": warmup_calls + calls, "elapsed_s": elapsed, "calls_per_s": calls / elapsed,
        "own_cpu_per_s": (own_cpu1 - own_cpu0) / elapsed, "own_rss": own_rss, "close_s": close_s,
        "agent_startup_cpu_s": agent_cpu0, "agent_cpu_per_s": (agent_cpu1 - agent_cpu0) / elapsed,
        "agent_rss": agent_rss,
    }
    result.update(store_counts(os.environ["SIMVUE_STORE"], name))
    return result


def store_counts(store_dir: str, name: str) -> dict:
    from simvue.store import Store

    store = Store(store_dir)
    try:
        run = [r for r in store.runs() if r["name"] == name][-1]
        counts = store.metric_counts(run["id"])
        return {"status": run["status"], "logged_points": int(sum(counts.get(m, 0) for m in METRICS)),
                "resource_series": sum(1 for key in counts if key.startswith("resources/")),
                "resource_samples": int(counts.get("resources/cpu.usage.percentage", 0))}
    finally:
        store.close()


def run_phase(interval: float, work: int, seconds: float, warmup_s: float) -> dict:
    opts = ["--interval", repr(interval), "--work", str(work), "--seconds", repr(seconds), "--warmup-s", repr(warmup_s)]
    return run_in_fresh_interpreter("run", opts, 120, script=__file__)


def bench_slowdown(repeats: int, seconds: float, warmup_s: float, work: int) -> dict:
    results: dict[str, dict[str, list[dict]]] = {}
    for variant, w in (("flat out", 0), (f"CPU-bound loop ({work} steps between calls)", work)):
        per = results.setdefault(variant, {"off": [], "on": []})
        for repeat in range(repeats):
            # Alternate which goes first, so that a drifting machine does not favour one.
            for mode in (("off", "on") if repeat % 2 == 0 else ("on", "off")):
                per[mode].append(run_phase(0.0 if mode == "off" else 1.0, w, seconds, warmup_s))
    return results


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def us(ns: float) -> str:
    return f"{ns / 1000:,.0f}"


def spread(values: list[float], fmt=us) -> str:
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def report(ticks: list[dict], slowdown: dict, args, total_s: float) -> str:
    from simvue.resources.gpu import MB
    from simvue.resources.sampler import TREE_REFRESH_S

    lines = ["# Resource sampling benchmark", ""]
    lines.append(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, psutil {psutil.__version__}, commit {commit()}, total {total_s:.0f} s"
        f"{' (--quick)' if args.quick else ''}."
    )
    lines += ["", f"## 1. Sampler tick (`NodeSampler.sample()`), {args.ticks} ticks of each kind, interleaved, "
              f"{args.pause_s * 1000:g} ms apart; µs, median [min–max]", ""]
    lines.append("| sampled processes | processes on the node | series | first tick (new handles) | "
                 f"tree re-read (every {TREE_REFRESH_S:g} s) | ordinary tick | ordinary, CPU | ordinary, per process |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in ticks:
        lines.append(
            f"| {t['n']} | {t['node_processes']} | {t['series']} | {us(t['first_wall_ns'])} | "
            f"{spread(t['refresh_wall_ns'])} | {spread(t['plain_wall_ns'])} | {us(statistics.median(t['plain_cpu_ns']))} | "
            f"{statistics.median(t['plain_wall_ns']) / t['n'] / 1000:,.0f} |"
        )
    lines += ["", f"## 2. Rank 0 (single-process offline run), sampling off vs. on at 1 s; "
              f"{args.seconds:g} s timed after {args.warmup_s:g} s of logging, {args.repeats} off/on pairs "
              "(fresh interpreters, alternating order)", ""]
    lines.append("| main loop | calls/s, off: median [range] | calls/s, on | on / off (median of pairs) [range] | "
                 "run process CPU s/s, off / on | sampler CPU s/s | sampler start-up CPU s | sampler RSS MB | samples stored per run |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for variant, per in slowdown.items():
        off, on = per["off"], per["on"]
        ratios = [b["calls_per_s"] / a["calls_per_s"] for a, b in zip(off, on)]
        rate = lambda v: f"{v:,.0f}"  # noqa: E731
        lines.append(
            f"| {variant} | {spread([r['calls_per_s'] for r in off], rate)} | "
            f"{spread([r['calls_per_s'] for r in on], rate)} | "
            f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] | "
            f"{statistics.median(r['own_cpu_per_s'] for r in off):.2f} / {statistics.median(r['own_cpu_per_s'] for r in on):.2f} | "
            f"{statistics.median(r['agent_cpu_per_s'] for r in on):.4f} | "
            f"{statistics.median(r['agent_startup_cpu_s'] for r in on):.2f} | "
            f"{statistics.median(r['agent_rss'] for r in on) / MB:.1f} | "
            f"{'–'.join(sorted({str(r['resource_samples']) for r in on}))} |"
        )
        for r in off + on:
            if r["status"] != "completed" or r["logged_points"] != 4 * r["all_calls"]:
                notes.append(f"{variant}, interval {r['interval']:g}: status {r['status']}, "
                             f"{r['logged_points']:,} points stored of {4 * r['all_calls']:,} logged")
            if r["interval"] == 0 and r["resource_series"]:
                notes.append(f"{variant}: resource series stored with sampling off")
            if r.get("stderr"):
                notes.append(f"{variant}, interval {r['interval']:g}, stderr: {r['stderr'][-300:]}")
    lines.append("")
    lines.append("calls/s per run: " + "; ".join(
        f"{variant}: off " + ", ".join(f"{r['calls_per_s']:,.0f}" for r in per["off"])
        + " / on " + ", ".join(f"{r['calls_per_s']:,.0f}" for r in per["on"]) for variant, per in slowdown.items()))
    lines += [""] + [f"* {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer ticks, shorter runs, one off/on pair")
    parser.add_argument("--ticks", type=int, default=0, help="timed ticks of each kind per size (default 30; 10 quick)")
    parser.add_argument("--pause-s", type=float, default=0.02, help="sleep between ticks")
    parser.add_argument("--repeats", type=int, default=0, help="off/on pairs per variant (default 3; 1 quick)")
    parser.add_argument("--seconds", type=float, default=0.0, help="timed logging per run (default 3; 1.5 quick)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="untimed logging before (the sampler starts)")
    parser.add_argument("--work", type=int, default=300, help="loop steps between calls in the CPU-bound variant")
    parser.add_argument("--json", help="also write every raw number to this JSON file")
    # internal: one run in a fresh interpreter
    parser.add_argument("--phase", choices=["run"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase == "run":
        data = phase_run(args)
        with open(args.result, "w") as fh:
            json.dump(data, fh)
        return 0

    args.ticks = args.ticks or (10 if args.quick else 30)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.seconds = args.seconds or (1.5 if args.quick else 3.0)
    started = time.perf_counter()
    ticks = bench_ticks(args.ticks, args.pause_s)
    slowdown = bench_slowdown(args.repeats, args.seconds, args.warmup_s, args.work)
    print(report(ticks, slowdown, args, time.perf_counter() - started))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"ticks": ticks, "slowdown": slowdown}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
