"""Start-up benchmark: what a short offline run costs as a whole process.

    python bench/startup.py                   # 20 rounds, about 15 s on a 2-core VM
    python bench/startup.py --runs 50 --json raw.json
    python bench/startup.py --root OLD --root .   # two versions, measured in the same rounds
    python bench/startup.py --aggregate-in thread --aggregate-in process   # the two layouts

Each round starts fresh interpreters, one after the other, and times each from ``Popen`` to
its exit (wall clock); with two ``--root`` checkouts, both are measured in every round:

1. ``python -c pass``: the floor, the interpreter alone;
2. ``python -c "import simvue"``;
3. the script below, offline (no server: ``SIMVUE_MODE=offline``, no ``SIMVUE_*`` variable
   of the caller's, a fresh temporary store and working directory each time), which also
   times ``from simvue import Run``, ``init`` and ``close`` inside itself::

       from simvue import Run
       run = Run()
       run.init(name=...)
       run.log_metrics({"loss": 0.5})
       run.close()

The settings are the defaults (resource sampling every 30 s included).  Byte code is
compiled once, before the timed rounds, into a temporary ``PYTHONPYCACHEPREFIX``, as an
installed package has it; nothing is written into the source tree.  After the rounds, every
run's point and status are read back from its store.  Prints a markdown table: median and
p90 of each figure, the whole processes' ratio to the floor, and the targets (whole process ≤ 0.2 s, ``init``
≤ 50 ms, ``close`` ≤ 20 ms).  No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import time
t0 = time.perf_counter()
from simvue import Run
t1 = time.perf_counter()
run = Run()
run.init(name=RUN_NAME)
t2 = time.perf_counter()
run.log_metrics({"loss": 0.5})
t3 = time.perf_counter()
closed = run.close()
t4 = time.perf_counter()
print({"import": t1 - t0, "init": t2 - t1, "log": t3 - t2, "close": t4 - t3, "closed": closed})
"""

TARGETS = {"script": 0.2, "init": 0.05, "close": 0.02}


