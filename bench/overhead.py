"""Overhead benchmark for simvue: caller cost, aggregator ingest rate and rank-0 slowdown.

    python bench/overhead.py            # full run, about 2-3 minutes on a 2-core VM
    python bench/overhead.py --quick    # smaller sizes, under ~40 s
    python bench/overhead.py --profile  # also cProfile the aggregator thread (both ingest pipelines)

Prints one markdown report.  Every phase runs in fresh processes (``--phase ...``, launched by
this script; the MPI phase under ``timeout -k 10 N mpiexec -n 4``) with a temporary
``SIMVUE_STORE``.  What is measured, and how, is described in docs/performance.md.

The aggregator is instrumented from the outside only: in the benchmark's aggregating process
``AggregatorState._ingest``, ``RunWriter.write``, ``Aggregator._loop`` and ``protocol.decode``
are wrapped with timers (wall and thread-CPU time).  No simvue code is changed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

TARGET_MEDIAN_US = 2.0
TARGET_P99_US = 20.0
TARGET_INGEST_PPS = 1_000_000
VALUES_PER_RECORD = 4
MPI_RANKS = 4
POOL_WORKERS = 4

_pc_ns = time.perf_counter_ns


# ---------------------------------------------------------------------------------------------
# helpers shared by the phases
# ---------------------------------------------------------------------------------------------


def make_metrics(count: int, seed: int = 0) -> list[dict]:
    """``count`` distinct metric dicts of 4 plain finite floats (the benchmark's records)."""
    rng = random.Random(seed)
    return [{"loss": rng.random(), "energy": rng.random() * 1e3, "residual": rng.random() * 1e-6,
             "dt": 1e-3 + rng.random() * 1e-4} for _ in range(count)]


def timer_overhead_ns(n: int) -> dict:
    """Distribution of two back-to-back ``perf_counter_ns`` calls (what every sample includes)."""
    pc = _pc_ns
    samples = [0] * n
    for i in range(n):
        t0 = pc()
        t1 = pc()
        samples[i] = t1 - t0
    return summarise(samples, 0)


def summarise(samples: list[int], overhead_ns: float) -> dict:
    """Median / p99 / p99.9 / max in µs, with ``overhead_ns`` subtracted (floored at 0)."""
    samples = sorted(samples)
    n = len(samples)

    def at(q: float) -> float:
        return max(0.0, (samples[min(n - 1, int(q * n))] - overhead_ns) / 1000.0)

    return {"n": n, "median_us": at(0.5), "p99_us": at(0.99), "p999_us": at(0.999), "max_us": at(1.0 - 1e-12),
            "mean_us": max(0.0, (sum(samples) / n - overhead_ns) / 1000.0)}


def time_log_metrics(log, metrics: list[dict], n: int) -> list[int]:
    """Per-call wall time (ns, timer overhead included) of ``log(metrics[i % len])``."""
    pc = _pc_ns
    m = len(metrics)
    samples = [0] * n
    for i in range(n):
        record = metrics[i % m]
        t0 = pc()
        log(record)
        t1 = pc()
        samples[i] = t1 - t0
    return samples


def time_bare_append(metrics: list[dict], n: int, t_start: float) -> list[int]:
    """Per-call wall time of ``deque.append`` of a record tuple of the shape log_metrics builds
    (built before the timer starts: this is the floor of any in-memory buffer)."""
    pc = _pc_ns
    m = len(metrics)
    buffer: deque = deque()
    append = buffer.append
    now = time.time()
    records = [(0, i, now - t_start, now, metrics[i].copy()) for i in range(m)]
    samples = [0] * n
    for i in range(n):
        record = records[i % m]
        t0 = pc()
        append(record)
        t1 = pc()
        samples[i] = t1 - t0
        if len(buffer) >= 100_000:
            buffer.clear()
    return samples


def time_inline_stamp(metrics: list[dict], n: int, t_start: float) -> list[int]:
    """Per-call wall time of what log_metrics must do at least, inlined (no call, no checks):
    ``append((0, next(step), now - t0, now, dict.copy()))`` with ``now = time.time()``."""
    import itertools

    pc = _pc_ns
    m = len(metrics)
    buffer: deque = deque()
    append = buffer.append
    steps = itertools.count()
    now_fn = time.time
    samples = [0] * n
    for i in range(n):
        record = metrics[i % m]
        t0 = pc()
        now = now_fn()
        append((0, next(steps), now - t_start, now, record.copy()))
        t1 = pc()
        samples[i] = t1 - t0
        if len(buffer) >= 100_000:
            buffer.clear()
    return samples


def block_per_record_ns(metrics: list[dict], n: int, t_start: float, what: str, log=None,
                        batch: int = 1000) -> float:
    """ns per record, timing blocks of ``batch`` records at once (median over blocks; the
    ``for`` loop is included, as it is in any caller):

    * ``ours``: ``log(metrics)`` (``log`` is ``Run.log_metrics``);
    * ``bare``: ``deque.append`` of the prebuilt record tuple;
    * ``packb``: ``deque.append`` of the prebuilt record tuples, then one ``msgpack.packb`` of
      the drained batch (what a sender has to do at least);
    * ``inline``: ``time.time()``, ``next(step)``, ``dict.copy()``, tuple, append, inlined.
    """
    import itertools

    m = len(metrics)
    now = time.time()
    if what == "ours":
        items = [metrics[i % m] for i in range(batch)]
    elif what == "inline":
        items = [metrics[i % m] for i in range(batch)]
    else:
        items = [(0, i, now - t_start, now + i * 1e-6, metrics[i % m].copy()) for i in range(batch)]
    buffer: deque = deque()
    append, popleft = buffer.append, buffer.popleft
    packb = msgpack.packb
    steps = itertools.count()
    now_fn = time.time
    pc = _pc_ns
    per_block = []
    for _ in range(max(1, n // batch)):
        if what == "ours":
            t0 = pc()
            for item in items:
                log(item)
            t1 = pc()
        elif what == "bare":
            t0 = pc()
            for item in items:
                append(item)
            t1 = pc()
            buffer.clear()
        elif what == "packb":
            t0 = pc()
            for item in items:
                append(item)
            packb([popleft() for _ in range(batch)])
            t1 = pc()
        else:
            t0 = pc()
            for item in items:
                now = now_fn()
                append((0, next(steps), now - t_start, now, item.copy()))
            t1 = pc()
            buffer.clear()
        per_block.append(t1 - t0)
    return statistics.median(per_block) / batch


class Instrument:
    """Wraps aggregator methods with wall-clock and thread-CPU timers (this process only)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.finished_at: float | None = None
        self.finished = threading.Event()
        self.loop_cpu_s = 0.0
        self.loop_wall_s = 0.0

    def _add(self, key: str, wall: float, cpu: float) -> None:
        self.wall[key] = self.wall.get(key, 0.0) + wall
        self.cpu[key] = self.cpu.get(key, 0.0) + cpu
        self.calls[key] = self.calls.get(key, 0) + 1

    def install(self, profile: bool = False) -> None:
        from simvue.aggregator import receiver, service, state, writer
        from simvue.transport import protocol

        instrument = self
        pc, tt = time.perf_counter, time.thread_time

        def timed(key, fn):
            def wrapper(*args, **kwargs):
                w0, c0 = pc(), tt()
                try:
                    return fn(*args, **kwargs)
                finally:
                    instrument._add(key, pc() - w0, tt() - c0)

            return wrapper

        state.AggregatorState._ingest = timed("ingest", state.AggregatorState._ingest)
        writer.RunWriter.write = timed("commit", writer.RunWriter.write)
        receiver.protocol.decode = timed("decode", protocol.decode)  # the receiver's module reference
        original_loop = service.Aggregator._loop
        original_finish = service.Aggregator._finish

        def loop(self_):
            w0, c0 = pc(), tt()
            profiler = None
            if profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            try:
                return original_loop(self_)
            finally:
                if profiler is not None:
                    profiler.disable()
                    instrument.profiler = profiler
                instrument.loop_cpu_s += tt() - c0
                instrument.loop_wall_s += pc() - w0

        def finish(self_, *args, **kwargs):
            try:
                return original_finish(self_, *args, **kwargs)
            finally:
                instrument.finished_at = pc()
                instrument.finished.set()

        service.Aggregator._loop = loop
        service.Aggregator._finish = finish

    def report(self) -> dict:
        return {
            "wall_s": dict(self.wall),
            "cpu_s": dict(self.cpu),
            "calls": dict(self.calls),
            "loop_cpu_s": self.loop_cpu_s,
            "loop_wall_s": self.loop_wall_s,
        }


def watch_buffer_full() -> dict:
    """Count the caller's waits in ``buffer_full`` (``max_buffered_records`` reached: the caller
    waits for the background thread, up to ~1 s, then goes on or spills)."""
    from simvue import session

    stats = {"calls": 0, "wall_s": 0.0, "max_s": 0.0}
    for cls in (session.LocalPipe, session.SenderPipe):
        original = cls.buffer_full

        def wrapper(self, limit, wait_s=None, *, original=original):
            t0 = time.perf_counter()
            try:
                return original(self, limit, wait_s)
            finally:
                dt = time.perf_counter() - t0
                stats["calls"] += 1
                stats["wall_s"] += dt
                stats["max_s"] = max(stats["max_s"], dt)

        cls.buffer_full = wrapper
    return stats


def stored_points(store_dir: str, name: str | None = None) -> dict:
    """Points per metric in the store (summed over its chunks), for the run ``name`` or the
    only run; resource series (sampled beside the benchmark's own points) are left out."""
    from simvue.store import Store

    store = Store(store_dir)
    try:
        runs = store.runs()
        run = [r for r in runs if name is None or r["name"] == name][-1]
        counts = {n: c for n, c in store.metric_counts(run["id"]).items() if not n.startswith("resources/")}
        return {"run": run["name"], "status": run["status"], "series": len(counts),
                "points": int(sum(counts.values())), "metadata_losses": run["metadata"].get("simvue", {}).get("losses")}
    finally:
        store.close()


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# phase: caller-side latency in one process, with the floors measured in the same process
# ---------------------------------------------------------------------------------------------


def phase_latency(args) -> dict:
    waits = watch_buffer_full()
    from simvue import Run

    metrics = make_metrics(1000)
    run = Run()
    run.init(name="bench-latency", folder="/bench")
    log = run.log_metrics
    t_start = time.time()
    timer = timer_overhead_ns(args.calls)
    overhead = timer["median_us"] * 1000.0
    time_log_metrics(log, metrics, args.warmup)
    rounds = []
    for _ in range(args.rounds):
        if args.settle_between:
            run.flush(60)  # start each round with the aggregator idle (its backlog committed)
        ours = summarise(time_log_metrics(log, metrics, args.calls), overhead)
        bare = summarise(time_bare_append(metrics, args.calls, t_start), overhead)
        inline = summarise(time_inline_stamp(metrics, args.calls, t_start), overhead)
        block = {what: block_per_record_ns(metrics, args.calls, t_start, what, log)
                 for what in ("ours", "bare", "packb", "inline")}
        rounds.append({"ours": ours, "bare": bare, "inline": inline, "block_ns": block})
    logged = args.warmup + args.rounds * 2 * args.calls
    run.close()
    stored = stored_points(os.environ["SIMVUE_STORE"], "bench-latency")
    return {"timer": timer, "rounds": rounds, "expected_points": logged * VALUES_PER_RECORD, "stored": stored,
            "buffer_full": dict(waits)}


# ---------------------------------------------------------------------------------------------
# phase: one MPI rank (launched by the orchestrator under mpiexec -n 4)
# ---------------------------------------------------------------------------------------------


def phase_mpi_rank(args) -> dict:
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    instrument = None
    if rank == 0:
        instrument = Instrument()
        instrument.install()
    waits = watch_buffer_full()
    from simvue import Run

    metrics = make_metrics(1000, seed=rank)
    run = Run()
    run.init(name="bench-mpi", folder="/bench")
    log = run.log_metrics
    t_start = time.time()
    timer = timer_overhead_ns(args.calls)
    overhead = timer["median_us"] * 1000.0
    first_log = time.perf_counter()
    time_log_metrics(log, metrics, args.warmup)
    rounds = []
    for _ in range(args.rounds):
        ours = summarise(time_log_metrics(log, metrics, args.calls), overhead)
        bare = summarise(time_bare_append(metrics, args.calls, t_start), overhead)
        block_calls = args.block_calls or args.calls
        block = {what: block_per_record_ns(metrics, block_calls, t_start, what, log) for what in ("ours", "bare")}
        rounds.append({"ours": ours, "bare": bare, "block_ns": block})
    logged = args.warmup + args.rounds * (args.calls + (args.block_calls or args.calls))
    out = {"rank": rank, "timer": timer, "rounds": rounds, "logged_records": logged, "buffer_full": dict(waits)}
    run.close()
    if instrument is not None:
        # rank 0's close() returns once its own part is committed; the aggregator finishes
        # when every rank has said BYE.  Wait for that to time the whole pipeline.
        instrument.finished.wait(args.timeout)
        if instrument.finished_at is not None:
            out["pipeline_s"] = instrument.finished_at - first_log
        out["aggregator"] = instrument.report()
    write_json(os.path.join(args.out_dir, f"rank{rank}.json"), out)
    return out


# ---------------------------------------------------------------------------------------------
# phase: ingest rate, local process only
# ---------------------------------------------------------------------------------------------


def phase_ingest_local(args) -> dict:
    if args.gc_off:
        import gc

        gc.disable()
    instrument = Instrument()
    instrument.install(profile=args.profile)
    from simvue import Run

    metrics = make_metrics(1000)
    run = Run()
    run.init(name="bench-ingest-local", folder="/bench")
    log = run.log_metrics
    m = len(metrics)
    n = args.records
    t0 = time.perf_counter()
    for i in range(n):
        log(metrics[i % m])
    t_logged = time.perf_counter()
    run.close()
    t_closed = time.perf_counter()
    stored = stored_points(os.environ["SIMVUE_STORE"], "bench-ingest-local")
    out = {
        "records": n,
        "expected_points": n * VALUES_PER_RECORD,
        "stored": stored,
        "log_s": t_logged - t0,
        "total_s": t_closed - t0,
        "aggregator": instrument.report(),
    }
    if args.profile:
        out["profile"] = profile_text(instrument)
    return out


# ---------------------------------------------------------------------------------------------
# phase: ingest rate, 4 forked workers, the Run passed in
# ---------------------------------------------------------------------------------------------


def _pool_worker(run, n: int, seed: int, result) -> None:
    metrics = make_metrics(1000, seed=seed)
    log = run.log_metrics
    m = len(metrics)
    t0 = time.perf_counter()
    for i in range(n):
        log(metrics[i % m])
    t1 = time.perf_counter()
    run.close()
    t2 = time.perf_counter()
    result.put((seed, t1 - t0, t2 - t1))


def phase_ingest_pool(args) -> dict:
    if args.gc_off:
        import gc

        gc.disable()  # inherited by the forked workers too
    instrument = Instrument()
    instrument.install(profile=args.profile)
    from simvue import Run

    ctx = multiprocessing.get_context("fork")
    run = Run()
    run.init(name="bench-ingest-pool", folder="/bench")
    results = ctx.SimpleQueue()
    n = args.records
    t0 = time.perf_counter()
    workers = [ctx.Process(target=_pool_worker, args=(run, n, k, results)) for k in range(args.workers)]
    for w in workers:
        w.start()
    worker_times = [results.get() for _ in workers]
    for w in workers:
        w.join()
    t_joined = time.perf_counter()
    run.close()
    t_closed = time.perf_counter()
    stored = stored_points(os.environ["SIMVUE_STORE"], "bench-ingest-pool")
    out = {
        "records_per_worker": n,
        "workers": args.workers,
        "expected_points": n * args.workers * VALUES_PER_RECORD,
        "stored": stored,
        "worker_log_s": sorted(t for _, t, _ in worker_times),
        "worker_close_s": sorted(t for _, _, t in worker_times),
        "joined_s": t_joined - t0,
        "total_s": t_closed - t0,
        "exitcodes": [w.exitcode for w in workers],
        "aggregator": instrument.report(),
    }
    if args.profile:
        out["profile"] = profile_text(instrument)
    return out


def profile_text(instrument: Instrument, top: int = 18) -> str:
    import io
    import pstats

    profiler = getattr(instrument, "profiler", None)
    if profiler is None:
        return "(no profile)"
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    text = stream.getvalue()
    return text[text.find("   ncalls"):].rstrip() if "   ncalls" in text else text


# ---------------------------------------------------------------------------------------------
# phase: slowdown of a CPU-bound loop in the aggregating process (pool parent)
# ---------------------------------------------------------------------------------------------


def spin(n: int) -> int:
    """A CPU-bound pure-Python loop (the 'simulation' on rank 0)."""
    x = 0
    for i in range(n):
        x = (x + i * i) % 1_000_003
    return x


def _pin(cores) -> None:
    """Bind every thread of this process to ``cores`` (None: leave it)."""
    if cores:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cores)


def _burn_worker(stop, started, cores=None) -> None:
    _pin(cores)
    started.release()
    while not stop.is_set():
        spin(20_000)


def _stream_worker(run, stop, started, logged, seed: int, rate: float, cores=None) -> None:
    """Log 4-value records until ``stop``: flat out (``rate`` 0) or paced at ``rate`` records/s."""
    _pin(cores)
    metrics = make_metrics(1000, seed=seed)
    log = run.log_metrics
    block = 100
    blocks = [metrics[j:j + block] for j in range(0, len(metrics), block)]
    count = 0
    log(metrics[0])
    count += 1
    started.release()
    pc, sleep = time.perf_counter, time.sleep
    interval = block / rate if rate else 0.0
    next_t = pc()
    j = 0
    while not stop.is_set():
        for record in blocks[j]:
            log(record)
        count += block
        j = (j + 1) % len(blocks)
        if interval:
            next_t += interval
            delay = next_t - pc()
            if delay > 0:
                sleep(delay)
    run.close()
    with logged.get_lock():
        logged.value += count


def phase_slowdown(args) -> dict:
    os.environ["SIMVUE_AGGREGATE_IN"] = args.aggregate_in if args.aggregate_in != "both" else "thread"
    from simvue import Run

    ctx = multiprocessing.get_context("fork")
    run = Run()
    run.init(name="bench-slowdown", folder="/bench")
    others = None
    if args.pin and len(os.sched_getaffinity(0)) >= 2:
        # Rank 0 with a core of its own, as an MPI launcher binds ranks: the parent (every
        # thread of it) on the first core; the workers, burners and the aggregator's process
        # (and its sampler) on the others.
        import psutil

        cores = sorted(os.sched_getaffinity(0))
        others = set(cores[1:])
        for child in psutil.Process().children(recursive=True):
            child.cpu_affinity(sorted(others))
        _pin({cores[0]})
    # Calibrate the loop to about args.spin_s seconds alone.
    n = 200_000
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        spin(n)
        best = min(best, time.perf_counter() - t)
    n = max(100_000, int(n * args.spin_s / best))
    logged = ctx.Value("q", 0)
    configs = []
    for spec in args.slowdown:
        k, _, rate = spec.partition(":")
        configs.append((int(k), float(rate or 0)))

    def measure(mode: str, k: int, rate: float) -> dict:
        stop = ctx.Event()
        started = ctx.Semaphore(0)
        procs = []
        for j in range(k if mode != "alone" else 0):
            if mode == "burn":
                target, pargs = _burn_worker, (stop, started, others)
            else:
                target, pargs = _stream_worker, (run, stop, started, logged, j, rate, others)
            procs.append(ctx.Process(target=target, args=pargs))
        for p in procs:
            p.start()
        for _ in procs:
            started.acquire()
        if procs:
            time.sleep(args.settle_s)  # let the senders and the aggregator reach a steady state
        before = logged.value
        t0 = time.perf_counter()
        spin(n)
        elapsed = time.perf_counter() - t0
        stop.set()
        for p in procs:
            p.join(120)
        t1 = time.perf_counter()
        run.flush(60)  # commit the backlog before the next measurement
        return {"s": elapsed, "drain_s": time.perf_counter() - t0 - elapsed, "join_s": t1 - t0 - elapsed,
                "records": logged.value - before}

    alone: list[float] = []
    results: dict[str, dict] = {}
    for _ in range(args.slowdown_repeats):
        for k, rate in configs:
            key = f"{k}:{rate:g}"
            per = results.setdefault(key, {"k": k, "rate": rate, "alone": [], "burn": [], "stream": [],
                                           "drain_s": [], "records": []})
            # Each streaming measurement is paired with its controls taken just before it, so
            # that the ratios are not skewed by drift in the machine's speed.
            per["alone"].append(measure("alone", 0, 0)["s"])
            alone.append(per["alone"][-1])
            if not rate:  # a paced worker mostly sleeps: its control is 'alone'
                per["burn"].append(measure("burn", k, 0)["s"])
            got = measure("stream", k, rate)
            per["stream"].append(got["s"])
            per["drain_s"].append(got["join_s"])
            per["records"].append(got["records"])
    run.close()
    stored = stored_points(os.environ["SIMVUE_STORE"], "bench-slowdown")
    return {"spin_n": n, "settle_s": args.settle_s, "repeats": args.slowdown_repeats, "alone": alone,
            "configs": results, "streamed_records": logged.value,
            "expected_points": logged.value * VALUES_PER_RECORD, "stored": stored}


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------


def clean_env(store: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMVUE_")}
    env["SIMVUE_STORE"] = store
    env["SIMVUE_RENDEZVOUS_DIR"] = os.path.join(store, "rendezvous")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_phase(phase: str, opts: list[str], timeout: int, script: str = __file__) -> dict:
    """Run ``script --phase phase`` in a fresh interpreter with its own temporary store;
    return the JSON it wrote to ``--result``."""
    store = tempfile.mkdtemp(prefix=f"simvue-bench-{phase}-")
    out = os.path.join(store, "result.json")
    cmd = ["timeout", "-k", "10", str(timeout), sys.executable, str(Path(script).resolve()),
           "--phase", phase, "--result", out, *opts]
    try:
        proc = subprocess.run(cmd, env=clean_env(store), capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"phase {phase} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        with open(out) as fh:
            data = json.load(fh)
        if proc.stderr.strip():
            data["stderr"] = proc.stderr.strip()[-2000:]
        return data
    finally:
        shutil.rmtree(store, ignore_errors=True)


def run_mpi(opts: list[str], timeout: int) -> dict:
    store = tempfile.mkdtemp(prefix="simvue-bench-mpi-")
    out_dir = os.path.join(store, "ranks")
    os.makedirs(out_dir)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        return {"error": "mpiexec not found"}
    cmd = ["timeout", "-k", "10", str(timeout), mpiexec, "-n", str(MPI_RANKS), sys.executable,
           str(Path(__file__).resolve()), "--phase", "mpi-rank", "--out-dir", out_dir, *opts]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=clean_env(store), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ranks = []
        for r in range(MPI_RANKS):
            path = os.path.join(out_dir, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as fh:
                    ranks.append(json.load(fh))
        if proc.returncode != 0 or len(ranks) != MPI_RANKS:
            return {"error": f"mpiexec rc={proc.returncode}, {len(ranks)} rank results\n{proc.stdout}\n{proc.stderr}"}
        stored = stored_points(store, "bench-mpi")
        expected = sum(r["logged_records"] for r in ranks) * VALUES_PER_RECORD
        return {"ranks": ranks, "stored": stored, "expected_points": expected, "mpiexec_wall_s": wall,
                "stderr": proc.stderr.strip()[-2000:]}
    finally:
        shutil.rmtree(store, ignore_errors=True)


def med(values):
    return statistics.median(values) if values else float("nan")


def fmt_us(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def fmt_waits(result: dict) -> str:
    w = result.get("buffer_full") or {}
    if not w.get("calls"):
        return "0"
    return f"{w['calls']} ({w['wall_s']:.2f} s, longest {w['max_s'] * 1000:.0f} ms)"


def span(values) -> str:
    return f"[{min(values):.2f}–{max(values):.2f}]" if len(values) > 1 else ""


def fmt_rate(v: float) -> str:
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.0f} k"


def ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def check(stored: dict, expected: int) -> str:
    points = stored["points"]
    tag = "all stored" if points == expected else f"**{expected - points} missing**"
    return f"{points:,} / {expected:,} ({tag})"


def orchestrate(args) -> int:
    quick = args.quick
    calls = args.calls or (30_000 if quick else 100_000)
    rounds = 2 if quick else 5
    mpi_rounds = 1 if quick else 2
    warmup = 5_000 if quick else 10_000
    local_records = args.records or (50_000 if quick else 200_000)
    pool_records = args.records or (25_000 if quick else 100_000)
    ingest_repeats = 1 if quick else 3
    slow_repeats = 1 if quick else 5
    spin_s = 0.2
    settle_s = 0.1
    slow_configs = ["1:0", "3:25000", "3:2500"] if quick else ["1:0", "3:0", "3:25000", "3:2500"]
    started = time.perf_counter()
    log = print if args.verbose else (lambda *a, **k: None)
    raw: dict = {}

    def progress(msg):
        sys.stderr.write(f"[{time.perf_counter() - started:6.1f}s] {msg}\n")
        sys.stderr.flush()

    want = {args.only} if args.only else {"latency", "ingest", "slowdown"}
    if "latency" in want:
        progress("latency (single process)")
        raw["latency"] = run_phase("latency", ["--calls", str(calls), "--rounds", str(rounds), "--warmup", str(warmup),
                                                 "--settle-between"], 300)
    if "latency" in want and not args.no_mpi:
        progress(f"latency (mpiexec -n {MPI_RANKS})")
        raw["mpi"] = run_mpi(["--calls", str(calls), "--rounds", str(mpi_rounds), "--warmup", str(warmup),
                              "--block-calls", str(calls // 5), "--timeout", "240"], 300)
    if "ingest" in want:
        raw["ingest_local"] = []
        raw["ingest_pool"] = []
    for i in range(ingest_repeats if "ingest" in want else 0):
        progress(f"ingest, local process ({i + 1}/{ingest_repeats})")
        what_if = ["--gc-off"] if args.gc_off else []
        raw["ingest_local"].append(run_phase("ingest-local", ["--records", str(local_records), *what_if], 300))
        progress(f"ingest, {POOL_WORKERS} workers ({i + 1}/{ingest_repeats})")
        raw["ingest_pool"].append(run_phase("ingest-pool", ["--records", str(pool_records), "--workers",
                                                            str(POOL_WORKERS), *what_if], 300))
    if args.profile and "ingest" in want:
        progress("ingest, profiled (local and pool)")
        raw["profile_local"] = run_phase("ingest-local", ["--records", str(local_records), "--profile"], 300)
        raw["profile_pool"] = run_phase("ingest-pool", ["--records", str(pool_records), "--workers",
                                                        str(POOL_WORKERS), "--profile"], 300)
    modes = ["thread", "process"] if args.aggregate_in == "both" else [args.aggregate_in]
    for mode in modes if "slowdown" in want else []:
        progress(f"rank-0 slowdown, aggregator in a {mode}")
        raw[f"slowdown_{mode}"] = run_phase(
            "slowdown", ["--slowdown-repeats", str(slow_repeats), "--spin-s", str(spin_s), "--settle-s", str(settle_s),
                         *(["--pin"] if args.pin else []),
                         "--aggregate-in", mode, "--slowdown", *slow_configs], 300)
    total = time.perf_counter() - started
    progress(f"done in {total:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)
    print(render(raw, args, calls, rounds, mpi_rounds, total))
    log(json.dumps(raw, indent=1))
    return 0


def render(raw: dict, args, calls: int, rounds: int, mpi_rounds: int, total_s: float) -> str:
    lines = []
    add = lines.append
    add(f"# simvue overhead benchmark ({'quick' if args.quick else 'full'})")
    add("")
    add(f"{time.strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, msgpack {'.'.join(map(str, msgpack.version))}, total {total_s:.0f} s.")
    add("")

    if "latency" in raw:
        lat = raw["latency"]
        timer = lat["timer"]
        add(f"Timer overhead (two back-to-back perf_counter_ns): median {timer['median_us'] * 1000:.0f} ns, "
            f"p99 {timer['p99_us'] * 1000:.0f} ns; the median is subtracted from every per-call sample.")
        add("")
        # -- 1 + 2: caller cost and floors
        ours_med = med([r["ours"]["median_us"] for r in lat["rounds"]])
        ours_p99 = med([r["ours"]["p99_us"] for r in lat["rounds"]])
        ours_p999 = med([r["ours"]["p999_us"] for r in lat["rounds"]])
        bare_med = med([r["bare"]["median_us"] for r in lat["rounds"]])
        bare_p99 = med([r["bare"]["p99_us"] for r in lat["rounds"]])
        inl_med = med([r["inline"]["median_us"] for r in lat["rounds"]])
        inl_p99 = med([r["inline"]["p99_us"] for r in lat["rounds"]])
        add(f"## 1. Caller cost of `log_metrics` (4 floats), {calls:,} timed calls per round")
        add("")
        add("Each row: the median over rounds of each round's median / p99 / p99.9 (range of the per-round medians "
            "in brackets).")
        add("")
        add("| what | median µs | p99 µs | p99.9 µs | worst call ms | waits in `buffer_full` | target | verdict |")
        add("|---|---:|---:|---:|---:|---:|---|---|")
        add(f"| (a) single process, {rounds} rounds | {fmt_us(ours_med)} "
            f"{span([r['ours']['median_us'] for r in lat['rounds']])} | {fmt_us(ours_p99)} | "
            f"{fmt_us(ours_p999)} | {max(r['ours']['max_us'] for r in lat['rounds']) / 1000:.1f} | {fmt_waits(lat)} | "
            f"median ≤ {TARGET_MEDIAN_US:g}, p99 ≤ {TARGET_P99_US:g} | "
            f"median {ok(ours_med <= TARGET_MEDIAN_US)}, p99 {ok(ours_p99 <= TARGET_P99_US)} |")
        mpi = raw.get("mpi")
        if mpi and "error" not in mpi:
            worst_med = worst_p99 = 0.0
            for r in sorted(mpi["ranks"], key=lambda x: x["rank"]):
                rmed = med([x["ours"]["median_us"] for x in r["rounds"]])
                rp99 = med([x["ours"]["p99_us"] for x in r["rounds"]])
                rp999 = med([x["ours"]["p999_us"] for x in r["rounds"]])
                worst_med, worst_p99 = max(worst_med, rmed), max(worst_p99, rp99)
                role = "the run's owner" if r["rank"] == 0 else "sender"
                add(f"| (b) n={MPI_RANKS}, rank {r['rank']} ({role}), {len(r['rounds'])} rounds | {fmt_us(rmed)} "
                    f"{span([x['ours']['median_us'] for x in r['rounds']])} | {fmt_us(rp99)} | {fmt_us(rp999)} | "
                    f"{max(x['ours']['max_us'] for x in r['rounds']) / 1000:.1f} | {fmt_waits(r)} | | |")
            add(f"| (b) n={MPI_RANKS}, **max over ranks** | {fmt_us(worst_med)} | {fmt_us(worst_p99)} | | | | "
                f"median ≤ {TARGET_MEDIAN_US:g}, p99 ≤ {TARGET_P99_US:g} | median {ok(worst_med <= TARGET_MEDIAN_US)}, "
                f"p99 {ok(worst_p99 <= TARGET_P99_US)} |")
        elif mpi:
            add(f"| (b) n={MPI_RANKS} | error | | | | | | {mpi['error'][:200]!r} |")
        add("")
        add("## 2. Floors, measured in the same process and run as 1(a)")
        add("")
        add("*Per call*: each call timed on its own (timer median subtracted; a few ns is under the timer's "
            "resolution). *Amortised*: blocks of 1000 records timed at once, `for` loop included, median block / 1000; "
            "for `log_metrics` this also includes what the process's background thread takes from the caller "
            "(GIL share): the aggregator's ingest+commit in the single process and on rank 0, the sender's packing "
            "on ranks 1-3. Ratios: *caller* = per-call median of ours / amortised floor; *all-in* = amortised ours / "
            "amortised floor.")
        add("")
        add("| what | per call median µs | per call p99 µs | amortised ns/record | ours / floor, caller | ours / floor, all-in |")
        add("|---|---:|---:|---:|---:|---:|")
        blk = {k: med([r["block_ns"][k] for r in lat["rounds"]]) for k in ("ours", "bare", "packb", "inline")}
        add(f"| **ours**: `run.log_metrics(d)` | {fmt_us(ours_med)} | {fmt_us(ours_p99)} | {blk['ours']:.0f} | | |")

        def ratios(floor_ns: float, caller_us: float = ours_med, allin_ns: float = blk["ours"]) -> str:
            return f"{caller_us * 1000 / floor_ns:.1f}× | {allin_ns / floor_ns:.1f}×"

        add(f"| floor: bare `deque.append` of the prebuilt record tuple | {fmt_us(bare_med)} | {fmt_us(bare_p99)} | "
            f"{blk['bare']:.0f} | {ratios(blk['bare'])} |")
        add(f"| floor: `deque.append` + `msgpack.packb` of the batch (1000 records) | | | {blk['packb']:.0f} | "
            f"{ratios(blk['packb'])} |")
        add(f"| reference: inlined `time.time()`, `next(step)`, `dict.copy()`, tuple, append (no call, no checks) | "
            f"{fmt_us(inl_med)} | {fmt_us(inl_p99)} | {blk['inline']:.0f} | {ratios(blk['inline'])} |")
        if mpi and "error" not in mpi:
            for r in sorted(mpi["ranks"], key=lambda x: x["rank"]):
                o = med([x["block_ns"]["ours"] for x in r["rounds"]])
                b_ = med([x["block_ns"]["bare"] for x in r["rounds"]])
                om = med([x["ours"]["median_us"] for x in r["rounds"]])
                add(f"| n={MPI_RANKS} rank {r['rank']}: ours, vs. its own bare `deque.append` floor | "
                    f"{fmt_us(om)} | {fmt_us(med([x['ours']['p99_us'] for x in r['rounds']]))} | {o:.0f} (floor {b_:.0f}) | "
                    f"{ratios(b_, om, o)} |")
        add("")
        add(f"Stored by the latency run: {check(lat['stored'], lat['expected_points'])}.")
        if mpi and "error" not in mpi:
            add(f"Stored by the MPI run: {check(mpi['stored'], mpi['expected_points'])}, status {mpi['stored']['status']}"
                f"{'; losses ' + json.dumps(mpi['stored']['metadata_losses']) if mpi['stored']['metadata_losses'] else ''}.")
            r0 = [r for r in mpi["ranks"] if r["rank"] == 0][0]
            if "pipeline_s" in r0:
                add(f"MPI pipeline (rank 0's first log to its aggregator's final commit): {r0['pipeline_s']:.2f} s, "
                    f"{fmt_rate(mpi['stored']['points'] / r0['pipeline_s'])} points/s (4 ranks on {os.cpu_count()} cores).")
        add("")

    if "ingest_local" in raw:
        # -- 3: ingest
        add("## 3. Aggregator ingest rate (points/s = points stored / (first log → `close()` returned))"
            + (" — WHAT-IF: garbage collector disabled in the ingest phases" if args.gc_off else ""))
        add("")
        add("| pipeline | points | stored | wall s | points/s | target | verdict |")
        add("|---|---:|---|---:|---:|---|---|")
        rows = []
        for key, label in (("ingest_local", "(a) local process logs"), ("ingest_pool", f"(b) {POOL_WORKERS} forked workers log, parent closes")):
            reps = raw[key]
            rates = [r["stored"]["points"] / r["total_s"] for r in reps]
            rate = med(rates)
            rep = sorted(reps, key=lambda r: r["stored"]["points"] / r["total_s"])[len(reps) // 2]
            stored_ok = all(r["stored"]["points"] == r["expected_points"] for r in reps)
            stored_txt = ("all, every repeat" if stored_ok
                          else "; ".join(check(r["stored"], r["expected_points"]) for r in reps))
            add(f"| {label}, median of {len(reps)} | {rep['expected_points']:,} | {stored_txt} | {med([r['total_s'] for r in reps]):.2f} | "
                f"{fmt_rate(rate)} | ≥ {fmt_rate(TARGET_INGEST_PPS)} | {ok(rate >= TARGET_INGEST_PPS)} |")
            rows.append((label, reps))
        add("")
        add("Aggregator thread cost, from wrapping its methods (medians over repeats; CPU = thread CPU time):")
        add("")
        add("| pipeline | decode (HMAC + unpack) | merge (`_ingest`) | commit (`RunWriter.write` → SQLite) | aggregator thread CPU, all | capacity if it had a core to itself |")
        add("|---|---:|---:|---:|---:|---:|")
        for label, reps in rows:
            def per_point(key, reps=reps):
                return med([r["aggregator"]["cpu_s"].get(key, 0.0) / r["stored"]["points"] * 1e9 for r in reps])

            loop = med([r["aggregator"]["loop_cpu_s"] / r["stored"]["points"] * 1e9 for r in reps])
            dec, ing, com = per_point("decode"), per_point("ingest"), per_point("commit")
            cap = 1e9 / loop if loop else float("nan")
            add(f"| {label.split(',')[0]} | {dec:.0f} ns/pt | {ing:.0f} ns/pt | {com:.0f} ns/pt | {loop:.0f} ns/pt | "
                f"{fmt_rate(cap)} points/s |")
        pool = raw["ingest_pool"]
        add("")
        add(f"Workers: time to log their records (median over workers and repeats) "
            f"{med([t for r in pool for t in r['worker_log_s']]):.2f} s, then `close()` (drain + BYE ack) "
            f"{med([t for r in pool for t in r['worker_close_s']]):.2f} s; parent start → workers joined "
            f"{med([r['joined_s'] for r in pool]):.2f} s, → parent `close()` returned {med([r['total_s'] for r in pool]):.2f} s.")
        add("")

        if args.profile:
            for key, label in (("profile_local", "local process"), ("profile_pool", f"{POOL_WORKERS} workers")):
                prof = raw.get(key)
                if prof:
                    add("")
                    add(f"### cProfile of the aggregator thread, {label} ({prof['stored']['points']:,} points, "
                        f"{prof['stored']['points'] / prof['total_s'] / 1e6:.2f} M points/s under the profiler)")
                    add("")
                    add("```")
                    add(prof["profile"])
                    add("```")
        add("")
    for mode in ("thread", "process"):
        if f"slowdown_{mode}" not in raw:
            continue
        # -- 4: slowdown
        sd = raw[f"slowdown_{mode}"]
        where = ("a thread of the parent" if mode == "thread" else
                 "a process of its own, started by the parent, which sends its own records like a worker")
        add(f"## 4. Slowdown of a CPU-bound loop in the run's owner (pool parent), aggregator in a {mode}")
        add("")
        add(f"The aggregator runs in {where} (aggregate_in={mode!r}). The parent times a pure-Python loop of {sd['spin_n']:,} iterations: "
            f"alone (other processes absent), beside k processes burning CPU without simvue (the same OS "
            f"contention), and beside k forked workers streaming 4-value records to its aggregator. "
            f"Loop times are medians of {sd['repeats']} repeats; each ratio is the median of per-repeat "
            f"ratios to controls measured just before (the machine's speed drifts).")
        add("")
        add("| other processes | records/s per worker (achieved) | points/s into the aggregator | loop alone s | "
            "loop, k burning CPU s | loop, k streaming s | streaming / alone | streaming / burning | "
            "backlog drained after the loop s |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, per in sd["configs"].items():
            s_ = med(per["stream"])
            b_ = med(per["burn"]) if per["burn"] else None
            r_alone = med([x / y for x, y in zip(per["stream"], per["alone"])])
            r_burn = med([x / y for x, y in zip(per["stream"], per["burn"])]) if per["burn"] else None
            achieved = med([rec / (st + sd["settle_s"]) for rec, st in zip(per["records"], per["stream"])])
            rate = "flat out" if not per["rate"] else f"{per['rate']:,.0f}"
            add(f"| k = {per['k']} | {rate} ({achieved / per['k']:,.0f}) | {achieved * VALUES_PER_RECORD:,.0f} | "
                f"{med(per['alone']):.3f} | {'' if b_ is None else f'{b_:.3f}'} | {s_:.3f} | **{r_alone:.2f}×** | "
                f"{'' if r_burn is None else f'**{r_burn:.2f}×**'} | {med(per['drain_s']):.2f} |")
        add("")
        add(f"For flat-out workers, streaming / burning isolates what receiving the stream costs the parent (the "
            f"aggregator thread's GIL share plus ZeroMQ I/O) from plain CPU contention; paced workers mostly sleep, "
            f"so their reference is 'alone' (a noisy machine's speed drifts: compare the ratios, not the seconds). Points/s is what the workers logged during the loop (the aggregator may "
            f"lag: see the backlog column). Streamed in this phase: {check(sd['stored'], sd['expected_points'])}.")
    for key in ("latency", "slowdown_thread", "slowdown_process"):
        if key in raw and raw[key].get("stderr"):
            add("")
            add(f"stderr of {key}: `{raw[key]['stderr'][:500]}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under ~40 s)")
    parser.add_argument("--profile", action="store_true", help="also cProfile the aggregator thread")
    parser.add_argument("--no-mpi", action="store_true", help="skip the mpiexec -n 4 phase")
    parser.add_argument("--only", choices=["latency", "ingest", "slowdown"],
                        help="run one section only (latency includes the MPI phase)")
    parser.add_argument("--json", help="also write every raw number to this JSON file")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--calls", type=int, default=0, help="timed log_metrics calls per round")
    parser.add_argument("--records", type=int, default=0, help="records per process in the ingest phases")
    # internal: one phase in this process
    parser.add_argument("--phase", choices=["latency", "mpi-rank", "ingest-local", "ingest-pool", "slowdown"])
    parser.add_argument("--result")
    parser.add_argument("--out-dir")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--block-calls", type=int, default=0)
    parser.add_argument("--settle-between", action="store_true")
    parser.add_argument("--gc-off", action="store_true",
                        help="what-if: gc.disable() in the aggregating process of the ingest phases")
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=POOL_WORKERS)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--slowdown-repeats", type=int, default=3)
    parser.add_argument("--aggregate-in", choices=["thread", "process", "both"], default="both",
                        help="where the aggregator runs in the slowdown phase (both: one table each)")
    parser.add_argument("--slowdown", nargs="+", default=["1:0", "3:25000", "3:2500"],
                        help="K:RATE, K streaming workers at RATE records/s each (0: flat out)")
    parser.add_argument("--spin-s", type=float, default=0.5)
    parser.add_argument("--settle-s", type=float, default=0.2)
    parser.add_argument("--pin", action="store_true",
                        help="slowdown phase: the parent on a core of its own, everything else on the others")
    args = parser.parse_args(argv)
    if args.phase is None:
        return orchestrate(args)
    phases = {"latency": phase_latency, "mpi-rank": phase_mpi_rank, "ingest-local": phase_ingest_local,
              "ingest-pool": phase_ingest_pool, "slowdown": phase_slowdown}
    result = phases[args.phase](args)
    if args.result:
        write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
