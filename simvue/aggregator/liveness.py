"""Seeing at once that a process on the aggregator's node has ended.

A sender elsewhere is lost only after ``sender_timeout_s`` of silence.  A sender whose pid
the aggregator can see needs no such wait: a rank that calls ``os._exit`` or dies of a
signal is seen within ``PROBE_INTERVAL_S``, by its pid and its start time (so a pid reused by
a new process is not mistaken for it); a zombie counts as ended.

Which pids the aggregator can see is not a matter of host names (two nodes may share one,
containers may hide each other's processes): every HELLO carries ``pid_namespace()``, the
machine's boot id and the process's pid namespace, and only senders with the aggregator's
own are checked.  Elsewhere than Linux there is no such id, and every sender keeps the
heartbeat timeout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .senders import SenderState

PROBE_INTERVAL_S = 0.5
_CREATED_TOLERANCE_S = 0.05
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def ended(senders: Iterable[SenderState]) -> list[SenderState]:
    """Those of ``senders`` (each with a pid and a start time) whose process has ended."""
    out = []
    for state in senders:
        assert state.pid is not None and state.created is not None
        if not process_running(state.pid, state.created):
            out.append(state)
    return out


def process_running(pid: int, created: float) -> bool:
    """Whether the process ``pid`` that started at ``created`` (epoch s) is still running."""
    import psutil  # only an aggregator with senders on its node gets here

    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if abs(process.create_time() - created) > _CREATED_TOLERANCE_S:
                return False  # the pid belongs to another process now
            return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def own_start_time() -> float | None:
    """This process's start time as ``process_running`` reads it, for its HELLO.

    On Linux it is read as psutil reads it (the start in clock ticks after boot, from
    ``/proc/self/stat``, plus the boot time from ``/proc/stat``), without importing psutil
    on every run's ``init``; elsewhere psutil reads it."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            ticks = int(stat.read().rpartition(b")")[2].split()[19])  # field 22, starttime
        with open("/proc/stat", "rb") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith(b"btime"))
        return ticks / os.sysconf("SC_CLK_TCK") + boot
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    import psutil

    try:
        return psutil.Process().create_time()
    except (psutil.Error, OSError):
        return None


def pid_namespace() -> str | None:
    """An id shared by exactly the processes that see the same pids: the boot id of the
    machine and the inode of the pid namespace (Linux); None where there is none."""
    try:
        with open(_BOOT_ID) as boot:
            return f"{boot.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None
