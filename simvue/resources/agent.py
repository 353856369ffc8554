"""The sampler process: ``python -m simvue.resources.agent HOST INTERVAL_S STARTED PLAIN_PID``.

A node's sampler runs in a small process of its own, started by the process that samples
the node (see ``simvue.resources``).  Inside a thread of a busy rank every one of the
sampler's many small ``/proc`` reads would wait for the rank's GIL (about 5 ms each: seconds
per sample); here the sampling never touches the rank's interpreter at all.

stdin: msgpack maps from the parent, ``{"processes": [[label, pid, cuda], ...]}`` (with
``"plain_pid": pid`` when the process with the plain names changes, ``Run.set_pid``) or
``{"stop": true}``.  stdout: msgpack records (METADATA once with the node's facts, then one
RESOURCES per sample, and METADATA when the processes on the GPUs change), which the parent
forwards into the run.  The first sample is taken at once, the last one on ``stop``, on
end of input, or never if the parent has died (then it just exits).

Whatever the interval, every process of the run gets a sample when it joins and one when it
leaves: a process that joins gets an extra sample ``JOIN_SAMPLE_DELAY_S`` later (joins that
close together share it), and one that leaves is sampled once more, at once, before it is
dropped.  So a rank of a run shorter than the interval still has its series.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any

import msgpack

from ..transport.protocol import MetadataRecord, RecordKind, ResourcesRecord
from .facts import host_facts
from .gpu import Gpus
from .sampler import NodeSampler, Proc, node_name

MAX_FAILURES = 3
PARENT_CHECK_S = 1.0
JOIN_SAMPLE_DELAY_S = 0.2
GPU_MODULE_ENV = "SIMVUE_NVML_MODULE"  # another module with pynvml's API (the tests use a fake)


class Agent:
    def __init__(self, host: str, interval_s: float, started: float, plain_pid: int | None, mpi_library: str | None) -> None:
        self.host = host
        self.interval_s = interval_s
        self.started = started
        self.mpi_library = mpi_library
        self.parent = os.getppid()
        self.sampler = NodeSampler(host, plain_pid=plain_pid, gpus=Gpus.open(os.environ.get(GPU_MODULE_ENV) or "pynvml"))
        self.stopping = False
        self._unpacker = msgpack.Unpacker(use_list=True, strict_map_key=False)
        self._gpu_map: dict[str, list[int]] = {}
        self._extra_at = float("inf")  # an extra sample for processes that joined or left
        self._target: tuple[Proc, ...] = ()  # the run's processes here, as last told
        self._leaving: list[Proc] = []  # processes that left, in the sample until it is taken

    def run(self) -> None:
        facts = host_facts(self.sampler.gpus, self.mpi_library)
        self._write(MetadataRecord(RecordKind.METADATA, {"simvue": {"hosts": {node_name(self.host): facts}}}))
        failures = 0
        next_at = time.monotonic()
        while True:
            # Wake at least every second to notice a parent that died without closing our
            # stdin (a forked pool worker may hold it open): we must not outlive the run.
            due = min(next_at, self._extra_at)
            self._read_commands(min(PARENT_CHECK_S, max(0.0, due - time.monotonic())))
            if os.getppid() != self.parent:
                return  # the run's process is gone: nobody to sample for
            now = time.monotonic()
            regular = self.stopping or now >= next_at
            if not regular and now < self._extra_at:
                continue  # only a command: not yet time for a sample
            try:
                self._sample()
                failures = 0
            except BrokenPipeError:
                return
            except Exception as exc:  # noqa: BLE001 - a sample that failed is skipped
                failures += 1
                if failures >= MAX_FAILURES:
                    os.write(2, f"simvue: resource sampling stopped after {failures} failures: {exc!r}\n".encode())
                    return
            self._extra_done()
            if self.stopping:
                return
            if regular:
                next_at += self.interval_s
                if next_at < time.monotonic():  # a sample took longer than the interval: skip ahead
                    next_at = time.monotonic() + self.interval_s

    def _read_commands(self, timeout_s: float) -> None:
        if self.stopping:
            return
        ready, _, _ = select.select([0], [], [], timeout_s)
        if not ready:
            return
        data = os.read(0, 1 << 16)
        if not data:
            self.stopping = True
            return
        self._unpacker.feed(data)
        for command in self._unpacker:
            self.apply(command)

    def apply(self, command: Any) -> None:
        if not isinstance(command, dict):
            return
        if command.get("stop"):
            self.stopping = True
        plain_pid = command.get("plain_pid")
        if plain_pid.__class__ is int and plain_pid > 0:
            self.sampler.plain_pid = plain_pid
        processes = command.get("processes")
        if isinstance(processes, list):
            self.set_processes(tuple(Proc.from_wire(item) for item in processes))

    def set_processes(self, processes: tuple[Proc, ...]) -> None:
        """Sample ``processes`` from now on; those new here get a sample soon, those that
        left one last sample at once (with everyone else) before they are dropped."""
        pids = {p.pid for p in processes}
        before = {p.pid for p in self._target}
        self._leaving += [p for p in self._target if p.pid not in pids]
        self._leaving = [p for p in self._leaving if p.pid not in pids]  # back again: not leaving
        self._target = processes
        self.sampler.set_processes((*processes, *self._leaving))
        if self._leaving:
            self._extra_at = time.monotonic()
        elif pids - before:
            self._extra_at = min(self._extra_at, time.monotonic() + JOIN_SAMPLE_DELAY_S)

    def _extra_done(self) -> None:
        """A sample was taken: it served as the extra one, if one was due."""
        self._extra_at = float("inf")
        if self._leaving:
            self._leaving = []
            self.sampler.set_processes(self._target)

    def _sample(self) -> None:
        now = time.time()
        values = self.sampler.sample(now)
        if values:
            self._write(ResourcesRecord(RecordKind.RESOURCES, self.host, now - self.started, now, values))
        current = self.sampler.gpu_map()
        if current != self._gpu_map:
            changed = {label: current.get(label, []) for label in current.keys() | self._gpu_map.keys()}
            self._write(MetadataRecord(RecordKind.METADATA, {"simvue": {"gpu_processes": changed}}))
            self._gpu_map = current

    def _write(self, record: tuple) -> None:
        out = sys.stdout.buffer
        out.write(msgpack.packb(record))
        out.flush()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run's processes; they stop us
    for warning in (signal.SIGUSR1, signal.SIGUSR2):  # Slurm's time-limit warning goes to every process
        signal.signal(warning, signal.SIG_IGN)
    host, interval_s, started, plain_pid = argv[:4]
    mpi_library = argv[4] if len(argv) > 4 and argv[4] else None
    agent = Agent(host, float(interval_s), float(started), int(plain_pid) or None, mpi_library)
    try:
        agent.run()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        agent.sampler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
