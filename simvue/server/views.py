"""What the dashboard draws, computed from a run's series: which metrics belong together (per
rank, reduced over ranks, per node), lines down-sampled to the chart's width, and the rank ×
step heat map with its margins and the imbalance between ranks.

Pure functions of names and numpy arrays (see ``downsample``); the routes in
``routes/dashboard.py`` read the series and call them.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping

import numpy as np

from .downsample import FloatArray, buckets, in_order, m4

REDUCERS = ("mean", "min", "max", "sum", "count")
_PROCESS = re.compile(r"^((?:rank|worker)\d+)/(.+)$")
_PROCESS_RESOURCE = re.compile(r"^resources/((?:rank|worker)\d+|main)/(.+)$")
_NODE_RESOURCE = re.compile(r"^resources/node/([^/]+)/(.+)$")
_REDUCED = re.compile(r"^(.+)\.(" + "|".join(REDUCERS) + r")$")
_LABEL_NUMBER = re.compile(r"^(rank|worker)(\d+)$")


def label_order(label: str) -> tuple[int, int, str]:
    """Ranks by number, then workers by number, then anything else by name."""
    match = _LABEL_NUMBER.match(label)
    if match is None:
        return (2, 0, label)
    return (0 if match.group(1) == "rank" else 1, int(match.group(2)), label)


@dataclasses.dataclass
class MetricGroups:
    """A run's metric names, grouped for drawing."""

    plain: list[str] = dataclasses.field(default_factory=list)  # one line each
    reduced: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # loss -> [mean, min, max, count]
    per_process: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # loss -> [rank0, rank1, ...]
    process_resources: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # cpu... -> labels
    node_resources: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # memory.usage -> hosts
    plain_resources: list[str] = dataclasses.field(default_factory=list)  # resources/cpu.usage.percentage

    def as_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def group_metrics(names: Iterable[str]) -> MetricGroups:
    """Sort ``names`` into the groups the dashboard draws differently.  A ``x.mean`` counts as
    reduced only beside ``x.min`` or ``x.max`` (a metric may simply be called ``speed.mean``)."""
    groups = MetricGroups()
    names = sorted(set(names))
    candidates: dict[str, list[str]] = {}
    for name in names:
        match = _REDUCED.match(name)
        if match is not None and "/" not in match.group(1) and not name.startswith("resources/"):
            candidates.setdefault(match.group(1), []).append(match.group(2))
    reduced = {base for base, kinds in candidates.items() if "mean" in kinds and ("min" in kinds or "max" in kinds)}
    for name in names:
        if match := _NODE_RESOURCE.match(name):
            groups.node_resources.setdefault(match.group(2), []).append(match.group(1))
        elif match := _PROCESS_RESOURCE.match(name):
            groups.process_resources.setdefault(match.group(2), []).append(match.group(1))
        elif name.startswith("resources/"):
            groups.plain_resources.append(name)
        elif match := _PROCESS.match(name):
            groups.per_process.setdefault(match.group(2), []).append(match.group(1))
        elif (match := _REDUCED.match(name)) and match.group(1) in reduced:
            groups.reduced.setdefault(match.group(1), []).append(match.group(2))
        else:
            groups.plain.append(name)
    for table in (groups.per_process, groups.process_resources):
        for labels in table.values():
            labels.sort(key=label_order)
    for kinds in groups.reduced.values():
        kinds.sort(key=REDUCERS.index)
    return groups


@dataclasses.dataclass(frozen=True)
class Series:
    """One metric's points in x order: ``x`` is the step or the time since the run's start."""

    x: FloatArray
    y: FloatArray

    @classmethod
    def ordered(cls, x: Iterable[float] | np.ndarray, y: Iterable[float] | np.ndarray) -> Series:
        xs = np.asarray(x, dtype=np.float64)
        ys = np.asarray(y, dtype=np.float64)
        order = in_order(xs)
        return cls(xs[order], ys[order])

    @property
    def size(self) -> int:
        return int(self.x.size)


def line(series: Series, width: int, lo: float | None = None, hi: float | None = None) -> dict[str, object]:
    """The points to draw ``series`` over ``lo``..``hi`` at ``width`` pixel columns."""
    picked = m4(series.x, series.y, width, lo, hi)
    return {
        "x": series.x[picked].tolist(),
        "y": series.y[picked].tolist(),
        "points": series.size,
        "range": [float(series.x[0]), float(series.x[-1])] if series.size else None,
    }


def x_range(all_series: Iterable[Series], lo: float | None, hi: float | None) -> tuple[float, float] | None:
    """``lo``..``hi`` with open ends closed by the series' own extent; None if nothing to draw."""
    firsts = [s.x[0] for s in all_series if s.size]
    lasts = [s.x[-1] for s in all_series if s.size]
    if not firsts:
        return None
    left = float(min(firsts)) if lo is None else float(lo)
    right = float(max(lasts)) if hi is None else float(hi)
    return (left, right) if right >= left else None


