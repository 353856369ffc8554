"""One node's resource sample: the run's processes on it, the node itself and its GPUs.

A ``NodeSampler`` is told which processes of the run live on its node (``Proc``: the label
the run knows them by, ``rank3`` or ``worker0``, and the pid) and returns, on each
``sample()``, a flat ``{series name: value}`` map whose names are listed in
docs/resources.md.  A process's figures include those of its descendants that are not
sampled processes themselves (a solver a rank started, for example); the descendants are
looked up at most every ``TREE_REFRESH_S``, since that means reading every process on the
node.

CPU and I/O figures are rates over the time since the previous sample.  A process seen for
the first time is measured since it started, so the very first sample of a run already
means something; node-wide rates start with the second sample.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psutil

from .gpu import MB, Gpus
from .procs import PREFIX, Proc, node_name

__all__ = ["MIN_FIRST_ELAPSED_S", "MIN_RATE_SPAN_S", "PREFIX", "TREE_REFRESH_S", "NodeSampler", "Proc", "node_name"]

TREE_REFRESH_S = 10.0
MIN_FIRST_ELAPSED_S = 1.0  # a process first seen younger than this is averaged over this long
# A rate is taken over at least this long where an earlier reading allows: a sample soon after
# the previous one (a process's last, taken as it says goodbye) would otherwise magnify a
# moment's work (its exit) into a figure for the whole interval.
MIN_RATE_SPAN_S = 1.0


@dataclasses.dataclass
class _Last:
    """A process's counters at the previous sample (and at the one before)."""

    created: float
    cpu_s: float
    read_bytes: float
    write_bytes: float
    at: float
    before: _Last | None = None


