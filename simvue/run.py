"""``Run``: the handle every process uses to record one run.

Every rank of an MPI job and every worker of a pool has its own ``Run``; they all feed one
run.  Calls are cheap: ``log_metrics`` validates, stamps and appends to an in-memory buffer
(no I/O, no encoding, no lock); a background thread ships the buffer to the run's
aggregator.  See ``docs/architecture.md`` for the whole pipeline.
"""

from __future__ import annotations

import math
import os
import threading
import time as _time
import traceback
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import lifecycle, session, topology, validation
from ._util import log_debug_to_stderr
from .alerting import AlertsMixin
from .api import config as api_config
from .artifacts import ArtifactsMixin
from .compat import CompatMixin
from .config import Settings, from_environment, normalise_reduce
from .errors import ErrorPolicy, SimvueError, SimvueRunError, SimvueTypeError, SimvueValueError, SimvueWarning
from .grids import GridsMixin
from .names import default_name
from .processes import ProcessesMixin
from .transport.protocol import (
    EventRecord,
    FolderRecord,
    MetadataRecord,
    RecordKind,
    StatusRecord,
    TagsRecord,
)
from .transport.rendezvous import AggregatorAddress

_now = _time.time
_isfinite = math.isfinite
_METRICS = RecordKind.METRICS
_INT64_MIN, _INT64_MAX = validation.INT64_MIN, validation.INT64_MAX

NEW, ACTIVE, CLOSED, DISABLED = "new", "active", "closed", "disabled"


def _plain_finite(values: Any) -> bool:
    """True when every value is a plain float, or an int that fits in 64 bits, and none is
    inf or nan (the fast check; anything else takes ``validation.split_metrics``)."""
    for value in values:
        cls = value.__class__
        if cls is not float and (cls is not int or not _INT64_MIN <= value <= _INT64_MAX):
            return False
    return _isfinite(sum(values))


