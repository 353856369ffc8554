"""Where a run's batches go: the local store, followed by whoever reads it back.

The store is the run's one destination; an uploader to a server is a ``Follower`` of it,
woken when the run's status changes and given time to catch up when the run ends.

A batch the store refuses is never dropped whole; what happens depends on why it failed:

* **The store refuses every write** (a full disk, a lock held past the busy timeout, an I/O
  error, a corrupt file: ``store_refuses``).  The batch is kept in memory and each later
  batch joins it, so order is kept; every commit tries again, and once the store accepts
  writes the kept data goes in first, in one transaction.  Memory is bounded: past
  ``max_kept_records`` points and events (``MAX_KEPT_RECORDS``), the kept points and events
  are appended to a file in the store's ``spill/`` directory (``store.pack_batch``; counted
  as ``LossReason.STORE_SPILLED``, or ``STORE_FAILED`` if even that fails) while the small
  parts (metadata, tags, alerts, status, ...) stay in memory.  At close, whatever is still
  kept is spilled whole, status included.
* **A record is at fault** (a string UTF-8 cannot encode, a value SQLite cannot bind): the
  batch is written in parts, halving every run of parts that fails, so that only the
  records that cannot be written at all are dropped (``STORE_FAILED``) and everything else
  in the batch is written.

Stderr gets one line when the store starts refusing writes, one when it accepts them again,
one the first time data is spilled, one per batch that had a record dropped (the first
``MAX_DROP_MESSAGES``), and one at close if anything did not reach the store.  Every loss
recorded here goes into the run's metadata (``simvue.losses``) with the next write the
store accepts; ``complete`` says whether everything so far reached the store.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from .._util import merge_dicts, open_private, private_directory, safe_filename
from ..losses import LossCounter, LossReason
from ..store import SPILL_DIRECTORY, STORE_SPILL_SUFFIX, Store, StoreBatch, pack_batch

# Points and events kept in memory while the store refuses writes (about 32 bytes a point):
# past this the oldest go to the spill file.
MAX_KEPT_RECORDS = 1_000_000
# Batches with a record dropped that get a line on stderr each; later ones are only counted.
MAX_DROP_MESSAGES = 5
log = logging.getLogger(__name__)


class Follower(Protocol):
    """Reads the run back from the store as it is written (the uploader to a server)."""

    def wake(self) -> None:
        """The run's status changed in the store: act on it now."""

    def finish(self, timeout_s: float) -> bool:
        """The run has ended in the store; returns whether it caught up within ``timeout_s``."""


def store_refuses(exc: BaseException) -> bool:
    """Whether ``exc`` means the store refuses any write for now, whatever the batch holds:
    SQLITE_FULL, BUSY, LOCKED, IOERR, READONLY, CANTOPEN (``OperationalError``), a corrupt
    database (a bare ``DatabaseError``), no memory, an OS error.  Anything else (a string
    UTF-8 cannot encode, a constraint, a value SQLite cannot bind) is a record at fault."""
    return isinstance(exc, (sqlite3.OperationalError, MemoryError, OSError)) or type(exc) is sqlite3.DatabaseError