def child_env(root: Path, pycache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIMVUE_", "SIMTRACK_", "PYTHON"))}
    env["PYTHONPATH"] = str(root)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["SIMVUE_MODE"] = "offline"
    return env


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command!r} failed ({result.returncode}):\n{result.stderr}")
    return wall, result.stdout


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds >= 0.001 else f"{seconds * 1000:.3f}"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--root", type=Path, action="append",
                        help="a checkout whose simvue/ is measured (default this one); give it twice to compare"
                             " two versions, measured in the same rounds")
    parser.add_argument("--json", type=Path, help="also write every raw number here")
    parser.add_argument("--aggregate-in", action="append", choices=["auto", "thread", "process"],
                        help="where the run's aggregator runs (aggregate_in); give it twice to compare two layouts")
    args = parser.parse_args()
    # Each "version" measured: a checkout and, optionally, an aggregate_in setting.
    variants = [(root.resolve(), mode) for root in (args.root or [ROOT]) for mode in (args.aggregate_in or [None])]
    roots = list(range(len(variants)))
    python = sys.executable

    keys = ("import", "script", "in_import", "init", "log", "close")
    floor_times: list[float] = []
    times: dict[int, dict[str, list[float]]] = {root: {k: [] for k in keys} for root in roots}
    with tempfile.TemporaryDirectory(prefix="simvue-bench-startup-") as tmp:
        tmp_path = Path(tmp)
        names: list[tuple[int, Path, str]] = []
        for round_ in range(args.warmup + args.runs):
            timed_round = round_ >= args.warmup
            plain_env = child_env(variants[0][0], tmp_path / "pycache0")
            wall = timed([python, "-c", "pass"], plain_env, tmp_path)[0]
            if timed_round:
                floor_times.append(wall)
            for index, root in enumerate(roots):
                path, mode = variants[index]
                env = child_env(path, tmp_path / f"pycache{index}")
                if mode is not None:
                    env["SIMVUE_AGGREGATE_IN"] = mode
                workdir = tmp_path / f"round{round_}-{index}"
                workdir.mkdir()
                name = f"startup-{round_}"
                script_env = {**env, "SIMVUE_STORE": str(workdir / ".simvue")}
                import_wall = timed([python, "-c", "import simvue"], env, workdir)[0]
                script_wall, out = timed([python, "-c", f"RUN_NAME = {name!r}\n" + SCRIPT], script_env, workdir)
                inside = eval(out.strip().splitlines()[-1])  # a dict literal the script printed
                if inside["closed"] is not True:
                    raise SystemExit(f"round {round_}: close() returned {inside['closed']!r}")
                names.append((root, workdir / ".simvue", name))
                if not timed_round:
                    continue
                series = times[root]
                series["import"].append(import_wall)
                series["script"].append(script_wall)
                series["in_import"].append(inside["import"])
                for key in ("init", "log", "close"):
                    series[key].append(inside[key])
        stored = {root: check_stored(variants[root][0], [(p, n) for r, p, n in names if r == root]) for root in roots}

    rows = [
        ('`python -c "import simvue"`', "import", None),
        ("**the script, whole process**", "script", TARGETS["script"]),
        ("… `from simvue import Run`, inside", "in_import", None),
        ("… `Run().init(name=...)`, inside", "init", TARGETS["init"]),
        ("… `log_metrics`, inside", "log", None),
        ("… `close()`, inside", "close", TARGETS["close"]),
    ]
    floor = statistics.median(floor_times)
    print(f"## Start-up, {args.runs} rounds ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print(f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; milliseconds, median [p90]\n")
    for index, (path, mode) in enumerate(variants):
        print(f"* version {index + 1}: {path}" + (f", aggregate_in={mode}" if mode else ""))
    versions = " | ".join(f"version {i + 1}" for i in range(len(roots)))
    print(f"\n| what | {versions} | target |")
    print("|---|" + "---:|" * len(roots) + "---:|")
    print(f"| `python -c pass` (the floor) | {milliseconds(floor)} [{milliseconds(quantile(floor_times, 0.9))}]"
          + " |" * (len(roots) - 1) + " | |")
    for label, key, target in rows:
        cells = []
        for root in roots:
            values = times[root][key]
            median = statistics.median(values)
            cell = f"{milliseconds(median)} [{milliseconds(quantile(values, 0.9))}]"
            if key in ("import", "script"):
                cell += f", {median / floor:.1f}× the floor"
            if target is not None:
                cell += "" if median <= target else " **missed**"
            cells.append(cell)
        target_text = "" if target is None else f"≤ {target * 1000:.0f}"
        print(f"| {label} | {' | '.join(cells)} | {target_text} |")
    for root in roots:
        print(f"\nStored (version {root + 1}): {stored[root]} of {len(names) // len(roots)} runs read back completed with their point.")
    if args.json:
        raw = {"runs": args.runs, "floor_s": floor_times,
               "times_s": {f"{variants[root][0]}:{variants[root][1]}": times[root] for root in roots}}
        args.json.write_text(json.dumps(raw, indent=1))
    return 0 if all(stored[root] == len(names) // len(roots) for root in roots) else 1


def check_stored(root: Path, names: list[tuple[Path, str]]) -> int:
    """How many of the runs are in their stores, completed, with the one point logged."""
    code = (
        "import json, sys\n"
        "from simvue.store import Store\n"
        "ok = 0\n"
        "for path, name in json.loads(sys.argv[1]):\n"
        "    store = Store(path)\n"
        "    try:\n"
        "        run = store.run(name)\n"
        "        values = store.metric_series(run['id'], 'loss')['values'].tolist()\n"
        "        ok += run['status'] == 'completed' and values == [0.5]\n"
        "    finally:\n"
        "        store.close()\n"
        "print(ok)\n"
    )
    argument = json.dumps([[str(path), name] for path, name in names])
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code, argument], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"reading the stores back failed:\n{result.stderr}")
    return int(result.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
