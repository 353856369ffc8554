"""Metrics whose values are arrays, on grids: ``Run.assign_metric_to_grid`` and the array
half of ``Run.log_metrics``.

A grid names the axes an array metric lies on: one list of ticks and one label per axis (1 or
2 axes).  Each process keeps the definitions it made or inherited (through ``fork`` or a
pickled ``Run``) and sends a ``GRID`` record before the first array of each metric, so the
aggregator knows every sender's grid without waiting for another process.  It stores each
distinct definition once, namespaces or reduces the arrays element-wise like numbers (see
``simvue.aggregator.merge``), and the uploader sends grids and arrays in the Simvue server's
format.  An array logged without a grid gets the one the upstream client gives it: named after
the metric, ticks evenly spaced from 0 to 1, labels ``axis_0``, ``axis_1``.
"""

from __future__ import annotations

import time as _time
from collections import deque
from typing import Any

from . import validation
from ._run_parts import RunParts
from .errors import SimvueError, SimvueValueError
from .transport.protocol import GridRecord, RecordKind

_TENSOR = RecordKind.TENSOR
_METRICS = RecordKind.METRICS


def default_axes(shape: tuple[int, ...]) -> tuple[list[list[float]], list[str]]:
    """The grid of an array logged without one: ``len`` ticks from 0 to 1 per axis, the
    grid's first axis along the array's last (as the upstream client makes it)."""
    axes = [[index / (n - 1) if n > 1 else 0.0 for index in range(n)] for n in reversed(shape)]
    return axes, [f"axis_{index}" for index in range(len(shape))]


class GridsMixin(RunParts):
    """``assign_metric_to_grid``, and the arrays ``log_metrics`` hands over."""

    def assign_metric_to_grid(
        self,
        *,
        metric_name: str,
        grid_name: str | None = None,
        axes_ticks: Any = None,
        axes_labels: list[str] | None = None,
    ) -> bool:
        """Put metric ``metric_name`` on grid ``grid_name`` (default: the metric's name),
        defining the grid if ``axes_ticks`` (one list of ticks per axis, 1 or 2 axes, or a
        2-d ``numpy`` array) and ``axes_labels`` are given; without them the grid must have
        been defined in this process.  Values of the metric are then arrays whose shape
        matches the grid: the grid's first axis along the array's last (a row holds x), or
        along its first.  Returns whether the assignment was recorded."""
        try:
            metric = validation.metric_name(metric_name)
            name = metric if grid_name is None else grid_name
            if axes_ticks is not None or axes_labels is not None:
                if axes_ticks is None or axes_labels is None:
                    raise SimvueValueError(
                        f"grid {name!r}: give both axes_ticks and axes_labels to define it, or neither to use the"
                        " grid already defined"
                    )
                name, axes, labels = validation.grid(name, axes_ticks, axes_labels)
            elif name in self._grid_defs:
                axes, labels = self._grid_defs[name]
            else:
                raise SimvueValueError(f"grid {name!r} is not defined: give its axes_ticks and axes_labels")
        except SimvueError as exc:
            return self._fail("assign_metric_to_grid", exc)
        if self._grid_defs.get(name, (axes, labels)) != (axes, labels):
            # redefined: the metrics already on it are announced again with the new axes
            self._grids_sent.difference_update(m for m, g in self._metric_grids.items() if g == name)
        self._grid_defs[name] = (axes, labels)
        self._metric_grids[metric] = name
        self._grids_sent.discard(metric)
        record = self._grid_record(metric)
        if not self._record(record, "assign_metric_to_grid"):
            return False
        self._grids_sent.add(metric)
        return True

    def _grid_record(self, metric: str) -> GridRecord:
        name = self._metric_grids[metric]
        axes, labels = self._grid_defs[name]
        return GridRecord(RecordKind.GRID, metric, name, axes, labels)

    def _log_arrays(
        self,
        buffer: deque[tuple],
        numbers: dict[str, float | int],
        arrays: dict[str, tuple[tuple[int, ...], bytes]],
        step: Any,
        time: Any,
        timestamp: Any,
    ) -> bool:
        """The rest of a ``log_metrics`` call that holds arrays (already validated)."""
        auto_step = next(self._steps)
        try:
            step = auto_step if step is None else validation.step(step)
            time = None if time is None else validation.elapsed_time(time)
            stamp = None if timestamp is None else validation.timestamp(timestamp)
            for name, (shape, _) in arrays.items():
                grid = self._metric_grids.get(name, name)
                if grid in self._grid_defs:
                    axes = self._grid_defs[grid][0]
                    if not validation.fits_grid(shape, axes):
                        if name in self._metric_grids:
                            raise SimvueValueError(
                                f"metric {name!r} has shape {list(shape)}, which does not fit its grid {grid!r}"
                                f" (axes of {[len(axis) for axis in axes]} ticks)"
                            )
                        # a grid named like the metric, not assigned to it: the array gets its own
                        self._grid_defs[name] = default_axes(shape)
                else:
                    self._grid_defs[name] = default_axes(shape)
        except SimvueError as exc:
            return self._fail("log_metrics", exc)
        for name in arrays:
            if name not in self._metric_grids:
                self._metric_grids[name] = name
            if name not in self._grids_sent:
                buffer.append(self._grid_record(name))
                self._grids_sent.add(name)
        now = _time.time()
        if time is None:
            time = now - self._t0
        if stamp is None:
            stamp = now
        for name, (shape, data) in arrays.items():
            buffer.append((_TENSOR, step, time, stamp, name, list(shape), data))
        if numbers:
            buffer.append((_METRICS, step, time, stamp, numbers))
        if len(buffer) >= self._max_buffered and self._pipe is not None:
            self._pipe.buffer_full(self._max_buffered, self._full_wait_s)
        return True