def heat_map(rows: Mapping[str, Series], width: int, lo: float | None = None, hi: float | None = None) -> dict[str, object]:
    """One row per process (in ``label_order``), one column per bucket of ``lo``..``hi``: each
    cell the mean of that process's values there.  Margins: over processes, per column, the
    mean of the cells and the lowest and highest value; per row, its mean, lowest and highest
    value over the range (the table).  Imbalance per column: (highest cell − lowest cell) over
    the mean of the cells' absolute values, and the row furthest from the column's mean."""
    labels = sorted(rows, key=label_order)
    extent = x_range(rows.values(), lo, hi)
    if extent is None or not labels:
        return {"labels": labels, "edges": [], "cells": [], "columns": None, "rows": [], "imbalance": [], "worst": []}
    left, right = extent
    columns = max(1, min(width, _distinct_steps(rows.values(), left, right)))
    per_row = [buckets(rows[label].x, rows[label].y, columns, left, right) for label in labels]
    cells = np.vstack([b.mean for b in per_row])  # rows × columns, NaN where a row has no value
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no value at all is NaN, as wanted
        low = np.nanmin(np.vstack([b.low for b in per_row]), axis=0)
        high = np.nanmax(np.vstack([b.high for b in per_row]), axis=0)
        mean = np.nanmean(cells, axis=0)
        spread = np.nanmax(cells, axis=0) - np.nanmin(cells, axis=0)
        scale = np.nanmean(np.abs(cells), axis=0)
        imbalance = np.where(scale > 0, spread / scale, 0.0)
        imbalance[np.isnan(spread)] = np.nan
        distance = np.abs(cells - mean)
        furthest = np.where(np.isnan(distance), -np.inf, distance).argmax(axis=0)
        valued = ~np.all(np.isnan(distance), axis=0)
        worst = [labels[int(row)] if ok else None for row, ok in zip(furthest.tolist(), valued.tolist())]
    table = []
    for label, figures in zip(labels, per_row):
        counted = figures.count.sum()
        weights = np.where(np.isnan(figures.mean), 0.0, figures.mean * figures.count)
        table.append({
            "label": label,
            "mean": float(weights.sum() / counted) if counted else None,
            "min": _nan_to_none(np.nanmin(figures.low)) if counted else None,
            "max": _nan_to_none(np.nanmax(figures.high)) if counted else None,
            "points": int(counted),
        })
    return {
        "labels": labels,
        "edges": np.linspace(left, right, columns + 1).tolist(),
        "cells": [_floats(row) for row in cells],
        "columns": {"mean": _floats(mean), "min": _floats(low), "max": _floats(high)},
        "rows": table,
        "imbalance": _floats(imbalance),
        "worst": worst,
    }


def band(rows: Mapping[str, Series], width: int, lo: float | None = None, hi: float | None = None,
         outliers: int = 3) -> dict[str, object]:
    """Many processes at once: per column the lowest, mean and highest value over every
    process, and the lines of the ``outliers`` processes whose mean lies furthest from the
    others' (the straggler, the idle GPU, the leaking rank)."""
    summary = heat_map(rows, width, lo, hi)
    table = [r for r in summary["rows"] if r["mean"] is not None]  # type: ignore[attr-defined]
    if table:
        means = np.array([r["mean"] for r in table])
        centre = float(np.median(means))
        furthest = sorted(table, key=lambda r: -abs(r["mean"] - centre))[: max(0, outliers)]
        picked = sorted((r["label"] for r in furthest), key=label_order)
    else:
        picked = []
    extent = x_range(rows.values(), lo, hi)
    left, right = extent if extent is not None else (None, None)
    return {
        "edges": summary["edges"],
        "columns": summary["columns"],
        "labels": summary["labels"],
        "outliers": {label: line(rows[label], width, left, right) for label in picked},
    }


def positions(at: Iterable[float], times: FloatArray, steps: FloatArray) -> list[float | None]:
    """Where instants ``at`` (seconds since the run started) fall on the step axis, read off
    one series' (time, step) pairs by interpolation; None outside that series' span."""
    instants = np.asarray(list(at), dtype=np.float64)
    if times.size == 0:
        return [None] * int(instants.size)
    order = np.argsort(times, kind="stable")
    t, s = times[order], steps[order]
    placed = np.interp(instants, t, s)
    outside = (instants < t[0]) | (instants > t[-1])
    return [None if out else float(v) for v, out in zip(placed.tolist(), outside.tolist())]


def _distinct_steps(all_series: Iterable[Series], left: float, right: float) -> int:
    """How many columns are worth drawing: no more than the points in range (a run of ten
    steps gets ten columns, not one per pixel with gaps between)."""
    counts = [int(np.searchsorted(s.x, right, "right") - np.searchsorted(s.x, left, "left")) for s in all_series]
    return max(counts, default=1)


def _nan_to_none(value: float) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _floats(values: np.ndarray) -> list[float | None]:
    """``values`` as a JSON list: NaN (no value) becomes null."""
    out = values.astype(object)
    out[np.isnan(values)] = None
    return out.tolist()
