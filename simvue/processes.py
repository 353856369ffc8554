"""Processes a run starts and watches (``Run.add_process``), and which process its resource
figures follow (``Run.set_pid``).  See ``docs/processes.md``.

Processes belong to the ``Run`` handle, in the OS process, that started them: an MPI rank or a
pool worker that calls ``add_process`` owns that child.  Each child writes its stdout and
stderr to ``{run name}_{identifier}.out`` / ``.err`` in the working directory (another process
than the run's own adds its label: ``{run name}_rank1_{identifier}.out``).  A watcher thread
waits for the child; when it ends the watcher records its exit (an event, the user alert
``{identifier}_exit_status``, the status ``failed`` when it failed on its own), saves both
files as output artifacts when they are not empty, sets ``completion_trigger`` and calls
``completion_callback(status_code=, std_out=, std_err=)``.

``close()`` waits for children still running, then for their watchers; leaving ``with Run()``
on an exception, or an abort of the run, terminates them first (SIGTERM to the process and
its descendants, SIGKILL to what is left ``KILL_GRACE_S`` later).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import topology
from ._run_parts import RunParts
from .errors import SimvueError, SimvueRunError, SimvueTypeError, SimvueValueError, SimvueWarning
from .transport.protocol import RecordKind, SamplePidRecord

if TYPE_CHECKING:
    import psutil  # imported where used: a run that starts no process never needs it

# After SIGTERM, how long a process tree has to end before what is left gets SIGKILL.
KILL_GRACE_S = 3.0
# A completion callback gets at most this much of each stream (the end of it); the files
# themselves, saved as artifacts, hold everything.
CALLBACK_OUTPUT_MAX_BYTES = 16 << 20
# How many lines of a failed process's output its event and the close warning quote.
ERROR_TAIL_LINES = 10
MAX_IDENTIFIER_CHARS = 200
POWERSHELLS = ("pwsh", "powershell")
FALLBACK_SHELL = "/bin/sh"


def get_current_shell() -> str | None:
    """The user's shell: ``$SHELL``, else the parent process's executable when it is a shell,
    else ``/bin/sh`` where it exists.  ``add_process`` runs it when no executable is given."""
    import psutil

    shell = os.environ.get("SHELL")
    if shell:
        return shell
    with contextlib.suppress(psutil.Error, OSError):
        parent = psutil.Process(os.getppid()).exe()
        if os.path.basename(parent).rstrip("0123456789.") in ("sh", "bash", "zsh", "dash", "ksh", "fish", *POWERSHELLS):
            return parent
    return FALLBACK_SHELL if os.path.exists(FALLBACK_SHELL) else None


def option_arguments(options: Mapping[str, Any], executable: str | None) -> list[str]:
    """``add_process``'s keyword options as command-line arguments: ``x=1`` -> ``-x 1``,
    ``output_file="a"`` -> ``--output-file a``, ``flag=True`` -> ``--flag``, ``flag=False``
    -> nothing; under PowerShell every option takes one dash.  Names starting ``__`` are
    skipped."""
    shell = get_current_shell() or ""
    use_pwsh = any(name in shell for name in POWERSHELLS) and executable in (*POWERSHELLS, None)
    arguments: list[str] = []
    for name, value in options.items():
        if name.startswith("__"):
            continue
        option = name.replace("_", "-")
        dashes = "-" if len(option) == 1 or use_pwsh else "--"
        if value is True:
            arguments.append(f"{dashes}{option}")
        elif value is not False:
            arguments += [f"{dashes}{option}", f"{value}"]
    return arguments


@dataclasses.dataclass(eq=False)
class ChildProcess:
    """One process started by ``add_process``."""

    identifier: str
    command: list[str]
    popen: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    artifact_stem: str  # its output artifacts are ``{artifact_stem}.out`` / ``.err``
    callback: Callable[..., Any] | None
    trigger: Any
    alert: str | None
    killed: bool = False  # stopped by the run (kill_process, an exception, an abort)
    reported: bool = False  # named in close's warning about failed processes
    watcher: threading.Thread | None = None
    recorded: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def failed(self) -> bool:
        """It ended with a non-zero status that the run did not cause by stopping it."""
        return self.popen.returncode not in (None, 0) and not self.killed


class ChildProcesses:
    """The processes one ``Run`` handle started in this OS process (``Run.executor``).

    Offers the upstream executor's read calls: ``command_str``, ``get_command``,
    ``std_out``, ``std_err``, ``success``, ``exit_status``, ``get_error_summary``."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.children: dict[str, ChildProcess] = {}
        self.sampled_pid: int | None = None  # set_pid's process, if any
        self.lock = threading.Lock()

    @property
    def command_str(self) -> dict[str, str]:
        """``{identifier: command as one shell-quoted line}``."""
        return {identifier: shlex.join(child.command) for identifier, child in self.children.items()}

    def get_command(self, process_id: str) -> str:
        if process_id not in self.children:
            raise KeyError(f"Failed to retrieve '{process_id}', no such process")
        return self.command_str[process_id]

    def std_out(self, process_id: str) -> str | None:
        """What the process wrote to stdout so far (None if nothing)."""
        child = self.children.get(process_id)
        return _read_text(child.out_path) or None if child else None

    def std_err(self, process_id: str) -> str | None:
        child = self.children.get(process_id)
        return _read_text(child.err_path) or None if child else None

    @property
    def success(self) -> bool:
        """Every process ended with status 0 (or was stopped by the run)."""
        return not any(child.failed for child in self.children.values())

    @property
    def exit_status(self) -> int:
        """The first non-zero status of a process that failed, else 0."""
        return next((int(child.popen.returncode) for child in self.children.values() if child.failed), 0)

    def get_error_summary(self) -> dict[str, str | None]:
        """``{identifier: its stderr (or the end of its stdout)}`` for each failed process."""
        return {identifier: _error_text(child) for identifier, child in self.children.items() if child.failed}

    @property
    def processes(self) -> list[psutil.Process]:
        """The running processes started here, with their descendants."""
        found: dict[int, psutil.Process] = {}
        for child in list(self.children.values()):
            if child.popen.poll() is None:
                _add_tree(found, child.popen.pid)
        return list(found.values())


