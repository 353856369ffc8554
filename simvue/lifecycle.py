"""Process lifecycle hooks: fork, interpreter exit, pool-worker exit and SIGTERM.

This is the only module that registers them.  Objects that hold per-process resources
(sockets, threads, the store connection) register here and get three calls:

* ``_after_fork_in_child()``: forget inherited resources without closing them.  A ZeroMQ
  socket used after ``fork`` silently drops messages, and closing an inherited SQLite
  connection may touch the parent's files, so the child starts over on first use.
* ``_close_at_exit(status)``: flush and end, bounded in time.  ``atexit`` does not run in
  fork/forkserver pool workers, so children also get a ``multiprocessing.util.Finalize``;
  whichever runs first does the work and the other finds nothing to do.
* the same on SIGTERM, which ``Pool.__exit__`` (``terminate()``) sends to its workers and
  which by default ends a process without running any exit hook.
"""

from __future__ import annotations

import _thread
import atexit
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol, cast


class Closable(Protocol):
    def _after_fork_in_child(self) -> None: ...

    def _close_at_exit(self, status: str | None, stop_waiting_after_s: float | None = None) -> None: ...


# Under Open MPI's launcher, after SIGTERM: how long rank 0 waits for the others' goodbyes
# before it ends the run (PRRTE's SIGKILL comes 250 ms after its SIGTERM), and how long the
# others stay before they exit.
PRRTE_RANK0_WAIT_S = 0.15
PRRTE_LINGER_S = 1.0

_live: weakref.WeakSet[Closable] = weakref.WeakSet()
_fork_callbacks: list[Callable[[], None]] = []
_process_hooks_pid: int | None = None
_closing_pid: int | None = None  # set while _close_all runs in that process
_lock = threading.Lock()
# Objects inherited through fork that must never be finalised in the child (see module doc).
_inherited_leftovers: list[object] = []


def track(obj: Closable) -> None:
    """Give ``obj`` the fork and exit calls described above."""
    _live.add(obj)
    _ensure_process_hooks()


def keep_inherited(obj: object) -> None:
    """Hold on to an object a forked child inherited, so that it is never closed there."""
    _inherited_leftovers.append(obj)


def on_fork_in_child(callback: Callable[[], None]) -> None:
    """Call ``callback`` in every child created by ``fork`` (module-level state resets)."""
    _fork_callbacks.append(callback)


def interrupt_main() -> None:
    """Raise ``KeyboardInterrupt`` in the main thread: how an abort from the server stops a
    job, so that ``finally`` blocks and ``with Run()`` run as they would on Ctrl-C."""
    _thread.interrupt_main()


def in_worker_process() -> bool:
    """True inside a ``multiprocessing`` child (pool worker or ``Process``)."""
    return multiprocessing.parent_process() is not None


def _after_fork_in_child() -> None:
    global _process_hooks_pid, _lock
    _lock = threading.Lock()
    _process_hooks_pid = None
    for callback in _fork_callbacks:
        callback()
    for obj in list(_live):
        obj._after_fork_in_child()


def _close_all(status: str | None = None, stop_waiting_after_s: float | None = None) -> None:
    global _closing_pid
    if _process_hooks_pid != os.getpid():
        return
    _closing_pid = os.getpid()
    for obj in list(_live):
        try:
            obj._close_at_exit(status, stop_waiting_after_s)
        except Exception as exc:  # noqa: BLE001 - exit hooks must never raise
            sys.stderr.write(f"simvue: error while closing at exit: {exc!r}\n")


def _exit_status() -> str | None:
    # The interpreter records an uncaught exception in sys.last_value before exit hooks run.
    last = getattr(sys, "last_value", None)
    if isinstance(last, KeyboardInterrupt):
        return "terminated"
    if last is not None:
        return "failed"
    return None


def _in_mpi_job() -> bool:
    from .topology import detect  # not at the top: topology hooks fork through this module

    return detect().is_mpi and not in_worker_process()


def _under_prrte() -> tuple[bool, int]:
    """Whether this rank was started by Open MPI's launcher (PRRTE), and its rank.  PRRTE
    SIGTERMs every rank, then SIGKILLs them all 250 ms later, or at once when one of them
    exits (see docs/openmpi.md)."""
    from .topology import detect

    here = detect()
    return (os.environ.get("PRTE_LAUNCHED") == "1" or here.launcher in ("openmpi", "pmix")), here.rank


