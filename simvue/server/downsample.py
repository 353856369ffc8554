"""Down-sampling for charts, done by the server so that a response is bounded by the chart's
width, not by the run's size.

``m4`` picks, in each pixel column (bucket) of the x range, the first, last, lowest and highest
point, plus the series' first and last point: a line drawn through them at that width is the
line drawn through every point (M4; Jugel et al., "M4: a visualization-oriented time series data
aggregation", VLDB 2014).  A spike is always a bucket's highest or lowest point, so it survives;
random and stride sampling lose it.  A zoom asks again with a narrower range.

``buckets`` gives the per-bucket mean, lowest and highest value, for heat maps (one row per rank)
and bands.

Pure functions of numpy arrays: no I/O, no clock.  NaN values are points without a value: they
are never a bucket's lowest or highest point and do not count towards a mean.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

MAX_BUCKETS = 10_000  # a chart wider than this many pixel columns is asked for in parts

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]


def in_order(x: npt.ArrayLike) -> IndexArray:
    """Indices that put ``x`` in ascending order, keeping the logging order of equal values."""
    values = np.asarray(x, dtype=np.float64)
    if values.size < 2 or bool(np.all(values[1:] >= values[:-1])):
        return np.arange(values.size, dtype=np.intp)
    return np.argsort(values, kind="stable").astype(np.intp)


def _bucket_of(x: FloatArray, lo: float, hi: float, buckets: int) -> IndexArray:
    if hi <= lo:
        return np.zeros(x.size, dtype=np.intp)
    position = (x - lo) * (buckets / (hi - lo))
    return np.clip(position.astype(np.intp), 0, buckets - 1)


def _check(x: FloatArray, y: FloatArray, buckets: int) -> None:
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be one-dimensional arrays of the same length")
    if not 1 <= buckets <= MAX_BUCKETS:
        raise ValueError(f"buckets must be between 1 and {MAX_BUCKETS}")


def window(x: FloatArray, lo: float | None, hi: float | None) -> tuple[int, int]:
    """The slice of ascending ``x`` to draw for the range ``lo``..``hi`` (None: open): the
    points inside and one on each side beyond it, so that the line reaches the chart's edges."""
    start = 0 if lo is None else max(0, int(np.searchsorted(x, lo, side="left")) - 1)
    stop = x.size if hi is None else min(x.size, int(np.searchsorted(x, hi, side="right")) + 1)
    return start, max(start, stop)


def m4(x: npt.ArrayLike, y: npt.ArrayLike, buckets: int, lo: float | None = None, hi: float | None = None) -> IndexArray:
    """Indices (ascending) of the points of ascending ``x`` to draw ``lo``..``hi`` (None: the
    series' own range) ``buckets`` pixel columns wide: at most ``4 * buckets + 2`` of them."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    _check(xs, ys, buckets)
    start, stop = window(xs, lo, hi)
    if stop - start <= 4 * buckets:
        return np.arange(start, stop, dtype=np.intp)
    xs, ys = xs[start:stop], ys[start:stop]
    left = xs[0] if lo is None else max(float(lo), xs[0])
    right = xs[-1] if hi is None else min(float(hi), xs[-1])
    bucket = _bucket_of(xs, left, right, buckets)
    starts = np.flatnonzero(np.diff(bucket)) + 1
    starts = np.concatenate(([0], starts)).astype(np.intp)
    ends = np.concatenate((starts[1:], [xs.size])).astype(np.intp) - 1
    picked = [starts, ends, _extreme(ys, starts, np.fmin), _extreme(ys, starts, np.fmax), np.array([0, xs.size - 1])]
    return (np.unique(np.concatenate(picked)) + start).astype(np.intp)


def m4_within(x: npt.ArrayLike, y: npt.ArrayLike, limit: int) -> IndexArray:
    """Indices of at most ``limit`` points of ascending ``x`` chosen as ``m4`` chooses them, at
    the most pixel columns that fit (the API's ``max_points``).  Below 4 points there is no
    column to speak of: the first and last point, and the highest one between if it fits."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if xs.size <= limit:
        return np.arange(xs.size, dtype=np.intp)
    if limit < 4:
        ends = [xs.size - 1] if limit == 1 else [0, xs.size - 1]
        if limit == 3 and not np.all(np.isnan(ys[1:-1])):
            ends.insert(1, 1 + int(np.nanargmax(ys[1:-1])))
        return np.array(ends, dtype=np.intp)
    low, high = 1, min(limit, MAX_BUCKETS)
    best = m4(xs, ys, 1)
    while low <= high:  # the most columns whose points fit (the count grows with the columns)
        middle = (low + high) // 2
        picked = m4(xs, ys, middle)
        if picked.size <= limit:
            best, low = picked, middle + 1
        else:
            high = middle - 1
    return best


def _extreme(y: FloatArray, starts: IndexArray, ufunc: np.ufunc) -> IndexArray:
    """In each segment of ``y`` beginning at ``starts``, the index of the first point equal to
    the segment's ``ufunc`` reduction (fmin/fmax: NaN ignored); none for an all-NaN segment."""
    best = ufunc.reduceat(y, starts)
    segment = np.repeat(np.arange(starts.size), np.diff(np.concatenate((starts, [y.size]))))
    hits = np.flatnonzero(y == best[segment])
    if hits.size == 0:
        return hits.astype(np.intp)
    first = np.concatenate(([True], segment[hits][1:] != segment[hits][:-1]))
    return hits[first].astype(np.intp)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Per-bucket figures of one series over ``lo``..``hi``; NaN where a bucket has no value."""

    lo: float
    hi: float
    mean: FloatArray
    low: FloatArray
    high: FloatArray
    count: npt.NDArray[np.int64]  # points with a value


def buckets(x: npt.ArrayLike, y: npt.ArrayLike, count: int, lo: float, hi: float) -> Buckets:
    """``count`` equal buckets of ``lo``..``hi``: the mean, lowest and highest value of the
    points of each (``x`` in any order; points outside the range are left out)."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    _check(xs, ys, count)
    keep = (xs >= lo) & (xs <= hi) & ~np.isnan(ys)
    xs, ys = xs[keep], ys[keep]
    order = in_order(xs)
    xs, ys = xs[order], ys[order]
    bucket = _bucket_of(xs, lo, hi, count)
    n = np.bincount(bucket, minlength=count).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(bucket, weights=ys, minlength=count) / n
    low = np.full(count, np.nan)
    high = np.full(count, np.nan)
    if bucket.size:  # each bucket's points are one run of the ordered points
        starts = np.flatnonzero(np.concatenate(([True], bucket[1:] != bucket[:-1])))
        low[bucket[starts]] = np.minimum.reduceat(ys, starts)
        high[bucket[starts]] = np.maximum.reduceat(ys, starts)
    empty = n == 0
    mean[empty] = low[empty] = high[empty] = np.nan
    return Buckets(float(lo), float(hi), mean, low, high, n)