class Run(CompatMixin, ArtifactsMixin, AlertsMixin, GridsMixin, ProcessesMixin):
    """A tracked run, as seen from this process.

    ``Run()`` does no I/O.  ``init()`` creates the run (in the aggregator's process) or joins
    it (every other rank or worker).  A ``Run`` can be handed to ``multiprocessing`` workers,
    as an argument or by inheritance; in a worker it joins the run on first use.
    """

    def __init__(
        self,
        mode: str | None = None,
        abort_callback: Any = None,
        server_token: str | None = None,
        server_url: str | None = None,
        debug: bool = False,
    ) -> None:
        """``mode``: ``online`` (the default; the local store alone when no server is
        configured), ``offline`` or ``disabled``; unset, ``$SIMVUE_MODE`` or the config file
        decide.  ``abort_callback(run)`` is called when the server asks the run to stop.
        ``debug=True`` writes what simvue does in this process (which part it plays, where
        it connects, how the run ends, what it sends to a server) to stderr."""
        self._lock = threading.RLock()
        self._abort_callback = abort_callback
        self._server_url = server_url
        self._server_token = server_token
        self._aborted = False
        try:
            self._settings: Settings = from_environment()
            environment_error = None
        except SimvueError as exc:
            self._settings, environment_error = Settings(), exc
        self._errors = ErrorPolicy(self._settings.suppress_errors)
        self._state = NEW
        self._status: str | None = None  # the run's status as this process knows it (``status``)
        self._server: api_config.ServerConfig | None = None
        self._mode = mode
        self._name: str | None = None
        self._id: str | None = None
        self._folder = "/"
        self._address: AggregatorAddress | None = None
        self._t0 = _now()
        self._grid_defs: dict[str, tuple[list[list[float]], list[str]]] = {}  # grid name -> axes, labels
        self._metric_grids: dict[str, str] = {}  # metric -> grid name
        self._reset_process_state()
        if environment_error is not None:
            self._fail("config", environment_error)
        if debug is True:
            log_debug_to_stderr()
        elif debug is not False:
            self._fail("debug", SimvueTypeError(f"debug must be True or False, not {debug!r}"))
        if mode is not None and mode not in api_config.MODES:
            self._fail("mode", SimvueValueError(f"mode must be one of {', '.join(api_config.MODES)}, not {mode!r}"))
        elif mode == "disabled":
            self._state = DISABLED
        lifecycle.track(self)

    def _reset_process_state(self) -> None:
        self._buffer: deque[tuple] | None = None  # the hot path's deque; None until this process has joined
        self._pipe: session.Pipe | None = None
        self._membership: session.Membership | None = None
        self._steps: Iterator[int] = iter(())  # the membership's step counter, once joined
        self._known_names: frozenset[str] = frozenset()
        self._grids_sent: set[str] = set()  # metrics whose grid this process has announced
        self._max_buffered = self._settings.max_buffered_records
        self._full_wait_s = self._settings.close_timeout_s if self._settings.queue_blocking else None
        self._closed_here = False

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or (issubclass(exc_type, SystemExit) and exc is not None and exc.code in (0, None)):
            self.close()
            return
        status = "terminated" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        if self._aborted and issubclass(exc_type, KeyboardInterrupt):
            self._close(status)
            # Exit with a status instead of dying by SIGINT: an MPI launcher kills the whole
            # job when one rank dies by a signal, and rank 0 still has the run to finish.
            raise SystemExit(f"simvue: run {self._name!r} stopped: an abort was requested (by the server or an alert)") from None
        if self._state == ACTIVE and not self._closed_here:
            message = "".join(traceback.format_exception(exc_type, exc, tb))
            self._record(EventRecord(RecordKind.EVENT, _now(), f"{exc_type.__name__}: {exc}\n{message}", "error"))
        self._close(status)

    # -- configuration and start ----------------------------------------------------------

    def config(self, **options: Any) -> bool:
        """Set options before ``init``: ``suppress_errors``, ``resources_metrics_interval``,
        ``reduce``, ``store`` and the timing fields of ``simvue.config.Settings``."""
        try:
            self._settings = self._settings.replace(**options)
        except SimvueError as exc:
            return self._fail("config", exc)
        self._errors.suppress_errors = self._settings.suppress_errors
        self._max_buffered = self._settings.max_buffered_records
        self._full_wait_s = self._settings.close_timeout_s if self._settings.queue_blocking else None
        return True

    def init(
        self,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        description: str | None = None,
        folder: str = "/",
        status: str = "running",
        *,
        running: bool = True,
        reduce: Any = None,
        timeout: float | None = None,
        notification: str = "none",
        retention_period: str | None = None,
        visibility: Any = None,
        no_color: bool = False,
        record_shell_vars: Any = None,
    ) -> bool:
        """Create this job's run, or join it from another rank or worker.

        Under MPI every rank calls ``init``; rank 0 creates the run (its arguments define
        it) and the other ranks join it, waiting at most ``rendezvous_timeout_s``.
        ``reduce`` selects cross-rank reduction, e.g. ``{"loss": ["mean", "max"]}``.

        For a server: ``notification`` (``none``, ``all``, ``error``, ``lost``: when it
        e-mails), ``retention_period`` (``"30 days"``: when it may delete the run) and
        ``visibility`` (``"public"``, ``"tenant"`` or a list of user names).  They are kept
        with the run in the local store and sent with it.  ``record_shell_vars`` (names or
        globs, ``["SLURM_*"]``) copies those environment variables into the metadata under
        ``shell``.  ``no_color`` is accepted: simvue prints no colours.
        """
        with self._lock:
            if self._state == DISABLED:
                return True
            if self._state != NEW:
                return self._fail("init", SimvueRunError("init() was already called on this run"))
            try:
                if not running and status == "running":
                    status = "created"
                shell = validation.shell_variables(record_shell_vars, os.environ)
                if not isinstance(no_color, bool):
                    raise SimvueTypeError(f"no_color must be True or False, not {no_color!r}")
                checked_metadata = validation.metadata(metadata or {})
                fields = {
                    "name": default_name() if name is None else validation.run_name(name),
                    "metadata": {**checked_metadata, "shell": shell} if shell else checked_metadata,
                    "tags": validation.tags(tags or []),
                    "description": validation.description(description),
                    "folder": validation.folder(folder),
                    "status": validation.status(status),
                    "options": {
                        "ttl": validation.retention_period(retention_period),
                        "visibility": validation.visibility(visibility),
                        "notifications": {"state": validation.notification(notification)},
                        **({"storage_id": self._settings.storage_id} if self._settings.storage_id else {}),
                    },
                    "now": _now(),
                }
                if fields["status"] not in ("running", "created"):
                    raise SimvueValueError(f"a run starts as 'running' or 'created', not {status!r}")
                if reduce is not None:
                    self._settings = self._settings.replace(reduce=normalise_reduce(reduce))
                if timeout is not None:
                    self._settings = self._settings.replace(run_heartbeat_timeout_s=timeout)
            except SimvueError as exc:
                return self._fail("init", exc)
            return self._open(fields, "init")

    def reconnect(self, run_id: str) -> bool:
        """Resume a run left in the ``created`` state (``init(running=False)``) and record
        into it from this process; under MPI every rank calls it, as with ``init``."""
        with self._lock:
            if self._state == DISABLED:
                return True
            if self._state != NEW:
                return self._fail("reconnect", SimvueRunError("reconnect() needs a Run that was not started"))
            if not isinstance(run_id, str) or not run_id:
                return self._fail("reconnect", SimvueValueError(f"reconnect() needs a run id or name, not {run_id!r}"))
            fields: dict[str, Any] = {
                "name": run_id, "metadata": {}, "tags": [], "description": None, "folder": "/",
                "status": "running", "now": _now(), "resume_id": run_id,
            }
            return self._open(fields, "reconnect")

    def _open(self, fields: dict[str, Any], call: str) -> bool:
        """Create, resume or join the run ``fields`` describes (the end of init/reconnect)."""
        try:
            server = api_config.resolve(self._mode, self._server_url, self._server_token)
        except SimvueError as exc:
            self._fail("config", exc)
            server = api_config.ServerConfig()
        self._server = server
        if server.mode == "disabled":
            self._state = DISABLED
            return True
        try:
            membership = session.open_run(fields, self._settings, topology.detect(), server)
        except Exception as exc:  # noqa: BLE001 - e.g. an unwritable store, or no such run
            self._state = DISABLED
            return self._fail(call, SimvueRunError(f"could not start the run: {exc}"))
        self._join(membership)
        self._folder = fields["folder"]
        self._status = fields["status"]
        return True

    def _join(self, membership: session.Membership) -> None:
        membership.handles.add(self)
        self._membership = membership
        self._steps = membership.steps
        self._pipe = membership.pipe
        self._name = membership.name
        self._id = membership.run_id
        self._address = membership.address
        self._t0 = membership.started
        self._state = ACTIVE
        self._buffer = membership.pipe.buffer

    @property
    def name(self) -> str | None:
        """The run's name, the same on every rank and worker."""
        return self._name

    @property
    def id(self) -> str | None:
        """The run's id in the store."""
        return self._id

    @property
    def aborted(self) -> bool:
        """True once the server has asked this run to stop (every rank and worker sees it)."""
        return self._aborted

    @property
    def rank(self) -> int:
        """This process's rank in its job (0 for a single process), under every launcher
        simvue knows: mpiexec (MPICH, Open MPI), srun, torchrun and its kin.  A pool worker
        has the rank of the process that started it.  Use it instead of launcher variables."""
        return topology.detect().rank

    @property
    def size(self) -> int:
        """How many ranks the job has (1 for a single process)."""
        return topology.detect().size

    @property
    def local_rank(self) -> int:
        """This process's rank among the job's ranks on this node."""
        return topology.detect().local_rank

    # -- the hot path ---------------------------------------------------------------------

    def log_metrics(
        self,
        metrics: dict[str, int | float | Any],
        step: int | None = None,
        time: float | None = None,
        timestamp: str | None = None,
    ) -> bool:
        """Record metric values: numbers, or arrays (``numpy`` arrays or nested lists, 1 or 2
        axes, at most 50,000 values) for metrics on a grid (``assign_metric_to_grid``).

        ``step`` defaults to a per-process counter that increases on every call; ``time``
        defaults to seconds since the run started; ``timestamp`` (UTC,
        ``YYYY-MM-DDThh:mm:ss.ffffffZ``) defaults to now.  Never blocks, except briefly when
        ``max_buffered_records`` records are waiting (then the oldest are spilled to disk).
        """
        buffer = self._buffer
        if buffer is None:
            buffer = self._process_buffer("log_metrics")
            if buffer is None:
                return self._state == DISABLED
        if (
            metrics.__class__ is not dict
            or not metrics
            or not metrics.keys() <= self._known_names
            or not _plain_finite(metrics.values())
        ):
            checked = self._checked_metrics(metrics)
            if checked is None:
                return False
            if checked.__class__ is tuple:  # it holds arrays
                numbers, arrays = checked
                return self._log_arrays(buffer, numbers, arrays, step, time, timestamp)
            metrics = checked
        else:
            metrics = metrics.copy()
        auto_step = next(self._steps)
        stamp = None
        if step is not None or time is not None or timestamp is not None:
            try:
                step = auto_step if step is None else validation.step(step)
                time = None if time is None else validation.elapsed_time(time)
                stamp = None if timestamp is None else validation.timestamp(timestamp)
            except SimvueError as exc:
                return self._fail("log_metrics", exc)
        else:
            step = auto_step
        now = _now()
        # A MetricsRecord, built as a plain tuple of its layout: the cheapest object there is.
        buffer.append(
            (_METRICS, step, now - self._t0 if time is None else time, now if stamp is None else stamp, metrics)
        )
        if len(buffer) >= self._max_buffered and self._pipe is not None:
            self._pipe.buffer_full(self._max_buffered, self._full_wait_s)
        return True

    log = log_metrics  # the older ``Simvue()`` client's name, without an extra call

    def _checked_metrics(self, metrics: Any) -> Any:
        """The call's numbers, or ``(numbers, arrays)`` if it holds arrays; None if invalid."""
        try:
            checked, arrays = validation.split_metrics(metrics)
        except SimvueError as exc:
            self._fail("log_metrics", exc)
            return None
        self._known_names = self._known_names | checked.keys()
        return (checked, arrays) if arrays else checked

    def _process_buffer(self, call: str):
        """The buffer to append to, joining the run first if this process has not yet."""
        with self._lock:
            if self._buffer is not None:
                return self._buffer
            if self._state == DISABLED:
                return None
            if self._state == NEW:
                self._fail(call, SimvueRunError(f"{call}() called before init()"))
                return None
            if self._state == CLOSED or self._closed_here:
                self._fail(call, SimvueRunError(f"{call}() called on a closed run"))
                return None
            if self._address is None:
                return None
            # A worker that inherited or was handed this run: join it on first use.
            try:
                membership = session.join(self._address, self._settings, topology.detect(), role="worker")
            except Exception as exc:  # noqa: BLE001
                self._fail(call, SimvueRunError(f"could not join run {self._name!r}: {exc}"))
                return None
            self._join(membership)
            return self._buffer

    # -- everything else ------------------------------------------------------------------

    def log_event(self, message: str, timestamp: str | None = None, log_level: str = "info") -> bool:
        """Record a text event."""
        try:
            record: tuple = EventRecord(
                RecordKind.EVENT,
                _now() if timestamp is None else validation.timestamp(timestamp),
                validation.event_message(message),
                validation.event_level(log_level),
            )
        except SimvueError as exc:
            return self._fail("log_event", exc)
        return self._record(record, "log_event")

    def update_metadata(self, metadata: Mapping[str, Any]) -> bool:
        """Merge ``metadata`` into the run's metadata (nested dicts merge)."""
        try:
            record = MetadataRecord(RecordKind.METADATA, validation.metadata(metadata))
        except SimvueError as exc:
            return self._fail("update_metadata", exc)
        return self._record(record, "update_metadata")

    def update_tags(self, tags: Iterable[str]) -> bool:
        """Add ``tags`` to the run's tags."""
        try:
            record = TagsRecord(RecordKind.TAGS, validation.tags(tags))
        except SimvueError as exc:
            return self._fail("update_tags", exc)
        return self._record(record, "update_tags")

    def set_status(self, status: str) -> bool:
        """Set the run's status; a final one (completed, failed, terminated, lost) is applied
        when the run ends."""
        try:
            record = StatusRecord(RecordKind.STATUS, validation.status(status))
        except SimvueError as exc:
            return self._fail("set_status", exc)
        if not self._record(record, "set_status"):
            return False
        self._status = record.status
        return True

    def set_folder_details(
        self,
        path: str | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        description: str | None = None,
    ) -> bool:
        """Set metadata, tags and a description on a folder (default: the run's folder)."""
        if isinstance(path, Mapping):  # the newer form: set_folder_details(metadata, tags, description)
            path, metadata = None, path
        try:
            record = FolderRecord(
                RecordKind.FOLDER,
                validation.folder(self._folder if path is None else path),
                None if metadata is None else validation.metadata(metadata),
                None if tags is None else validation.tags(tags),
                validation.description(description),
            )
        except SimvueError as exc:
            return self._fail("set_folder_details", exc)
        return self._record(record, "set_folder_details")

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything this process recorded is in the store (or with the
        aggregator); returns False if ``timeout_s`` passed first."""
        if self._buffer is None or self._pipe is None:
            return self._state == DISABLED
        return self._pipe.flush(timeout_s)

    def close(self) -> bool:
        """Flush everything (acknowledged) and end this process's part of the run.

        In the run's own process (single process, pool parent, MPI rank 0) this also ends the
        run, once every worker has drained; under MPI, other ranks still running finish the
        run in the background and the process waits for them at exit.  Idempotent.
        """
        return self._close(None)

    def _close(self, status: str | None) -> bool:
        # Processes from add_process first (waited for, or stopped when the run ends early):
        # their ends and outputs are recorded while the run still takes records.
        self._end_processes(kill=status is not None)
        with self._lock:
            if self._state in (NEW, DISABLED) or self._closed_here:
                return True
            self._closed_here = True
            if self._status not in validation.FINAL_STATUSES:
                self._status = status or "completed"
            self._state = CLOSED
            membership = self._membership
            self._buffer = None
        if membership is None:  # inherited, never used in this process
            return True
        try:
            done = membership.close(status, dict(self._errors.dropped))
        except Exception as exc:  # noqa: BLE001
            return self._fail("close", SimvueRunError(f"error while closing: {exc}"))
        refused = membership.upload_error
        if refused is not None and not self._errors.suppress_errors:
            # Already reported on stderr as it happened; strict mode also raises it here.
            raise SimvueRunError(f"the run was not fully sent: {refused}")
        return done

    def _detach(self) -> None:
        """The shared membership was closed (by this or another handle): stop recording."""
        self._buffer = None
        self._closed_here = True

    # -- helpers --------------------------------------------------------------------------

    def _record(self, record: tuple, call: str = "record") -> bool:
        buffer = self._buffer
        if buffer is None:
            buffer = self._process_buffer(call)
            if buffer is None:
                return self._state == DISABLED
        buffer.append(record)
        return True

    # -- abort requests from the server (see session.Membership.abort) -------------------

    def _on_abort(self) -> None:
        self._aborted = True
        if self._abort_action() != "ignore":
            self._stop_processes_on_abort()
        if self._abort_callback is not None:
            try:
                self._abort_callback(self)
            except Exception as exc:  # noqa: BLE001 - the user's callback must not stop the abort
                warnings.warn(f"simvue: the abort callback raised {exc!r}", SimvueWarning, stacklevel=2)

    def _abort_action(self) -> str:
        """``abort_on_alert``: ``terminate`` (default; stop the process, the run ends
        ``terminated``), ``run`` (end the run, let the process go on) or ``ignore``."""
        return self._settings.abort_on_alert

    def _end_quietly(self) -> None:
        """Close, and ignore later calls without warnings (the ``run`` abort action)."""
        self.close()
        self._state = DISABLED

    def _record_status(self, status: str) -> None:
        self._record(StatusRecord(RecordKind.STATUS, status), "set_status")

    def _fail(self, kind: str, error: SimvueError) -> bool:
        self._errors.report(kind, error)
        return False

    # -- lifecycle hooks (see simvue.lifecycle) -------------------------------------------

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._reset_process_state()

    def _close_at_exit(self, status: str | None, stop_waiting_after_s: float | None = None) -> None:
        pass  # memberships, not handles, are flushed at exit (see session.Membership)

    # -- pickling: only what a worker needs to join ---------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            "settings": self._settings,
            "state": self._state if self._state != ACTIVE or self._address else DISABLED,
            "name": self._name,
            "id": self._id,
            "folder": self._folder,
            "address": self._address.to_json() if self._address else None,
            "t0": self._t0,
            "mode": self._mode,
            "grids": self._grid_defs,
            "metric_grids": self._metric_grids,
            "status": self._status,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.RLock()
        self._settings = state["settings"]
        self._errors = ErrorPolicy(self._settings.suppress_errors)
        self._state = state["state"]
        self._mode = state["mode"]
        self._name = state["name"]
        self._id = state["id"]
        self._folder = state["folder"]
        self._address = AggregatorAddress.from_json(state["address"]) if state["address"] else None
        self._t0 = state["t0"]
        self._grid_defs = state["grids"]
        self._metric_grids = state["metric_grids"]
        self._status = state.get("status")
        self._server = None
        self._abort_callback = None
        self._server_url = self._server_token = None
        self._aborted = False
        self._reset_process_state()
        lifecycle.track(self)

    def __repr__(self) -> str:
        return f"<simvue.Run name={self._name!r} state={self._state} pid={os.getpid()}>"
