"""Array metrics at the aggregator: which grid each sender's metric is on, which grid each
stored series is on, and element-wise reduction.

Each process announces a metric's grid (``GRID``) before its first array (``TENSOR``), so the
grid of every array is known when it arrives, whatever order the processes' messages come in.
Grids are kept once per distinct definition: the id is a digest of the name, ticks and
labels, so the same grid defined on every rank (or again after a reconnect) is one grid.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from typing import Any

from .. import validation
from ..config import REDUCERS
from ..store.sqlite import pack_column, unpack_column

_BYTES_PER_VALUE = 8

# one array value: (shape, little-endian float64 bytes)
Shaped = tuple[tuple[int, ...], bytes]


def grid_id(name: str, axes: list[list[float]], labels: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([name, axes, labels]).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:24]


class GridBook:
    """The grids a run's senders have announced.  ``on_grid`` returns the new grid to store
    (or None); ``grid_of`` the grid of a sender's metric; ``assign`` which stored series
    change grid."""

    def __init__(self) -> None:
        self._stored: set[str] = set()
        self._of_sender: dict[tuple[str, str], tuple[str, list[list[float]]]] = {}
        self._of_series: dict[str, str] = {}

    def on_grid(
        self, label: str, metric: Any, name: Any, axes: Any, labels: Any
    ) -> tuple[str, tuple[str, list[list[float]], list[str]] | None]:
        """``(grid id, (name, axes, labels) if the grid is new)``; raises on a malformed one."""
        metric = validation.metric_name(metric)
        name, axes, labels = validation.grid(name, axes, labels)
        identity = grid_id(name, axes, labels)
        self._of_sender[(label, metric)] = (identity, axes)
        if identity in self._stored:
            return identity, None
        self._stored.add(identity)
        return identity, (name, axes, labels)

    def grid_of(self, label: str, metric: str) -> tuple[str, list[list[float]]] | None:
        return self._of_sender.get((label, metric))

    def assign(self, series: list[str], identity: str) -> dict[str, str]:
        """The series among ``series`` whose grid is not yet ``identity``, now on it."""
        changed = {name: identity for name in series if self._of_series.get(name) != identity}
        self._of_series.update(changed)
        return changed


def checked_value(shape: Any, data: Any, axes: list[list[float]]) -> Shaped:
    """An array value that fits its grid, as ``(shape, data)``; ValueError otherwise."""
    if not (
        isinstance(shape, list) and all(n.__class__ is int and n > 0 for n in shape) and isinstance(data, bytes)
        and validation.fits_grid(shape, axes) and len(data) == _BYTES_PER_VALUE * math.prod(shape)
    ):
        raise ValueError("malformed array value")
    return tuple(shape), data


def combine_arrays(op: str, values: list[Shaped]) -> Shaped | None:
    """``op`` (mean, min, max, sum) of arrays of one shape, element by element; None if
    their shapes differ."""
    shape = values[0][0]
    if any(other != shape for other, _ in values):
        return None
    try:
        import numpy
    except ImportError:
        columns = [unpack_column("d", data) for _, data in values]
        reduce = REDUCERS[op]
        return shape, pack_column(array("d", (reduce(column) for column in zip(*columns))))
    stacked = numpy.frombuffer(b"".join(data for _, data in values), dtype="<f8").reshape(len(values), -1)
    result = getattr(numpy, op)(stacked, axis=0)  # numpy.mean, .min, .max, .sum
    return shape, numpy.ascontiguousarray(result, dtype="<f8").tobytes()

