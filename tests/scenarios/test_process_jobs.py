"""``Run.add_process`` and ``Run.set_pid`` in whole jobs: pool workers that start processes,
an abort that stops them, and resource figures that follow the process ``set_pid`` names."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from simvue.store import Store

from conftest import read_run, run_script

PY = sys.executable


def _artifacts(store_dir: Path, name: str) -> dict[str, bytes]:
    store = Store(store_dir)
    try:
        run_id = store.run(name)["id"]
        return {a["name"]: store.artifact_bytes(run_id, a["name"]) for a in store.artifacts(run_id)}
    finally:
        store.close()


POOL_SCRIPT = """
import multiprocessing, os, sys, threading
import simvue

def task(args):
    run, n = args
    done = threading.Event()
    run.add_process(f"job{n}", sys.executable, "-c", f"print('job {n} in', {os.getpid()!r} if False else '')",
                    completion_trigger=done)
    assert done.wait(30)
    run.flush()
    return n

if __name__ == "__main__":
    method = sys.argv[1]
    with simvue.Run() as run:
        run.init(name=f"pool-processes-{method}")
        with multiprocessing.get_context(method).Pool(2) as pool:
            print(sorted(pool.map(task, [(run, n) for n in range(4)])))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_start_processes_and_their_output_reaches_the_run(store_dir, tmp_path, method):
    script = tmp_path / "pool_processes.py"
    script.write_text(POOL_SCRIPT)
    result = run_script(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", method,
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[0, 1, 2, 3]" in result.stdout
    exported = read_run(store_dir, f"pool-processes-{method}")
    assert exported["status"] == "completed"
    outputs = {name: data for name, data in _artifacts(store_dir, f"pool-processes-{method}").items()
               if name.endswith(".out")}
    # each worker's artifact carries its prefix; the files on disk carry its label
    assert sorted(name.split("/", 1)[1] for name in outputs) == [f"pool-processes-{method}_job{n}.out" for n in range(4)]
    assert all(name.startswith("worker") for name in outputs)
    assert sorted(outputs.values()) == [f"job {n} in \n".encode() for n in range(4)]
    commands = [key for key in exported["metadata"] if key.endswith("_command")]
    assert len(commands) == 4 and all(key.startswith("pid") for key in commands)
    assert len(list(tmp_path.glob(f"pool-processes-{method}_pid*_job*.out"))) == 4


ABORT_SCRIPT = """
import os, sys, time
import simvue
with simvue.Run() as run:
    run.init(name="abort-processes")
    run.create_user_alert("stop", trigger_abort=True)
    run.add_process("sleeper", sys.executable, "-c",
                    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)")
    while not run.executor.std_out("sleeper"):
        time.sleep(0.05)
    print(run.executor.children["sleeper"].popen.pid, flush=True)
    run.log_alert("stop", "critical")
    for _ in range(600):  # the abort interrupts the main thread between two sleeps
        time.sleep(0.1)
"""


def test_an_abort_stops_the_runs_processes_and_the_program_ends(store_dir, tmp_path):
    started = time.monotonic()
    result = run_script(ABORT_SCRIPT, cwd=tmp_path, timeout=120)
    assert time.monotonic() - started < 40, "the abort did not end the program"
    assert "stopped: an abort was requested" in result.stderr
    child = int(result.stdout.split()[-1])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    exported = read_run(store_dir, "abort-processes")
    assert exported["status"] == "terminated"
    assert _artifacts(store_dir, "abort-processes")["abort-processes_sleeper.out"] == b"up\n"


SET_PID_SCRIPT = """
import subprocess, sys, time
import simvue
# A busy process that is not a descendant of this one: its parent shell exits at once.
line = subprocess.run(["sh", "-c", sys.executable + " -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                      capture_output=True, text=True).stdout
busy = int(line)
try:
    with simvue.Run() as run:
        run.config(resources_metrics_interval=0.5)
        run.init(name="set-pid-sampling")
        time.sleep(2.5)
        run.set_pid(busy)
        time.sleep(4)
finally:
    subprocess.run(["kill", str(busy)])
print(busy)
"""


def test_set_pid_makes_the_resource_figures_follow_that_process(store_dir, tmp_path):
    result = run_script(SET_PID_SCRIPT, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    busy = int(result.stdout.split()[-1])
    exported = read_run(store_dir, "set-pid-sampling")
    assert exported["metadata"]["simvue"]["processes"]["main"]["sampled_pid"] == busy
    cpu = exported["metrics"]["resources/cpu.usage.percentage"]  # [step, seconds since the start, value]
    # set_pid comes 2.5 s in; the first sample measures the script's start-up
    before = [value for _, t, value in cpu if 0.5 < t < 2.3]
    after = [value for _, t, value in cpu if t > 3.6]
    assert before and after, cpu
    assert max(before) < 50 < max(after), (before, after)  # an idle script, then a busy loop