class NodeSampler:
    """Samples one node.  ``plain_pid`` is the process whose figures (with all its
    descendants, pool workers included) also get the plain Simvue names
    (``resources/cpu.usage.percentage``, ...): the only process of a run that is not an MPI
    job.  ``gpus`` is NVML's view of the node, or None."""

    def __init__(self, host: str, *, plain_pid: int | None = None, gpus: Gpus | None = None) -> None:
        self.host = host
        self.node_prefix = f"{PREFIX}/node/{node_name(host)}/"
        self.plain_pid = plain_pid
        self.gpus = gpus
        self.processes: tuple[Proc, ...] = ()
        self._handles: dict[int, psutil.Process] = {}
        self._last: dict[int, _Last] = {}
        self._children: dict[int, list[int]] = {}
        self._tree_read_at = float("-inf")
        self._node_last: tuple[float, Any, Any, Any] | None = None
        self._node_before: tuple[float, Any, Any, Any] | None = None  # the reading before that
        self._gpu_map: dict[str, list[int]] = {}
        self._readings: dict[int, dict[str, float]] = {}
        self._own_pid = os.getpid()  # the sampler's own process is not the run's

    def set_processes(self, processes: Iterable[Proc]) -> None:
        """Replace the processes sampled (safe to call from another thread)."""
        self.processes = tuple(processes)
        self._tree_read_at = float("-inf")

    # -- one sample ---------------------------------------------------------------------

    def sample(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        values: dict[str, float] = {}
        processes = self.processes
        gpu_by_pid = self.gpus.processes() if self.gpus is not None else {}
        self._readings = {}  # each device is read once per sample
        self._sample_processes(processes, now, gpu_by_pid, values)
        self._sample_node(now, values)
        if self.gpus is not None:
            self._sample_gpus(processes, values)
        return values

    def _device_values(self, device: Any) -> dict[str, float]:
        readings = self._readings.get(device.index)
        if readings is None:
            assert self.gpus is not None  # devices come from self.gpus, so it is set
            readings = self._readings[device.index] = self.gpus.device_values(device)
        return readings

    def gpu_map(self) -> dict[str, list[int]]:
        """``{label: [device index, ...]}``: which process NVML saw on which device at the
        latest sample."""
        return dict(self._gpu_map)

    def _sample_processes(
        self, processes: Sequence[Proc], now: float, gpu_by_pid: dict[int, dict[int, float]], values: dict[str, float]
    ) -> None:
        if not processes:
            return
        if now - self._tree_read_at >= TREE_REFRESH_S:
            self._children = _children_by_parent()
            self._tree_read_at = now
        sampled = {p.pid for p in processes}
        gpu_map: dict[str, list[int]] = {}
        rates: dict[int, Any] = {}
        for proc in processes:
            plain = proc.pid == self.plain_pid
            members = self._tree(proc.pid, stop_at=set() if plain else sampled - {proc.pid})
            figures = self._figures(members, now, rates)
            if figures is None:
                continue
            devices: dict[int, float] = {}
            for pid in members:
                for index, used in gpu_by_pid.get(pid, {}).items():
                    devices[index] = devices.get(index, 0.0) + used
            if devices:
                gpu_map[proc.label] = sorted(devices)
                figures["gpu.memory.usage"] = sum(devices.values())
            if plain:
                prefix = f"{PREFIX}/"
                figures["cpu.usage.memory"] = figures["memory.usage"]  # the name Simvue 2.x clients use
                if self.gpus is not None:
                    for device in self.gpus.devices:
                        if device.index in devices:
                            gpu = self._device_values(device)
                            if "utilisation.percentage" in gpu:
                                figures[f"gpu.utilisation.percent.{device.index}"] = gpu["utilisation.percentage"]
                            if "memory.percentage" in gpu:
                                figures[f"gpu.utilisation.memory.{device.index}"] = gpu["memory.percentage"]
            else:
                prefix = f"{PREFIX}/{proc.label}/"
            for key, value in figures.items():
                values[prefix + key] = value
        self._gpu_map = gpu_map
        for pid in list(self._last):
            if pid not in rates:
                del self._last[pid]
                self._handles.pop(pid, None)

    def _tree(self, pid: int, stop_at: set[int]) -> list[int]:
        members, todo = [pid], [pid]
        while todo:
            for child in self._children.get(todo.pop(), ()):
                if child not in stop_at and child != self._own_pid and child not in members:
                    members.append(child)
                    todo.append(child)
        return members

    def _figures(self, pids: list[int], now: float, rates: dict[int, Any]) -> dict[str, float] | None:
        """CPU %, RSS (MB), threads and I/O rates (MB/s) summed over ``pids``; None when the
        first of them (the sampled process itself) is gone.  ``rates`` caches each pid's
        figures for this tick (a pool worker is in its own figures and in its parent's)."""
        cpu = rss = threads = read = write = 0.0
        has_io = False
        for position, pid in enumerate(pids):
            if pid not in rates:
                rates[pid] = self._rates(pid, now)
            figures = rates[pid]
            if figures is None:
                if position == 0:
                    return None
                continue
            cpu += figures[0]
            rss += figures[1]
            threads += figures[2]
            if figures[3] is not None:
                has_io = True
                read += figures[3]
                write += figures[4]
        result = {"cpu.usage.percentage": cpu, "memory.usage": rss / MB, "threads": threads}
        if has_io:
            result["io.read"] = read / MB
            result["io.write"] = write / MB
        return result

    def _rates(self, pid: int, now: float) -> tuple[float, float, int, float | None, float | None] | None:
        """One process's CPU %, RSS bytes, threads and I/O bytes/s since the previous sample
        (since it started, the first time; at least ``MIN_FIRST_ELAPSED_S``)."""
        counters = self._read(pid)
        if counters is None:
            self._last.pop(pid, None)
            return None
        created, cpu_s, rss_bytes, n_threads, io = counters
        last = self._last.get(pid)
        if last is None or last.created != created:  # first seen: since it started
            last = _Last(created, 0.0, 0.0, 0.0, min(created, now - MIN_FIRST_ELAPSED_S))
            kept = None
        else:
            kept = dataclasses.replace(last, before=None)
            if now - last.at < MIN_RATE_SPAN_S and last.before is not None:
                last = last.before
        read_bytes, write_bytes = io if io is not None else (last.read_bytes, last.write_bytes)
        self._last[pid] = _Last(created, cpu_s, read_bytes, write_bytes, now, before=kept)
        elapsed = max(now - last.at, 1e-3)
        cpu = max(0.0, 100.0 * (cpu_s - last.cpu_s) / elapsed)
        if io is None:
            return cpu, rss_bytes, n_threads, None, None
        return (
            cpu, rss_bytes, n_threads,
            max(0.0, (read_bytes - last.read_bytes) / elapsed), max(0.0, (write_bytes - last.write_bytes) / elapsed),
        )

    def _read(self, pid: int) -> tuple[float, float, int, int, tuple[int, int] | None] | None:
        handle = self._handles.get(pid)
        try:
            if handle is None:
                handle = self._handles[pid] = psutil.Process(pid)
            with handle.oneshot():
                times = handle.cpu_times()
                counters = (handle.create_time(), times.user + times.system, handle.memory_info().rss, handle.num_threads())
                try:
                    io = handle.io_counters()
                    io_bytes: tuple[int, int] | None = (io.read_bytes, io.write_bytes)
                except (psutil.AccessDenied, AttributeError, NotImplementedError, OSError):
                    io_bytes = None
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            self._handles.pop(pid, None)
            return None
        return (*counters, io_bytes)

    def _sample_node(self, now: float, values: dict[str, float]) -> None:
        prefix = self.node_prefix
        memory = psutil.virtual_memory()
        values[prefix + "memory.usage"] = (memory.total - memory.available) / MB
        values[prefix + "memory.available"] = memory.available / MB
        try:
            values[prefix + "swap.usage"] = psutil.swap_memory().used / MB
        except (OSError, RuntimeError):
            pass
        try:
            values[prefix + "load.average"] = os.getloadavg()[0]
        except (OSError, AttributeError):
            pass
        cpu = psutil.cpu_times()
        network = _network_bytes()
        disk = _disk_bytes()
        last = self._node_last
        self._node_last = (now, cpu, network, disk)
        if last is not None and now - last[0] < MIN_RATE_SPAN_S and self._node_before is not None:
            last, self._node_before = self._node_before, last
        else:
            self._node_before = last
        if last is None:
            return  # rates need a previous sample
        elapsed = max(now - last[0], 1e-3)
        busy, total = _busy(cpu)
        last_busy, last_total = _busy(last[1])
        if total > last_total:
            values[prefix + "cpu.usage.percentage"] = min(100.0, max(0.0, 100.0 * (busy - last_busy) / (total - last_total)))
        if network is not None and last[2] is not None:
            values[prefix + "network.received"] = max(0, network[0] - last[2][0]) / MB / elapsed
            values[prefix + "network.sent"] = max(0, network[1] - last[2][1]) / MB / elapsed
        if disk is not None and last[3] is not None:
            values[prefix + "disk.read"] = max(0, disk[0] - last[3][0]) / MB / elapsed
            values[prefix + "disk.write"] = max(0, disk[1] - last[3][1]) / MB / elapsed

    def _sample_gpus(self, processes: Sequence[Proc], values: dict[str, float]) -> None:
        assert self.gpus is not None
        on_devices = {index for devices in self._gpu_map.values() for index in devices}
        visible = [p.cuda for p in processes] or [os.environ.get("CUDA_VISIBLE_DEVICES")]
        for device in self.gpus.selected(visible, on_devices):
            for key, value in self._device_values(device).items():
                values[f"{self.node_prefix}gpu{device.index}.{key}"] = value

    def close(self) -> None:
        if self.gpus is not None:
            self.gpus.close()
            self.gpus = None


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for process in psutil.process_iter(["ppid"]):
        ppid = process.info.get("ppid")
        if ppid:
            children.setdefault(ppid, []).append(process.pid)
    return children


def _busy(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds of the node (guest time is already in user time)."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0), total


def _network_bytes() -> tuple[int, int] | None:
    """Bytes received and sent by every interface but loopback (the run's own traffic
    between its processes on one node goes over loopback)."""
    try:
        counters = psutil.net_io_counters(pernic=True)
    except (OSError, RuntimeError):
        return None
    received = sent = 0
    for nic, c in counters.items():
        if nic == "lo" or nic.startswith("lo"):
            continue
        received += c.bytes_recv
        sent += c.bytes_sent
    return received, sent


def _disk_bytes() -> tuple[int, int] | None:
    try:
        counters = psutil.disk_io_counters()
    except (OSError, RuntimeError):
        return None
    return None if counters is None else (counters.read_bytes, counters.write_bytes)