class ProcessesMixin(RunParts):
    """``add_process``, ``kill_process``, ``kill_all_processes``, ``processes``,
    ``executor`` and ``set_pid``."""

    # -- starting -------------------------------------------------------------------------

    def add_process(
        self,
        identifier: str,
        *cmd_args: Any,
        executable: str | os.PathLike | None = None,
        script: str | os.PathLike | None = None,
        input_file: str | os.PathLike | None = None,
        completion_callback: Callable[..., Any] | None = None,
        completion_trigger: Any = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        **cmd_kwargs: Any,
    ) -> None:
        """Start a process as part of the run and watch it (see the module docstring).

        The command is ``executable`` (else the first of ``cmd_args``, else the user's
        shell), then ``script``, then ``input_file``, then ``cmd_kwargs`` as options
        (``option_arguments``), then the rest of ``cmd_args``.  ``script`` is saved as a
        code artifact and ``input_file`` as an input artifact; the command is stored in the
        metadata as ``{identifier}_command``.  ``env`` replaces the environment (as
        ``subprocess.Popen(env=...)``); ``cwd`` is the child's working directory (paths
        given here are relative to this process's).  Returns at once; bad input is
        reported through the run's error policy and starts nothing."""
        try:
            if self._state == "new":
                raise SimvueRunError("add_process() called before init()")
            if self._state == "closed":
                raise SimvueRunError("add_process() called on a closed run")
            table = self._child_processes()
            identifier = _identifier(identifier)
            if identifier in table.children:
                raise SimvueValueError(f"add_process: a process {identifier!r} was already added to this run")
            environment = _environment(env)
            workdir = _directory(cwd)
            script_path = _existing_file("script", script)
            input_path = _existing_file("input_file", input_file)
            _check_callbacks(completion_callback, completion_trigger)
            command, program = _command(
                [_argument(arg) for arg in cmd_args], executable, script_path, input_path, cmd_kwargs, environment
            )
        except SimvueError as exc:
            self._fail("add_process", exc)
            return None
        if self._state == "active" and self._buffer is None:
            self._process_buffer("add_process")  # a worker joins the run first: its label names the files
        active = self._state == "active"
        stem = self._output_stem(identifier)
        out_path, err_path = Path(f"{stem}.out").absolute(), Path(f"{stem}.err").absolute()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                popen = subprocess.Popen(
                    command, executable=program, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    env=environment, cwd=workdir, close_fds=True,
                )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._fail("add_process", SimvueRunError(f"add_process: could not start {shlex.join(command)!r}: {exc}"))
            return None
        if active:
            if script_path is not None:
                self.save_file(script_path, "code")
            if input_path is not None:
                self.save_file(input_path, "input")
            self.update_metadata({f"{self._metadata_prefix()}{identifier}_command": shlex.join(command)})
        alert = self.create_user_alert(f"{self._metadata_prefix()}{identifier}_exit_status") if active else None
        child = ChildProcess(
            identifier, command, popen, out_path, err_path, f"{self._name or 'run'}_{identifier}",
            completion_callback, completion_trigger, alert,
        )
        child.watcher = threading.Thread(
            target=self._watch_child, args=(child,), name=f"simvue-process-{identifier}", daemon=True
        )
        with table.lock:
            table.children[identifier] = child
        child.watcher.start()
        return None

    # -- stopping -------------------------------------------------------------------------

    def kill_process(self, process_id: str) -> None:
        """Stop the process added as ``process_id`` and its descendants (SIGTERM, then
        SIGKILL after ``KILL_GRACE_S``); returns once it has ended and its output is saved.
        A process stopped this way does not mark the run failed."""
        table = self._child_processes()
        child = table.children.get(process_id) if isinstance(process_id, str) else None
        if child is None:
            self._fail("kill_process", SimvueValueError(f"kill_process: no process {process_id!r} was added to this run"))
            return None
        _stop(child)
        self._wait_recorded([child])
        return None

    def kill_all_processes(self) -> None:
        """Stop every process this handle added (see ``kill_process``), all at once."""
        children = list(self._child_processes().children.values())
        for child in children:
            _signal_tree(child, signal.SIGTERM)
        for child in children:
            _stop(child)
        self._wait_recorded(children)

    def _end_processes(self, *, kill: bool) -> None:
        """At close: wait for (or with ``kill``, stop) every child, then for its watcher.
        An interrupt while waiting stops the children before it goes on up."""
        table = self.__dict__.get("_processes_table")
        if table is None or table.pid != os.getpid() or not table.children:
            return
        children = list(table.children.values())
        try:
            if kill:
                self.kill_all_processes()
            else:
                for child in children:
                    child.popen.wait()
        except BaseException:
            for child in children:
                _stop(child)
            raise
        self._wait_recorded(children)
        failed = {c.identifier: _error_text(c) for c in children if c.failed and not c.reported}
        for child in children:
            child.reported = child.reported or child.failed
        if failed:
            lines = "\n".join(f"{identifier}:\n{text or '(no output)'}" for identifier, text in failed.items())
            warnings.warn(
                f"simvue: run {self._name!r}: a process ended with non-zero status {table.exit_status};"
                f" the run is marked failed:\n{lines}",
                SimvueWarning,
                stacklevel=4,
            )

    def _wait_recorded(self, children: list[ChildProcess]) -> None:
        """Wait for the watchers of ``children`` (callbacks included), at most
        ``close_timeout_s`` each once the process has ended."""
        for child in children:
            if child.watcher is None or child.watcher is threading.current_thread():
                continue  # a completion callback that kills or closes: its own watcher is done with it
            child.watcher.join(self._settings.close_timeout_s)
            if child.watcher.is_alive():
                warnings.warn(
                    f"simvue: the completion callback of process {child.identifier!r} is still running"
                    f" after {self._settings.close_timeout_s:g} s",
                    SimvueWarning,
                    stacklevel=3,
                )

    def _stop_processes_on_abort(self) -> None:
        """The run was asked to stop: stop its children (their outputs are still saved)."""
        table = self.__dict__.get("_processes_table")
        if table is not None and table.pid == os.getpid() and table.children:
            self.kill_all_processes()

    # -- watching -------------------------------------------------------------------------

    def _watch_child(self, child: ChildProcess) -> None:
        """The watcher thread of ``child``: records its end, then trigger and callback."""
        status = child.popen.wait()
        try:
            if self._state == "active":
                self._record_exit(child, status)
        finally:
            child.recorded.set()
            if child.trigger is not None:
                with contextlib.suppress(Exception):
                    child.trigger.set()
            if child.callback is not None:
                try:
                    child.callback(
                        status_code=status,
                        std_out=_read_text(child.out_path, CALLBACK_OUTPUT_MAX_BYTES),
                        std_err=_read_text(child.err_path, CALLBACK_OUTPUT_MAX_BYTES),
                    )
                except Exception as exc:  # noqa: BLE001 - the user's callback must not reach the thread's top
                    warnings.warn(
                        f"simvue: the completion callback of process {child.identifier!r} raised {exc!r}",
                        SimvueWarning,
                        stacklevel=1,
                    )

    def _record_exit(self, child: ChildProcess, status: int) -> None:
        for path, suffix in ((child.err_path, "err"), (child.out_path, "out")):
            with contextlib.suppress(OSError):
                if path.stat().st_size:
                    self.save_file(path, "output", name=f"{child.artifact_stem}.{suffix}")
        how = "was stopped" if child.killed else "ended"
        if child.failed:
            self.log_event(
                f"process {child.identifier!r} ended with status {status}:\n{_error_text(child) or '(no output)'}",
                log_level="error",
            )
            self.set_status("failed")
        else:
            self.log_event(f"process {child.identifier!r} {how} with status {status}")
        if child.alert is not None:
            self.log_alert(child.alert, "critical" if child.failed else "ok")

    # -- set_pid and the process lists ----------------------------------------------------

    def set_pid(self, pid: int) -> None:
        """From now on, this process's resource figures (``resources/...``, see
        docs/resources.md) are those of process ``pid`` (on this node) and its descendants
        instead of this process's.  ``processes`` lists it too.  ``pid`` must be running."""
        import psutil

        try:
            if pid.__class__ is not int or pid <= 0:
                raise SimvueTypeError(f"set_pid needs a process id (a positive int), not {pid!r}")
            if not psutil.pid_exists(pid):
                raise SimvueValueError(f"set_pid: no process with pid {pid} is running")
            if self._state == "new":
                raise SimvueRunError("set_pid() called before init()")
        except SimvueError as exc:
            self._fail("set_pid", exc)
            return None
        self._child_processes().sampled_pid = pid
        self._record(SamplePidRecord(RecordKind.SAMPLE_PID, pid), "set_pid")
        return None

    @property
    def processes(self) -> list[psutil.Process]:
        """The processes whose resources this run follows from here: this process (or the
        one ``set_pid`` named) and its descendants, and every process ``add_process``
        started that is still running, with its descendants."""
        table = self._child_processes()
        found: dict[int, psutil.Process] = {}
        _add_tree(found, table.sampled_pid or os.getpid())
        for process in table.processes:
            found.setdefault(process.pid, process)
        return list(found.values())

    @property
    def executor(self) -> ChildProcesses:
        """The processes this handle started (``add_process``), with the upstream executor's
        read calls (``get_command``, ``std_out``, ``exit_status``, ...)."""
        return self._child_processes()

    # -- helpers --------------------------------------------------------------------------

    def _child_processes(self) -> ChildProcesses:
        table = self.__dict__.get("_processes_table")
        if table is None or table.pid != os.getpid():  # none yet, or the parent's (fork)
            table = self.__dict__["_processes_table"] = ChildProcesses()
        return table

    def _process_label(self) -> str | None:
        """None in the run's own process; else what tells this process's files apart."""
        membership = self._membership
        if membership is None or membership.is_aggregator:
            return None
        here = topology.detect()
        return f"rank{here.rank}" if here.size > 1 and not _in_worker() else f"pid{os.getpid()}"

    def _output_stem(self, identifier: str) -> str:
        label = self._process_label()
        name = (self._name or "simvue").replace("/", "_").replace(os.sep, "_")
        return f"{name}_{identifier}" if label is None else f"{name}_{label}_{identifier}"

    def _metadata_prefix(self) -> str:
        label = self._process_label()
        return "" if label is None else f"{label}_"


