"""Telling whether a sender's process has ended, with real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from simvue.aggregator.liveness import own_start_time, pid_namespace, process_running


def test_a_running_process_is_running_and_an_ended_one_is_not_even_as_a_zombie():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        created = psutil.Process(child.pid).create_time()
        assert process_running(child.pid, created)
        child.kill()
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not process_running(child.pid, created)  # not yet reaped: a zombie
    finally:
        child.kill()
        child.wait()
    assert not process_running(child.pid, created)  # reaped: gone


def test_a_pid_that_now_belongs_to_another_process_is_not_mistaken_for_it():
    me = os.getpid()
    assert process_running(me, own_start_time())
    assert not process_running(me, own_start_time() - 1.0)


def test_processes_of_one_machine_and_pid_namespace_share_its_id():
    here = pid_namespace()
    assert here is not None and here.count("/") == 1
    there = subprocess.run(
        [sys.executable, "-c", "from simvue.aggregator.liveness import pid_namespace; print(pid_namespace())"],
        capture_output=True, text=True, timeout=60,
    )
    assert there.stdout.strip() == here