def _exit_instead_of_signal(code: int) -> None:
    """End this MPI rank with ``code`` now.  An MPI launcher that sees a rank die by a signal
    SIGKILLs every other rank at once, rank 0 (the run's aggregator) included, which may be
    finishing the run; a rank that ends with an exit status leaves the others be."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


def _at_exit() -> None:
    status = _exit_status()
    _close_all(status)
    if status == "terminated" and _in_mpi_job():
        _exit_instead_of_signal(128 + signal.SIGINT)  # the interpreter would re-raise SIGINT


def _on_sigterm(signum: int, frame: object) -> None:
    # A pool worker is terminated on purpose once its work is done; a rank or a plain
    # process receiving SIGTERM was stopped from outside.
    if _closing_pid == os.getpid() and in_worker_process():
        # The worker is already closing in its exit hook (Pool.terminate() signals workers
        # that its sentinel has just told to exit).  A second close nested here would die
        # mid-flush or wait on locks the interrupted one holds; the worker exits anyway.
        return
    prrte, rank = _under_prrte()
    if prrte and _in_mpi_job():
        # Rank 0 ends the run within PRRTE's 250 ms; the others stay until it has (PRRTE
        # kills them anyway): one of them exiting first would have PRRTE kill rank 0 at once.
        _close_all("terminated", stop_waiting_after_s=PRRTE_RANK0_WAIT_S)
        if rank != 0:
            time.sleep(PRRTE_LINGER_S)
        _exit_instead_of_signal(128 + signal.SIGTERM)
    _close_all(None if in_worker_process() else "terminated")
    if _in_mpi_job():
        _exit_instead_of_signal(128 + signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _ensure_process_hooks() -> None:
    global _process_hooks_pid
    if _process_hooks_pid == os.getpid():
        return
    with _lock:
        if _process_hooks_pid == os.getpid():
            return
        _process_hooks_pid = os.getpid()
        atexit.register(_at_exit)
        if in_worker_process():
            multiprocessing.util.Finalize(None, _close_all, exitpriority=100)
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, _on_sigterm)
                if in_worker_process() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
                    _watch_for_unhandled_sigterm()
                if "SLURM_STEP_ID" in os.environ and not in_worker_process():
                    _note_slurm_warnings()
            except (ValueError, OSError):
                pass


# Slurm's warning before a job's time limit (``--signal=USR1@60``) goes to every process of
# the step; by default SIGUSR1/SIGUSR2 would end the process, and with it the run.
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
_warnings: list[tuple[int, float]] = []
_warned = threading.Event()


def _note_slurm_warnings() -> None:
    """In a Slurm step, record SIGUSR1 and SIGUSR2 (those the program does not handle itself)
    as a warning event in each of this process's runs, and let the job go on: the handler
    only notes the signal; a thread of ours records it (the handler may interrupt the main
    thread inside a simvue call, holding its locks).  Main thread only."""
    installed = False
    for signum in WARNING_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _on_warning_signal)
            installed = True
    if installed:
        threading.Thread(target=_record_warnings, name="simvue-slurm-warnings", daemon=True).start()


def _on_warning_signal(signum: int, frame: object) -> None:
    _warnings.append((signum, time.time()))
    _warned.set()


def _record_warnings() -> None:
    pid = os.getpid()
    while os.getpid() == pid:
        _warned.wait()
        _warned.clear()
        while _warnings:
            signum, when = _warnings.pop(0)
            for obj in list(_live):
                note = getattr(obj, "_note_signal", None)
                if note is not None:
                    try:
                        note(signal.Signals(signum).name, when)
                    except Exception:  # noqa: BLE001 - a note must never hurt the job
                        pass


def _watch_for_unhandled_sigterm() -> None:
    """Pool workers: deliver SIGTERM to the main thread again if its handler never ran.

    Python runs the handler on the main thread between bytecodes.  A SIGTERM that lands just
    before the main thread blocks on a lock (a worker about to wait for its next task while
    ``Pool.terminate()`` holds the task queue's lock) is recorded but never handled: the
    worker, and ``terminate()`` joining it, hang.  The C-level handler also writes the signal
    number to the wakeup fd; this thread reads it and, if the handler has not started within
    a moment, signals the main thread again, which interrupts its wait.  Main thread only;
    does nothing if the program set a wakeup fd of its own.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if previous != -1:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
        return
    main_ident = cast(int, threading.main_thread().ident)  # the main thread has always started
    pid = os.getpid()

    def watch() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        while os.getpid() == pid:
            data = os.read(read_fd, 512)
            if signal.SIGTERM in data:
                time.sleep(0.5)
                if _closing_pid != pid:
                    signal.pthread_kill(main_ident, signal.SIGTERM)

    threading.Thread(target=watch, name="simvue-sigterm-watch", daemon=True).start()


os.register_at_fork(after_in_child=_after_fork_in_child)