# -- checks of add_process's arguments ---------------------------------------------------


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SimvueValueError(f"add_process needs an identifier (a non-empty str), not {value!r}")
    if len(value) > MAX_IDENTIFIER_CHARS or any(c in value for c in ("/", "\\", "\0")) or value in (".", ".."):
        raise SimvueValueError(
            f"add_process: identifier {value!r} names the output files: at most {MAX_IDENTIFIER_CHARS}"
            " characters, without '/', '\\\\' or NUL"
        )
    return value


def _argument(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value) if not isinstance(os.fspath(value), bytes) else os.fsdecode(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise SimvueTypeError(f"add_process: argument {value!r} is a {type(value).__name__}, not a str, path or number")


def _environment(env: Any) -> dict[str, str] | None:
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise SimvueTypeError(f"add_process: env must be a dict of str -> str, not {type(env).__name__}")
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise SimvueValueError(f"add_process: env name {key!r} is not a valid variable name")
        if not isinstance(value, str):
            raise SimvueTypeError(f"add_process: env[{key!r}] is a {type(value).__name__}, not a str")
        if "\0" in value:
            raise SimvueValueError(f"add_process: env[{key!r}] holds a NUL character")
    return dict(env)


def _directory(cwd: Any) -> str | None:
    if cwd is None:
        return None
    if not isinstance(cwd, (str, os.PathLike)) or not os.path.isdir(cwd):
        raise SimvueValueError(f"add_process: cwd {cwd!r} is not a directory")
    return os.fspath(cwd)


def _existing_file(what: str, path: Any) -> str | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise SimvueValueError(f"add_process: {what} {path!r} is not a file")
    return os.fspath(path)


def _check_callbacks(callback: Any, trigger: Any) -> None:
    if callback is not None and not callable(callback):
        raise SimvueTypeError(f"add_process: completion_callback must be callable, not {callback!r}")
    if trigger is not None and not callable(getattr(trigger, "set", None)):
        raise SimvueTypeError(f"add_process: completion_trigger must be an Event (with set()), not {trigger!r}")


def _command(
    arguments: list[str],
    executable: Any,
    script: str | None,
    input_file: str | None,
    options: Mapping[str, Any],
    environment: Mapping[str, str] | None,
) -> tuple[list[str], str]:
    """The command line and the program to run (resolved on the PATH this process and
    ``environment`` give); raises if there is no such program."""
    if executable is not None:
        if not isinstance(executable, (str, os.PathLike)) or not os.fspath(executable):
            raise SimvueTypeError(f"add_process: executable must be a str or path, not {executable!r}")
        first = str(os.fspath(executable))
        explicit: str | None = first
    elif arguments:
        first, arguments = arguments[0], arguments[1:]
        explicit = None
    else:
        shell = get_current_shell()
        if shell is None:
            raise SimvueValueError("add_process: no command, no executable, and no shell to run instead")
        first, explicit = shell, None
    search_path = {**os.environ, **(environment or {})}.get("PATH")
    program = first if os.sep in first and os.path.isfile(first) else shutil.which(first, path=search_path)
    if program is None:
        raise SimvueValueError(f"add_process: executable {first!r} does not exist (not a file, not on the PATH)")
    if not os.access(program, os.X_OK):
        raise SimvueValueError(f"add_process: {program!r} is not executable")
    command = [first, *(p for p in (script, input_file) if p is not None)]
    command += option_arguments(options, explicit)
    return command + arguments, program


# -- processes and their output -----------------------------------------------------------


def _in_worker() -> bool:
    from .lifecycle import in_worker_process

    return in_worker_process()


def _add_tree(found: dict[int, psutil.Process], pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        found.setdefault(root.pid, root)
        for process in root.children(recursive=True):
            found.setdefault(process.pid, process)


def _signal_tree(child: ChildProcess, signum: int) -> list[psutil.Process]:
    """Send ``signum`` to a running child and its descendants; those it was sent to."""
    import psutil

    if child.popen.returncode is not None:
        return []
    child.killed = True
    try:
        root = psutil.Process(child.popen.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signum)  # psutil checks that the pid was not reused
    return tree


def _stop(child: ChildProcess) -> None:
    """SIGTERM the child's tree, SIGKILL what is left after ``KILL_GRACE_S``, and wait as
    long again for it to end.  The child itself is reaped by its watcher thread (a second
    ``waitpid`` here would take its exit status away from ``Popen``)."""
    import psutil

    tree = _signal_tree(child, signal.SIGTERM)
    if not tree:
        return
    if _wait_ended(child, tree, KILL_GRACE_S):
        return
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
    _wait_ended(child, tree, KILL_GRACE_S)


def _wait_ended(child: ChildProcess, tree: list[psutil.Process], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the child and its descendants in ``tree`` to end."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child.popen.returncode is not None and not any(_running(p) for p in tree[1:]):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _running(process: psutil.Process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_text(path: Path, max_bytes: int | None = None) -> str:
    """The file's text (its last ``max_bytes``), undecodable bytes replaced; '' if unreadable."""
    try:
        with open(path, "rb") as stream:
            if max_bytes is not None:
                size = stream.seek(0, os.SEEK_END)
                stream.seek(max(0, size - max_bytes))
            return stream.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _error_text(child: ChildProcess) -> str | None:
    """A failed process's stderr, else the last lines of its stdout."""
    error = _read_text(child.err_path, CALLBACK_OUTPUT_MAX_BYTES).strip()
    if error:
        return "\n".join(error.splitlines()[-ERROR_TAIL_LINES:])
    out = _read_text(child.out_path, CALLBACK_OUTPUT_MAX_BYTES).strip()
    return "  Tail STDOUT:\n\n" + "\n".join(out.splitlines()[-ERROR_TAIL_LINES:]) if out else None
