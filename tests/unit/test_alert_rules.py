"""The alert engine with an injected clock: rules, windows, events, final evaluation."""

import pytest

from simvue.aggregator.alerts import CRITICAL, OK, AlertEngine, AlertSpec, alert_spec
from simvue.errors import SimvueTypeError, SimvueValueError


def engine_with(*specs: AlertSpec, now: float = 0.0) -> AlertEngine:
    engine = AlertEngine()
    for spec in specs:
        assert engine.add(spec, now)
    return engine


@pytest.mark.parametrize(
    "rule, bounds, value, holds",
    [
        ("is above", {"threshold": 1.0}, 1.5, True),
        ("is above", {"threshold": 1.0}, 1.0, False),
        ("is below", {"threshold": 1.0}, 0.5, True),
        ("is below", {"threshold": 1.0}, 2.0, False),
        ("is outside range", {"range_low": 4, "range_high": 6}, 7.0, True),
        ("is outside range", {"range_low": 4, "range_high": 6}, 5.0, False),
        ("is inside range", {"range_low": 4, "range_high": 6}, 5.0, True),
        ("is inside range", {"range_low": 4, "range_high": 6}, 3.0, False),
    ],
)
def test_each_rule(rule, bounds, value, holds):
    assert alert_spec("a", rule=rule, metric="m", **bounds).holds(value) is holds


def test_critical_after_window_consecutive_evaluations_and_ok_again():
    spec = alert_spec("hot", rule="is above", metric="t", threshold=10, frequency_s=60, window=2)
    engine = engine_with(spec)
    engine.observe_values("t", [20.0, 30.0])
    assert engine.evaluate(59.0) == []  # not due yet
    assert engine.evaluate(60.0) == []  # holds once: streak 1 of 2
    engine.observe_values("t", [11.0])
    [change] = engine.evaluate(120.0)
    assert (change.status, change.value, change.at) == (CRITICAL, 11.0, 120.0)
    assert "hot" in change.message() and "is above" in change.message()
    assert engine.evaluate(180.0) == []  # no new points: nothing changes
    engine.observe_values("t", [1.0, 2.0, 3.0])
    [back] = engine.evaluate(240.0)
    assert (back.status, back.value) == (OK, 2.0)
    assert engine.alerts["hot"].fired_at == 120.0


def test_average_over_the_period_decides_and_final_evaluation_ignores_the_schedule():
    spec = alert_spec("low", rule="is below", metric="q", threshold=0.4, frequency_s=600, window=1)
    engine = engine_with(spec)
    engine.observe_values("q", [0.1, 0.2, 1.5])  # average 0.6: not below
    assert engine.evaluate(5.0, final=True) == []
    engine.observe_values("q", [0.1, 0.2, 0.3])
    [change] = engine.evaluate(6.0, final=True)
    assert change.status == CRITICAL and abs(change.value - 0.2) < 1e-12


def test_event_alerts_fire_once_and_stay_critical():
    engine = engine_with(alert_spec("zero", source="events", pattern="Division by Zero", frequency_s=1))
    engine.observe_event("all fine")
    assert engine.evaluate(1.0) == []
    engine.observe_event("oops: Division by Zero Error")
    [change] = engine.evaluate(2.0)
    assert change.status == CRITICAL and "Division by Zero" in change.message()
    assert engine.evaluate(3.0) == [] and engine.alerts["zero"].status == CRITICAL


def test_same_name_is_defined_once_and_unwatched_metrics_cost_nothing():
    engine = engine_with(alert_spec("a", rule="is above", metric="m", threshold=1))
    assert not engine.add(alert_spec("a", rule="is below", metric="other", threshold=1), 0.0)
    engine.observe_values("unwatched", [1e9])
    assert list(engine.watched_metrics) == ["m"]


def test_user_alerts_change_only_when_set():
    engine = engine_with(alert_spec("manual", source="user"))
    assert engine.evaluate(1e9, final=True) == []
    change = engine.set_status("manual", CRITICAL, 5.0)
    assert change.status == CRITICAL and engine.set_status("manual", CRITICAL, 6.0) is None


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"name": ""}, SimvueTypeError),
        ({"name": "a", "rule": "is sideways", "metric": "m", "threshold": 1}, SimvueValueError),
        ({"name": "a", "rule": "is above", "metric": "m"}, SimvueValueError),
        ({"name": "a", "rule": "is above", "threshold": 1}, SimvueValueError),
        ({"name": "a", "rule": "is inside range", "metric": "m", "range_low": 3, "range_high": 1}, SimvueValueError),
        ({"name": "a", "source": "events"}, SimvueValueError),
        ({"name": "a", "source": "logs"}, SimvueValueError),
        ({"name": "a", "rule": "is above", "metric": "m", "threshold": 1, "window": 0}, SimvueValueError),
        ({"name": "a", "rule": "is above", "metric": "m", "threshold": 1, "frequency_s": -1}, SimvueValueError),
        ({"name": "a", "rule": "is above", "metric": "m", "threshold": float("nan")}, SimvueValueError),
        ({"name": "a", "source": "user", "notification": "sms"}, SimvueValueError),
    ],
)
def test_bad_definitions_are_clear_errors(kwargs, error):
    with pytest.raises(error, match="alert|name"):
        alert_spec(**kwargs)


def test_a_spec_round_trips_through_a_dict():
    spec = alert_spec("r", rule="is outside range", metric="m", range_low=1, range_high=2, frequency_s=0.5)
    assert AlertSpec.from_dict(spec.to_dict()) == spec


def test_every_transition_has_a_message():
    for spec in (alert_spec("u", source="user"), alert_spec("e", source="events", pattern="x"),
                 alert_spec("m", rule="is above", metric="m", threshold=0, window=1)):
        engine = engine_with(spec)
        engine.observe_values("m", [1.0])
        engine.observe_event("x")
        changes = engine.evaluate(1e9, final=True) or [engine.set_status(spec.name, CRITICAL, 1.0)]
        assert spec.name in changes[0].message()
