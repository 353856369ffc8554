"""The aggregator in a process of its own, so that rank 0 pays only for its own records.

In an MPI job every rank waits for the slowest, and a thread in rank 0 that merges, commits
and uploads everyone's records takes rank 0's interpreter time.  So rank 0 (by default: see
``aggregates_apart``) starts ``python -m simvue.aggregator.host`` by exec, hands it what
``session.start_aggregator`` needs on its stdin, reads back the address (or the error that
stopped the run from starting), and joins the run as its *owner*: a sender like every other
rank, whose goodbye closes the run (``AggregatorState``, ``SenderState.owner``).

The helper runs in a session of its own (a launcher's signal to the job's process group does
not reach it) and ends when the run has finished.  If its owner dies without a goodbye
(SIGKILL, OOM), the helper sees the pid gone, commits what it holds, marks the run failed and
exits, as it does when the other ranks are lost; so nothing that reached it is lost.  At
exit, rank 0 waits for the helper to finish (``HostedAggregator.close``), as it would wait for
its own aggregator thread: a job's store is complete once ``mpiexec`` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from ..transport.rendezvous import AggregatorAddress
from . import liveness

if TYPE_CHECKING:
    from ..api.config import ServerConfig
    from ..config import Settings
    from ..topology import Topology

# How long after its owner's process ended, without a goodbye or a loss noticed by the
# aggregator itself, the helper ends the run (the owner never said hello).
OWNER_GONE_AFTER_S = 3.0
WATCH_INTERVAL_S = 0.2
# Requests from the owner on the helper's stdin: end the run with whoever has left.
STOP_WAITING = b"S"
# After a SIGTERM (the job is being cancelled), how long the ranks have to say goodbye.
TERM_GRACE_S = 1.0
WAIT_POLL_S = 0.02


def aggregates_apart(settings: Settings, topology: Topology) -> bool:
    """Whether this process's run gets an aggregator process (``aggregate_in``).  "auto":
    for rank 0 of a multi-rank MPI job, where the aggregator's work would slow every rank;
    not for one process (or a pool's parent), where starting an interpreter (0.1-0.2 s)
    would be most of a short script's cost."""
    if settings.aggregate_in == "auto":
        return topology.is_mpi and topology.size > 1 and topology.rank == 0
    return settings.aggregate_in == "process"


@dataclasses.dataclass
class HostConfig:
    """What creating the run and aggregating it needs (``session.start_aggregator``); for
    the helper, pickled to its stdin."""

    run_fields: dict[str, Any]
    settings: Settings
    topology: Topology
    server: ServerConfig | None
    expected_ranks: int
    namespace: bool
    explicit_address: str | None
    key: bytes | None
    owner_pid: int
    owner_created: float | None
    debug: bool = False
    mpi_library: str | None = None  # MPI's version string, if the owner had initialised mpi4py


class HostedAggregator:
    """The run's owner's handle on the aggregator's process."""

    def __init__(self, process: subprocess.Popen, address: AggregatorAddress) -> None:
        self.process = process
        self.address = address

    @classmethod
    def launch(cls, config: HostConfig, timeout_s: float) -> HostedAggregator:
        """Start the helper and wait (``timeout_s`` at most) for the run it created.
        Raises what stopped it, as creating the run in this process would have."""
        process = subprocess.Popen(
            [sys.executable, "-m", "simvue.aggregator.host"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            data = pickle.dumps(config)
            process.stdin.write(len(data).to_bytes(8, "little") + data)
            process.stdin.flush()  # stdin stays open: the owner's requests (``STOP_WAITING``)
            reply = _read_reply(process, timeout_s)
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            process.stdout.close()
        if "error" in reply:
            process.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
            raise reply["error"]
        return cls(process, reply["address"])

    @property
    def finished(self) -> bool:
        return self.process.poll() is not None

    def close(
        self,
        status: str | None,
        timeout_s: float | None = None,
        *,
        wait_for_ranks: bool = True,
        stop_waiting_after_s: float | None = None,
    ) -> bool:
        """Wait for the run to finish: the helper ends when it has (``timeout_s`` at most;
        None: as long as it takes, as for an aggregator thread).  With
        ``stop_waiting_after_s`` (the job is being stopped), ask it after that long to end
        the run with whoever has left."""
        if stop_waiting_after_s is not None and not self._wait(stop_waiting_after_s):
            self._request(STOP_WAITING)
        if not wait_for_ranks:
            return True
        return self._wait(timeout_s) and self.process.returncode in (0, None)  # None: ended, not reaped yet

    def _wait(self, timeout_s: float | None) -> bool:
        # Polled, not ``Popen.wait``: this runs at exit and again in a SIGTERM handler that may
        # interrupt the first wait, and a nested ``Popen.wait`` would block on the lock the
        # interrupted one holds.
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._ended():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(WAIT_POLL_S)
        return True

    def _ended(self) -> bool:
        if self.process.poll() is not None:
            return True
        # poll() cannot reap it while an interrupted wait holds Popen's lock; a zombie has ended.
        import psutil  # not on init's path

        try:
            return psutil.Process(self.process.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def _request(self, request: bytes) -> None:
        """Ask the helper something through its stdin (not a signal: a batch system's
        warning signals, SIGUSR1 among them, may be sent to every process of the job)."""
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(request)
            self.process.stdin.flush()
        except (OSError, ValueError):
            pass  # it has just ended


def _read_reply(process: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    """The helper's one message: ``{"address": ...}`` or ``{"error": exception}``."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"simvue: the aggregator's process did not start within {timeout_s:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    if not chunks:
        code = process.wait(timeout_s)
        raise RuntimeError(f"simvue: the aggregator's process ended (exit status {code}) before the run started")
    reply = pickle.loads(b"".join(chunks))
    if not isinstance(reply, dict):
        raise RuntimeError("simvue: the aggregator's process sent an unreadable reply")
    return reply


# -- in the helper ------------------------------------------------------------------------


def main() -> int:
    size = int.from_bytes(_read_exactly(0, 8), "little")
    config: HostConfig = pickle.loads(_read_exactly(0, size))
    # The reply goes through a descriptor of its own; whatever this process starts (the node's
    # sampler) inherits /dev/null as its stdout, so the owner sees the end of the reply.
    reply_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    if config.debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("simvue[aggregator %(process)d]: %(message)s"))
        logger = logging.getLogger("simvue")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    from ..resources.facts import remember_library
    from ..session import start_aggregator

    remember_library(config.mpi_library)

    try:
        aggregator, _, address = start_aggregator(config, "host")
    except BaseException as exc:  # noqa: BLE001 - handed to the owner, which raises it
        _reply(reply_fd, {"error": _picklable(exc)})
        return 1
    terminated_at: list[float] = []
    # Signals are the job's: Ctrl-C and a batch system's warnings (SIGUSR1...) go to its ranks,
    # which say goodbye.  SIGTERM (the job is being cancelled) ends the run with whoever has
    # left once the ranks have had TERM_GRACE_S to say goodbye.
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: terminated_at.append(time.monotonic()))
    _reply(reply_fd, {"address": address})
    os.set_blocking(0, False)
    owner_gone_since: float | None = None
    while not aggregator.wait(WATCH_INTERVAL_S):
        if STOP_WAITING in _requests() or (terminated_at and time.monotonic() - terminated_at[0] >= TERM_GRACE_S):
            aggregator.close(None, 0, wait_for_ranks=False, stop_waiting_after_s=0)  # with whoever has left
        if config.owner_created is None or aggregator.state.closing:
            continue
        if liveness.process_running(config.owner_pid, config.owner_created):
            owner_gone_since = None
        elif owner_gone_since is None:
            owner_gone_since = time.monotonic()
        elif time.monotonic() - owner_gone_since >= OWNER_GONE_AFTER_S:
            aggregator.close("failed", 0, wait_for_ranks=False)  # it died before it said hello
    return 0 if aggregator.final_status is not None else 1


def _requests() -> bytes:
    """What the owner has written to our stdin since the last call (b"" if nothing)."""
    try:
        return os.read(0, 4096)
    except (BlockingIOError, OSError):
        return b""


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the owner closed the pipe before the configuration was complete")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _reply(fd: int, message: dict[str, Any]) -> None:
    view = memoryview(pickle.dumps(message))
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception that cannot travel: its text does
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


if __name__ == "__main__":
    sys.exit(main())