def _say(line: str) -> None:
    """One line on stderr, written at once (no buffering; never raises)."""
    try:
        os.write(2, f"{line}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


class RunWriter:
    """Writes run ``run_id``'s batches to ``store``, one transaction each; owns the store
    connection from here on.  What happens to a batch the store refuses: see the module's
    docstring."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        losses: LossCounter,
        followers: Sequence[Follower] = (),
        *,
        run_name: str | None = None,
        max_kept_records: int | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.run_name = run_name or run_id
        self.losses = losses
        self.followers = list(followers)
        self.max_kept_records = MAX_KEPT_RECORDS if max_kept_records is None else max_kept_records
        self.spill_path = store.directory / SPILL_DIRECTORY / f"{safe_filename(self.run_name)}-{run_id}{STORE_SPILL_SUFFIX}"
        self.spilled = 0  # records written to the spill file instead of the store
        self.dropped = 0  # records neither stored nor spilled
        self._kept: StoreBatch | None = None  # what the store refused, waiting for it
        self._refusing = False  # the store refuses writes (said once until it accepts them)
        self._spill_said = False
        self._drop_messages = 0
        self._losses_changed = False  # losses to put in the run's metadata at the next write

    @property
    def complete(self) -> bool:
        """Whether everything given to ``write`` so far is in the store: nothing waiting in
        memory for the store to accept writes, nothing spilled, nothing dropped."""
        return self._kept is None and not self.spilled and not self.dropped

    @property
    def holds_nothing(self) -> bool:
        """Whether every batch given so far is in the store or dealt with (spilled, or
        dropped as unwritable): none waits in memory for the store to accept writes."""
        return self._kept is None

    def write(self, batch: StoreBatch) -> None:
        """Write ``batch``, after whatever the store refused before it; never raises."""
        try:
            self._write(batch)
        except Exception as exc:  # noqa: BLE001 - a fault here must not end the aggregator
            kept, self._kept = self._kept, None
            lost = (kept or batch).record_count
            self._lose(lost, f"could not be written ({exc!r})")

    def _write(self, batch: StoreBatch) -> None:
        if self._kept is not None:
            self._kept.extend(batch)  # kept until written, so that ``complete`` stays False
            batch = self._kept
        if self._losses_changed:
            self._add_losses(batch)
        rest = self._attempt(batch)
        if rest is None and self._losses_changed:
            rest = self._attempt(self._add_losses(StoreBatch()))  # records dropped from this batch
        self._keep(rest)

    def _add_losses(self, batch: StoreBatch) -> StoreBatch:
        """``batch`` with the run's loss counts (totals, so a later count replaces an earlier)."""
        self._losses_changed = False
        batch.metadata = merge_dicts(batch.metadata, {"simvue": {"losses": self.losses.snapshot()}})
        return batch

    def _attempt(self, batch: StoreBatch) -> StoreBatch | None:
        """Write ``batch``; returns what the store refused to take for now (None: all of it
        was written, or dropped as unwritable)."""
        try:
            self.store.write(self.run_id, batch)
        except Exception as exc:  # noqa: BLE001 - sorted out below
            if store_refuses(exc):
                self._refused(exc)
                return batch
            return self._write_in_parts(batch)
        self._written(batch)
        return None

    def _write_in_parts(self, batch: StoreBatch) -> StoreBatch | None:
        """A record of ``batch`` is at fault: write the batch in parts, halving every run of
        parts that fails, and drop the single parts that still fail.  Returns the parts not
        written because the store started refusing writes meanwhile (None: none)."""
        dropped: list[tuple[StoreBatch, Exception]] = []
        todo: deque[list[StoreBatch]] = deque([batch.parts()])
        rest: StoreBatch | None = None
        while todo:
            run = todo.popleft()
            part = run[0] if len(run) == 1 else StoreBatch.joined(run)
            try:
                self.store.write(self.run_id, part)
            except Exception as exc:  # noqa: BLE001 - sorted out below
                if store_refuses(exc):
                    self._refused(exc)
                    rest = StoreBatch.joined([p for waiting in (run, *todo) for p in waiting])
                    break
                if len(run) == 1:
                    dropped.append((part, exc))
                else:
                    half = len(run) // 2
                    todo.extendleft((run[half:], run[:half]))  # the first half first
                continue
            self._written(part)
        if dropped:
            lost = StoreBatch.joined([part for part, _ in dropped])
            count = lost.record_count
            self.dropped += count
            self.losses.record(LossReason.STORE_FAILED, count)
            self._losses_changed = True
            if self._drop_messages < MAX_DROP_MESSAGES:
                self._drop_messages += 1
                first = dropped[0][1]
                more = "" if self._drop_messages < MAX_DROP_MESSAGES else "; from now on such drops are only counted"
                _say(
                    f"simvue: run {self.run_name!r}: the store cannot take {lost.describe()}"
                    f" ({type(first).__name__}: {first}); dropped and counted in simvue.losses.store_failed,"
                    f" the rest of the batch was written{more}"
                )
        return rest

    def _refused(self, exc: Exception) -> None:
        if not self._refusing:
            self._refusing = True
            _say(
                f"simvue: the store {self.store.path} refuses writes ({exc}); run {self.run_name!r} keeps its data in"
                f" memory (up to {self.max_kept_records} points and events, then in {self.spill_path.parent}) and"
                " writes it when the store accepts writes again"
            )

    def _written(self, batch: StoreBatch) -> None:
        if self._refusing:
            self._refusing = False
            spilled = f"; {self.spilled} records went to {self.spill_path}" if self.spilled else ""
            _say(f"simvue: the store {self.store.path} accepts writes again: the data of run {self.run_name!r} is written{spilled}")
        if log.isEnabledFor(logging.DEBUG):
            for _, message, level in batch.events:
                if level in ("error", "warning"):
                    log.debug("run %s: %s", self.run_id, message)
        if batch.status is not None or batch.ended is not None:
            for follower in self.followers:
                follower.wake()

    def _keep(self, batch: StoreBatch | None) -> None:
        """Keep what the store refused, in memory up to the bound, the bulk of it spilled past it."""
        if batch is not None and batch.point_count + len(batch.events) > self.max_kept_records:
            bulk, batch = batch.split_bulk()
            self._spill(bulk)
        self._kept = batch

    def _spill(self, batch: StoreBatch, *, at_close: bool = False) -> None:
        """Append ``batch`` to the run's spill file, or count it lost if that fails too."""
        count = batch.record_count
        if not count:
            return  # a heartbeat alone: nothing that anyone would miss
        try:
            payload = pack_batch(self.run_id, batch)
            private_directory(self.spill_path.parent)
            fd = open_private(self.spill_path, os.O_WRONLY | os.O_APPEND)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(fd, view):]
                except BaseException:
                    os.ftruncate(fd, start)  # never half a batch in the file: it would hide the rest
                    raise
            finally:
                os.close(fd)
        except Exception as exc:  # noqa: BLE001 - counted as lost
            self._lose(count, f"could not be spilled to {self.spill_path} either ({exc})")
            return
        self.spilled += count
        self.losses.record(LossReason.STORE_SPILLED, count)
        self._losses_changed = True
        if not self._spill_said and not at_close:
            self._spill_said = True
            _say(
                f"simvue: run {self.run_name!r}: over {self.max_kept_records} points and events are waiting for the"
                f" store; they go to {self.spill_path} (counted in simvue.losses.store_spilled)"
            )

    def _lose(self, count: int, why: str) -> None:
        self.dropped += count
        self.losses.record(LossReason.STORE_FAILED, count)
        self._losses_changed = True
        if self._drop_messages < MAX_DROP_MESSAGES:
            self._drop_messages += 1
            _say(f"simvue: run {self.run_name!r}: {count} records {why}; they are lost (simvue.losses.store_failed)")

    def close(self, timeout_s: float) -> None:
        """Spill what the store still refuses, say in one line what did not reach the store,
        close the store, then give each follower ``timeout_s`` to catch up."""
        kept, self._kept = self._kept, None
        if kept is not None:
            self._spill(kept, at_close=True)
        if self.spilled or self.dropped:
            parts = [f"{self.spilled} spilled to {self.spill_path}"] if self.spilled else []
            parts += [f"{self.dropped} lost"] if self.dropped else []
            _say(
                f"simvue: run {self.run_name!r}: {self.spilled + self.dropped} records did not reach the store"
                f" {self.store.path}: {', '.join(parts)}"
            )
        self.store.close()
        for follower in self.followers:
            follower.finish(timeout_s)
