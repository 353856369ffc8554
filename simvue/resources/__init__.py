"""Resource sampling: one sampler per node, on a timer, off the logging path.

Which process samples is decided by the aggregator, which knows every process of the run
and its host (from HELLO):

* on its own node, the aggregator's process samples every process of the run there (rank 0
  and the ranks beside it, or a pool's parent and its workers);
* on every other node, the aggregator sends a SAMPLE message to the live process with the
  lowest rank there, whose ``SamplingRole`` starts sampling, and sends it the new list of
  processes when one joins or leaves; if that process leaves first, the next one is chosen.

Other processes do no sampling.  The sampling itself runs in a small child process of the
sampling one (``simvue.resources.agent``), so that it costs the rank's interpreter nothing
but one pipe read per sample.  A sample comes back as one RESOURCES record
(``[10, host, time, timestamp, {name: value}]``) and goes through the same buffer as the
process's metrics; the aggregator numbers each host's samples 0, 1, 2, ...  The first sample
is taken as soon as the sampler process has started, then one every ``interval_s``, and a
last one when sampling stops (the run's end, or the sampling process's close), so short runs
have data too (the aggregator's own sampler starts 0.1 s after the run: see
``aggregator.service.SAMPLER_START_DELAY_S``).  Series names and units: docs/resources.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import msgpack

from .facts import initialised_library
from .procs import Proc, node_name

if TYPE_CHECKING:
    from .sampler import NodeSampler

__all__ = ["NodeSampler", "NodeSampling", "Proc", "SamplingRole", "node_name"]


def __getattr__(name: str) -> Any:
    # ``NodeSampler`` needs psutil: imported when asked for (the sampler process, tests),
    # never by a run's own process, which only starts that process.
    if name == "NodeSampler":
        from .sampler import NodeSampler

        return NodeSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class NodeSampling:
    """Samples one node every ``interval_s`` through a sampler process, handing each record
    it sends back to ``emit`` (a deque's ``append``) on a reader thread.  It never raises:
    if the sampler process cannot start, it says so once on stderr and the run goes on
    without resource series."""

    def __init__(
        self,
        host: str,
        interval_s: float,
        emit: Callable[[tuple], Any],
        *,
        started: float,
        processes: Iterable[Proc] = (),
        plain_pid: int | None = None,
    ) -> None:
        self.host = host
        self.interval_s = interval_s
        self._emit = emit
        self._started = started
        self._plain_pid = plain_pid
        self._processes = tuple(processes)
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> NodeSampling:
        environ = dict(os.environ)
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, environ.get("PYTHONPATH"))))
        command = [
            sys.executable, "-m", "simvue.resources.agent",
            self.host, repr(self.interval_s), repr(self._started), str(self._plain_pid or 0),
            initialised_library() or "",
        ]
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environ, close_fds=True
            )
        except (OSError, ValueError) as exc:
            os.write(2, f"simvue: resource sampling could not start: {exc!r}\n".encode())
            return self
        self._reader = threading.Thread(target=self._read, name="simvue-resources", daemon=True)
        self._reader.start()
        self.set_processes(self._processes)
        return self

    def set_processes(self, processes: Iterable[Proc], *, plain_pid: int | None = None) -> None:
        """The run's processes on this node (sent to the sampler process when changed).
        ``plain_pid``, when given, replaces the process whose figures get the plain names
        (``Run.set_pid`` in a single process's run)."""
        processes = tuple(processes)
        with self._lock:
            self._processes = processes
            if plain_pid is not None:
                self._plain_pid = plain_pid
            if self._process is not None:
                command: dict[str, Any] = {"processes": [p.wire() for p in processes]}
                if plain_pid is not None:
                    command["plain_pid"] = plain_pid
                self._send(command)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Take the last sample and stop; waits at most ``timeout_s`` for it."""
        with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            self._send({"stop": True}, process)
            try:
                cast(IO[bytes], process.stdin).close()  # started with stdin=PIPE
            except OSError:
                pass
        if self._reader is not None:
            self._reader.join(timeout_s)
        try:
            process.wait(0.5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _send(self, command: dict[str, Any], process: subprocess.Popen[bytes] | None = None) -> None:
        process = cast("subprocess.Popen[bytes]", process or self._process)  # callers send only to a running one
        stdin = cast(IO[bytes], process.stdin)  # started with stdin=PIPE
        try:
            stdin.write(msgpack.packb(command))
            stdin.flush()
        except (OSError, ValueError):
            pass  # it has exited; its stderr says why

    def _read(self) -> None:
        process = self._process
        if process is None:
            return  # stopped before this thread began
        stdout = cast(IO[bytes], process.stdout)  # started with stdout=PIPE
        unpacker = msgpack.Unpacker(use_list=True, strict_map_key=False)
        fd = stdout.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                break
            if not data:
                break
            unpacker.feed(data)
            for record in unpacker:
                if isinstance(record, list) and record:
                    self._emit(tuple(record))
        stdout.close()


class SamplingRole:
    """A process that is not the aggregator: it samples its node while the aggregator says
    so (SAMPLE messages, handled on the sender's thread by ``configure``)."""

    def __init__(self, host: str, started: Callable[[], float], emit: Callable[[tuple], Any]) -> None:
        """``started()`` is the run's start time (known once the aggregator has answered)."""
        self._host = host
        self._started = started
        self._emit = emit
        self._lock = threading.Lock()
        self.sampling: NodeSampling | None = None
        self._closed = False

    def configure(self, plan: Any) -> None:
        """Apply a SAMPLE body: ``{interval_s, processes: [[label, pid, cuda], ...]}``, or
        an empty map to stop sampling."""
        with self._lock:
            if self._closed:
                return
            if not isinstance(plan, dict) or not plan.get("processes"):
                if self.sampling is not None:
                    threading.Thread(target=self.sampling.stop, daemon=True).start()
                    self.sampling = None
                return
            processes = [Proc.from_wire(item) for item in plan["processes"]]
            interval_s = float(plan.get("interval_s") or 30.0)
            if self.sampling is not None and self.sampling.interval_s == interval_s:
                self.sampling.set_processes(processes)
                return
            if self.sampling is not None:
                threading.Thread(target=self.sampling.stop, daemon=True).start()
            self.sampling = NodeSampling(
                self._host, interval_s, self._emit, started=self._started(), processes=processes
            ).start()

    def stop(self, timeout_s: float) -> None:
        """The process is leaving the run: take the last sample now."""
        with self._lock:
            self._closed = True
            sampling, self.sampling = self.sampling, None
        if sampling is not None:
            sampling.stop(timeout_s)
