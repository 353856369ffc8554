"""How fast the dashboard answers for a big run: server time and bytes per view, and the
browser's time to drawn charts.

    python bench/dashboard.py [--ranks 64] [--steps 100000] [--repeat 5] [--no-browser] [--screenshots DIR]

Writes an ``mpiexec``-shaped run straight into a fresh store (``--ranks`` ranks, each with two
metrics of ``--steps`` steps, committed in chunks of 1000 points as the aggregator would, plus
per-rank and per-node resource samples every second for the run's hour), serves it with
``simvue ui``, and times what the run page asks for: the overview, the metrics tab (a band with
the outlying ranks per metric, and the markers), a heat map, and a zoom.  Then, unless
``--no-browser``, headless Chromium (``/usr/bin/chromium``, Playwright) opens the page and the
time to every chart drawn is measured.  Medians of ``--repeat`` runs; targets: under 0.3 s of
server time per view, under 1 s to drawn charts.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np
import requests

from simvue.store import SeriesChunk, Store, StoreBatch

CHUNK = 1000
SAMPLES = 3600  # resource samples: one a second for an hour


T0 = time.time()  # when the benchmark's run "started"


def _chunk(steps: np.ndarray, times: np.ndarray, values: np.ndarray) -> SeriesChunk:
    chunk = SeriesChunk()
    chunk.steps = array("q", steps.astype(np.int64).tobytes())
    chunk.times = array("d", times.astype(np.float64).tobytes())
    chunk.timestamps = array("d", (times + T0).astype(np.float64).tobytes())
    chunk.values = array("d", values.astype(np.float64).tobytes())
    return chunk


def write_run(directory: Path, ranks: int, steps: int) -> tuple[str, int]:
    """The benchmark's run, written into a store at ``directory``; its id and point count."""
    rng = np.random.default_rng(7)
    store = Store(directory)
    run_id = store.create_run(name=f"bench-{ranks}x{steps}", folder="/bench", description=None, metadata={},
                              tags=["bench"], status="running", system={}, heartbeat_timeout_s=None)
    seconds = np.linspace(0.0, 3600.0, steps)
    step_axis = np.arange(steps)
    points = 0
    hosts = [f"node{n:02d}" for n in range(max(1, ranks // 16))]
    for rank in range(ranks):
        loss = np.exp(-step_axis / (steps / 3)) + 0.01 * rank + 0.002 * rng.standard_normal(steps)
        if rank == min(17, ranks - 1):
            loss[rng.integers(0, steps, 5)] += 5.0  # a few one-step spikes
        residual = 1e-3 * (1 + 0.5 * np.sin(step_axis / 500 + rank)) * (3.0 if rank == 42 else 1.0)
        for start in range(0, steps, CHUNK * 50):
            batch = StoreBatch()
            for name, values in ((f"rank{rank}/loss", loss), (f"rank{rank}/residual", residual)):
                for lo in range(start, min(steps, start + CHUNK * 50), CHUNK):
                    hi = min(steps, lo + CHUNK)
                    chunk = _chunk(step_axis[lo:hi], seconds[lo:hi], values[lo:hi])
                    batch.metrics.setdefault(name, SeriesChunk()).extend(chunk)
            store.write(run_id, batch)
            points += batch.point_count
        t = np.arange(SAMPLES, dtype=np.float64)
        batch = StoreBatch()
        cpu = 95 + 5 * rng.standard_normal(SAMPLES) - (60 if rank == 5 else 0)
        memory = 800 + 0.05 * t * (4 if rank == 33 else 1)
        for name, values in (("cpu.usage.percentage", cpu), ("memory.usage", memory)):
            batch.metrics[f"resources/rank{rank}/{name}"] = _chunk(t, t, values)
        store.write(run_id, batch)
        points += batch.point_count
    t = np.arange(SAMPLES, dtype=np.float64)
    batch = StoreBatch()
    for host in hosts:
        for name, values in (("cpu.usage.percentage", 90 + rng.standard_normal(SAMPLES)), ("memory.usage", 20000 + t)):
            batch.metrics[f"resources/node/{host}/{name}"] = _chunk(t, t, values)
    batch.metadata = {"simvue": {"processes": {f"rank{r}": {"pid": 1000 + r, "host": hosts[r * len(hosts) // ranks],
                                                            "role": "rank", "state": "done"} for r in range(ranks)}}}
    batch.events = [(T0 + 1800.0, f"[rank{min(17, ranks - 1)}] checkpoint slow", "warning")]
    batch.status, batch.ended = "completed", time.time()
    store.write(run_id, batch)
    points += batch.point_count
    store.close()
    return run_id, points


def timed(session: requests.Session, url: str, params: dict, repeat: int) -> tuple[float, int]:
    """Median seconds and bytes of ``repeat`` GETs."""
    seconds, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        answer = session.get(url, params=params, timeout=120)
        seconds.append(time.perf_counter() - start)
        answer.raise_for_status()
        size = len(answer.content)
    return statistics.median(seconds), size


def browser_times(url: str, repeat: int, screenshots: Path | None = None) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    found: dict[str, list[float]] = {"metrics tab: every chart drawn": [], "ranks tab: heat map drawn": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        for _ in range(repeat):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_function("() => document.querySelectorAll('.chart[data-lines]').length >= 2", timeout=60_000)
            found["metrics tab: every chart drawn"].append(time.perf_counter() - start)
            start = time.perf_counter()
            page.click('.tabs a[data-tab="ranks"]')
            page.wait_for_selector("#heat-labels div", timeout=60_000)
            found["ranks tab: heat map drawn"].append(time.perf_counter() - start)
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshots / "ranks-64.png"), full_page=True)
                page.click('.tabs a[data-tab="metrics"]')
                page.wait_for_function("() => document.querySelectorAll('.chart[data-lines]').length >= 2")
                page.screenshot(path=str(screenshots / "metrics-64.png"), full_page=True)
                screenshots = None
            page.close()
        browser.close()
    return {key: statistics.median(values) for key, values in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--screenshots", type=Path, help="save the run page's metrics and ranks tabs here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        started = time.perf_counter()
        run_id, points = write_run(store_dir, args.ranks, args.steps)
        print(f"wrote {points:,} points in {time.perf_counter() - started:.1f} s")
        ui = subprocess.Popen([sys.executable, "-m", "simvue.cli", "ui", "--store", str(store_dir), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = [ui.stdout.readline() for _ in range(2)][1].strip()
            base, token = url.split("/dashboard")[0], url.split("token=")[1]
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {token}"
            api = f"{base}/api/dashboard/runs/{run_id}"
            width = 560
            spiky = min(17, args.ranks - 1)
            views = [
                ("overview", api, {}),
                ("metrics tab: loss band + outliers", f"{api}/band", {"metric": "loss", "width": width // 2}),
                ("metrics tab: residual band + outliers", f"{api}/band", {"metric": "residual", "width": width // 2}),
                ("metrics tab: markers", f"{api}/markers", {"x": "step"}),
                ("heat map: loss, 1000 columns", f"{api}/heatmap", {"metric": "loss", "width": 1000}),
                ("heat map: cpu, 1000 columns", f"{api}/heatmap", {"metric": "cpu.usage.percentage", "kind": "resource", "width": 1000}),
                ("one rank's line", f"{api}/lines", {"name": f"rank{spiky}/loss", "width": width}),
                ("zoom: one rank, 1% of steps", f"{api}/lines",
                 {"name": f"rank{spiky}/loss", "width": width, "lo": args.steps * 0.40, "hi": args.steps * 0.41}),
                ("zoom: band, 1% of steps", f"{api}/band",
                 {"metric": "loss", "width": width // 2, "lo": args.steps * 0.40, "hi": args.steps * 0.41}),
            ]
            timed(session, api, {}, 1)  # warm up: the first request opens the database
            rows = [(label, *timed(session, url_, params, args.repeat)) for label, url_, params in views]
            print(f"\n{args.ranks} ranks x {args.steps:,} steps x 2 metrics + resources; median of {args.repeat}")
            print(f"{'view':45} {'server s':>9} {'bytes':>10}")
            for label, seconds, size in rows:
                print(f"{label:45} {seconds:9.3f} {size:10,}")
            first_view = sum(seconds for label, seconds, _ in rows[:4])
            print(f"{'run page, metrics tab (the four above)':45} {first_view:9.3f} "
                  f"{sum(size for _, _, size in rows[:4]):10,}")
            if not args.no_browser:
                print(f"\n{'browser (Chromium, headless)':45} {'seconds':>9}")
                for label, seconds in browser_times(f"{base}/dashboard/runs/run/{run_id}?token={token}", args.repeat,
                                                      args.screenshots).items():
                    print(f"{label:45} {seconds:9.3f}")
        finally:
            ui.terminate()
            ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
