"""Merging per-sender metrics into a run's series: namespaced or reduced.

Namespaced (the default) keeps each sender's series apart under its prefix (``rank3/loss``).
Reduced combines, per metric and step, the values of every sender into ``loss.mean``,
``loss.min``, ``loss.max``, ``loss.sum`` (whichever are configured) plus ``loss.count``.  A
step is written when every live sender has reported it and no expected rank is still to
join (a sender that has left is not waited for, but its values count), or ``wait_s`` after
its first value; a value arriving for a step already written is counted as late
(``LossReason.LATE_STEP``).  Array metrics are reduced the same way, element by element
(``simvue.aggregator.arrays``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..config import REDUCERS
from ..losses import LossCounter, LossReason

FINISHED_STEPS_REMEMBERED = 100_000

Emit = Callable[[str, int, float, float, Any], None]
# ``combine(op, values)``: the values of one step, one per sender, reduced by ``op``; None if
# they cannot be (arrays of different shapes).
Combine = Callable[[str, list[Any]], Any]


def combine_numbers(op: str, values: list[float]) -> float:
    return float(REDUCERS[op](values))


class _PendingStep:
    __slots__ = ("first_seen", "values", "time", "timestamp")

    def __init__(self, first_seen: float) -> None:
        self.first_seen = first_seen
        self.values: dict[str, Any] = {}
        self.time = 0.0
        self.timestamp = 0.0


class Reducer:
    """Cross-sender reduction of the metrics named in ``spec``.

    ``spec`` maps a metric name, or ``"*"`` for every metric, to its ops.  ``live_labels``
    is the (live, updated in place) set of labels of senders still running and ``missing``
    counts expected ranks that have not joined yet.  ``emit(name, step, time, timestamp,
    value)`` receives each reduced point, ``emit_count`` (default: ``emit``) each step's count
    of senders; ``combine`` reduces one step's values (default: numbers).
    """

    def __init__(
        self,
        spec: Mapping[str, tuple[str, ...]],
        *,
        wait_s: float,
        live_labels: set[str],
        missing: Callable[[], int],
        emit: Emit,
        losses: LossCounter,
        emit_count: Emit | None = None,
        combine: Combine = combine_numbers,
    ) -> None:
        self.spec = dict(spec)
        self.wait_s = wait_s
        self.live_labels = live_labels
        self.missing = missing
        self.emit = emit
        self.emit_count = emit_count or emit
        self.combine = combine
        self.losses = losses
        self._pending: dict[tuple[str, int], _PendingStep] = {}
        self._finished: OrderedDict[tuple[str, int], None] = OrderedDict()

    def ops_for(self, name: str) -> tuple[str, ...] | None:
        """The ops configured for ``name``; ``None`` if it is only namespaced."""
        ops = self.spec.get(name)
        if ops is None:
            ops = self.spec.get("*")
        return ops

    def add(self, label: str, name: str, step: int, time: float, timestamp: float, value: Any, now: float) -> None:
        key = (name, step)
        pending = self._pending.get(key)
        if pending is None:
            if key in self._finished:
                self.losses.record(LossReason.LATE_STEP)
                return
            pending = self._pending[key] = _PendingStep(now)
        pending.values[label] = value
        pending.time = max(pending.time, time)
        pending.timestamp = max(pending.timestamp, timestamp)
        # The length test is a cheap filter; the subset test is the rule.
        if len(pending.values) >= len(self.live_labels) and self._complete(pending):
            self._write(key, pending)

    def add_points(
        self, label: str, name: str, steps: Iterable[int], times: Iterable[float], timestamps: Iterable[float],
        values: Iterable[Any], now: float,
    ) -> None:
        """``add`` for one sender's points of ``name`` in columns, in order: the same rule, in
        one loop (a columnar DATA message's reduced metric)."""
        pending_steps, finished, live = self._pending, self._finished, self.live_labels
        for step, time, timestamp, value in zip(steps, times, timestamps, values):
            key = (name, step)
            pending = pending_steps.get(key)
            if pending is None:
                if key in finished:
                    self.losses.record(LossReason.LATE_STEP)
                    continue
                pending = pending_steps[key] = _PendingStep(now)
            reported = pending.values
            reported[label] = value
            if time > pending.time:
                pending.time = time
            if timestamp > pending.timestamp:
                pending.timestamp = timestamp
            if len(reported) >= len(live) and self._complete(pending):
                self._write(key, pending)

    def _complete(self, pending: _PendingStep) -> bool:
        return self.live_labels <= pending.values.keys() and not self.missing()

    def tick(self, now: float) -> None:
        """Write the steps that are complete or have waited long enough."""
        for key, pending in list(self._pending.items()):
            if self._complete(pending) or now - pending.first_seen >= self.wait_s:
                self._write(key, pending)

    def finish(self) -> None:
        """Write every pending step, complete or not."""
        for key, pending in sorted(self._pending.items(), key=lambda item: item[0][1]):
            self._write(key, pending)

    def _write(self, key: tuple[str, int], pending: _PendingStep) -> None:
        del self._pending[key]
        self._finished[key] = None
        if len(self._finished) > FINISHED_STEPS_REMEMBERED:
            self._finished.popitem(last=False)
        name, step = key
        values = list(pending.values.values())
        for op in self.ops_for(name) or ():
            if op in REDUCERS:
                value = self.combine(op, values)
                if value is None:
                    self.losses.record(LossReason.BAD_RECORD)
                else:
                    self.emit(f"{name}.{op}", step, pending.time, pending.timestamp, value)
        self.emit_count(f"{name}.count", step, pending.time, pending.timestamp, float(len(values)))
