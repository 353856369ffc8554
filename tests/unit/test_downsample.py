"""Down-sampling for charts (simvue/server/downsample.py): M4 per pixel column, and per-bucket
figures for heat maps and bands.  Checked against a plain loop over every point."""

from __future__ import annotations

import math

import pytest

np = pytest.importorskip("numpy")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from simvue.server.downsample import MAX_BUCKETS, buckets, in_order, m4, m4_within, window  # noqa: E402

values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(float("-inf")),
)


def _series(draw_steps: list[int], draw_values: list[float]):
    n = min(len(draw_steps), len(draw_values))
    x = np.sort(np.asarray(draw_steps[:n], dtype=float))
    return x, np.asarray(draw_values[:n], dtype=float)


def _bucket(x: float, lo: float, hi: float, count: int) -> int:
    if hi <= lo:
        return 0
    return min(max(int((x - lo) * (count / (hi - lo))), 0), count - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=600), st.lists(values, max_size=600), st.integers(1, 40))
def test_m4_keeps_each_columns_first_last_lowest_and_highest_point(steps, ys, width):
    x, y = _series(steps, ys)
    picked = m4(x, y, width)
    assert picked.tolist() == sorted(set(picked.tolist()))
    assert len(picked) <= 4 * width + 2
    if x.size == 0:
        assert picked.size == 0
        return
    assert picked[0] == 0 and picked[-1] == x.size - 1
    if x.size <= 4 * width:
        assert picked.tolist() == list(range(x.size))
        return
    chosen = set(picked.tolist())
    lo, hi = x[0], x[-1]
    columns: dict[int, list[int]] = {}
    for i, xi in enumerate(x):
        columns.setdefault(_bucket(xi, lo, hi, width), []).append(i)
    for members in columns.values():
        assert members[0] in chosen and members[-1] in chosen
        finite = [y[i] for i in members if not math.isnan(y[i])]
        if finite:  # the column's lowest and highest value are drawn (a spike survives)
            assert min(finite) in {y[i] for i in members if i in chosen}
            assert max(finite) in {y[i] for i in members if i in chosen}
    assert all(i in columns.get(_bucket(x[i], lo, hi, width), []) for i in chosen)


def test_one_spike_in_a_million_points_survives_a_100_pixel_chart():
    x = np.arange(1_000_000, dtype=float)
    y = np.sin(x / 5000.0)
    y[654_321] = 50.0
    y[123_456] = -50.0
    picked = m4(x, y, 100)
    assert len(picked) <= 402
    assert 654_321 in picked and 123_456 in picked
    # stride sampling at the same budget would have missed both
    stride = np.linspace(0, x.size - 1, 402).astype(int)
    assert 654_321 not in stride and 123_456 not in stride


def test_a_zoom_draws_its_range_and_one_point_beyond_each_edge():
    x = np.arange(1000, dtype=float)
    y = x * 2
    picked = m4(x, y, 50, lo=100.5, hi=200.5)
    assert picked[0] == 100 and picked[-1] == 201
    assert all(100 <= i <= 201 for i in picked)
    assert window(x, 100.5, 200.5) == (100, 202)
    assert window(x, None, None) == (0, 1000)
    assert window(x, 5000, 6000) == (999, 1000)  # beyond the end: the last point, as the line's start
    assert window(x, -10, -5) == (0, 1)  # before the start: the first point
    # a zoom on 1000 points with a wide chart: every point in the range
    assert m4(x, y, 1000, lo=10, hi=20).tolist() == list(range(9, 22))


def test_all_nan_columns_and_repeated_steps():
    x = np.repeat(np.arange(100, dtype=float), 10)  # ten points per step
    y = np.full(x.size, np.nan)
    y[500:510] = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    picked = m4(x, y, 10)
    assert 505 in picked  # 9, the highest of step 50's points
    assert 501 in picked  # 1, the first of the two lowest
    assert 503 not in picked
    assert len(picked) <= 42


def test_unordered_steps_are_put_in_order_keeping_equal_steps_in_logging_order():
    x = np.array([3, 1, 2, 1, 3], dtype=float)
    assert in_order(x).tolist() == [1, 3, 2, 0, 4]
    assert in_order(np.arange(5)).tolist() == [0, 1, 2, 3, 4]
    assert in_order(np.array([])).tolist() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-50, 150), max_size=300), st.lists(values, max_size=300), st.integers(1, 30))
def test_buckets_match_a_plain_loop(steps, ys, count):
    n = min(len(steps), len(ys))
    x = np.asarray(steps[:n], dtype=float)  # in any order
    y = np.asarray(ys[:n], dtype=float)
    got = buckets(x, y, count, 0.0, 100.0)
    expected: dict[int, list[float]] = {}
    for xi, yi in zip(x, y):
        if 0 <= xi <= 100 and not math.isnan(yi):
            expected.setdefault(_bucket(xi, 0.0, 100.0, count), []).append(yi)
    for b in range(count):
        members = expected.get(b, [])
        assert got.count[b] == len(members)
        if not members:
            assert math.isnan(got.mean[b]) and math.isnan(got.low[b]) and math.isnan(got.high[b])
            continue
        assert got.low[b] == min(members) and got.high[b] == max(members)
        mean = sum(members) / len(members) if all(math.isfinite(v) for v in members) else None
        if mean is not None:
            assert got.mean[b] == pytest.approx(mean, rel=1e-9, abs=1e-6)


def test_bad_arguments_are_refused():
    x = np.arange(10, dtype=float)
    with pytest.raises(ValueError, match="same length"):
        m4(x, x[:5], 10)
    with pytest.raises(ValueError, match="buckets"):
        m4(x, x, 0)
    with pytest.raises(ValueError, match="buckets"):
        m4(x, x, MAX_BUCKETS + 1)
    with pytest.raises(ValueError, match="one-dimensional"):
        buckets(x.reshape(2, 5), x.reshape(2, 5), 3, 0, 10)
    assert buckets(x, x, 3, 5.0, 5.0).count.tolist() == [1, 0, 0]  # a range of one step: one bucket


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2000), max_size=400), st.lists(values, max_size=400), st.integers(1, 60))
def test_m4_within_never_exceeds_the_limit_and_keeps_the_ends(steps, ys, limit):
    x, y = _series(steps, ys)
    picked = m4_within(x, y, limit).tolist()
    assert len(picked) <= limit and picked == sorted(set(picked))
    if x.size <= limit:
        assert picked == list(range(x.size))
    elif limit >= 2:
        assert picked[0] == 0 and picked[-1] == x.size - 1
    else:
        assert picked == [x.size - 1]


def test_max_points_keeps_the_spike_and_uses_its_budget():
    x = np.arange(10_000, dtype=float)
    y = x.copy()
    y[4321] = 1e9
    picked = m4_within(x, y, 50)
    assert 4321 in picked and 44 <= len(picked) <= 50  # monotone elsewhere: the budget is nearly all used
    assert m4_within(x, y, 3).tolist() == [0, 4321, 9999]
    assert m4_within(x, y, 2).tolist() == [0, 9999]
    with pytest.raises(ValueError):
        m4_within(x, y, 0)
