"""Alert definitions and their evaluation, done by the aggregator on merged data.

Metric alerts: every ``frequency`` minutes the average of the points the metric received
since the previous evaluation is tested against the rule; the alert is ``critical`` once the
rule has held at ``window`` consecutive evaluations, and ``ok`` again at the first
evaluation where it does not.  An evaluation with no new points changes nothing.  Metric
names are stored names: ``loss`` in a single-process run, ``rank3/loss`` or ``loss.max`` in an
MPI job.

Event alerts: ``critical`` from the first evaluation after an event whose message contains
``pattern``; they stay critical (something happened in this run).

The run's end triggers one last evaluation of every alert, so short runs get states too.
The engine is pure: the caller passes the clock and the data, which keeps it testable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, cast

from ..errors import SimvueTypeError, SimvueValueError

RULES = ("is above", "is below", "is outside range", "is inside range")
SOURCES = ("metrics", "events", "user")
NOTIFICATIONS = ("none", "email")
OK, CRITICAL = "ok", "critical"


@dataclasses.dataclass(frozen=True)
class AlertSpec:
    """One alert as defined by ``Run.add_alert``; ``frequency_s`` is in seconds."""

    name: str
    source: str = "metrics"
    rule: str | None = None
    metric: str | None = None
    threshold: float | None = None
    range_low: float | None = None
    range_high: float | None = None
    frequency_s: float = 60.0
    window: int = 5
    pattern: str | None = None
    notification: str = "none"
    description: str | None = None
    trigger_abort: bool = False  # a critical state asks the run to stop, as a server abort does
    # False: defined (and sent to a server) but not evaluated for, or attached to, this run
    attached: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> AlertSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return alert_spec(**{key: value for key, value in fields.items() if key in known})

    def holds(self, value: float) -> bool:
        # ``alert_spec`` sets the threshold of an above/below rule and the range of the others.
        if self.rule == "is above":
            return value > cast(float, self.threshold)
        if self.rule == "is below":
            return value < cast(float, self.threshold)
        inside = cast(float, self.range_low) <= value <= cast(float, self.range_high)
        return inside if self.rule == "is inside range" else not inside


def alert_spec(
    name: Any,
    source: Any = "metrics",
    rule: Any = None,
    metric: Any = None,
    threshold: Any = None,
    range_low: Any = None,
    range_high: Any = None,
    frequency_s: Any = 60.0,
    window: Any = 5,
    pattern: Any = None,
    notification: Any = "none",
    description: Any = None,
    trigger_abort: Any = False,
    attached: Any = True,
) -> AlertSpec:
    """A checked ``AlertSpec``; raises ``SimvueValueError``/``SimvueTypeError`` naming the problem."""
    if not isinstance(name, str) or not name.strip():
        raise SimvueTypeError("an alert needs a name (a non-empty str)")
    if source not in SOURCES:
        raise SimvueValueError(f"alert {name!r}: source must be one of {', '.join(SOURCES)}, not {source!r}")
    if notification not in NOTIFICATIONS:
        raise SimvueValueError(f"alert {name!r}: notification must be 'none' or 'email', not {notification!r}")
    if not isinstance(attached, bool):
        raise SimvueTypeError(f"alert {name!r}: attach_to_run must be True or False, not {attached!r}")
    frequency_s = _positive(name, "frequency", frequency_s)
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window < 1 or window != int(window):
        raise SimvueValueError(f"alert {name!r}: window must be a whole number of evaluations >= 1, not {window!r}")
    fields: dict[str, Any] = {"name": name, "source": source, "frequency_s": frequency_s, "window": int(window),
                              "notification": notification, "description": description,
                              "trigger_abort": bool(trigger_abort), "attached": attached}
    if source == "metrics":
        if rule not in RULES:
            raise SimvueValueError(f"alert {name!r}: rule must be one of {', '.join(RULES)}, not {rule!r}")
        if not isinstance(metric, str) or not metric:
            raise SimvueValueError(f"alert {name!r}: a metrics alert needs metric= (a metric name)")
        fields.update(rule=rule, metric=metric)
        if rule in ("is above", "is below"):
            fields["threshold"] = _number(name, "threshold", threshold)
        else:
            low, high = _number(name, "range_low", range_low), _number(name, "range_high", range_high)
            if low > high:
                raise SimvueValueError(f"alert {name!r}: range_low {low} is above range_high {high}")
            fields.update(range_low=low, range_high=high)
    elif source == "events":
        if not isinstance(pattern, str) or not pattern:
            raise SimvueValueError(f"alert {name!r}: an events alert needs pattern= (text to look for)")
        fields["pattern"] = pattern
    return AlertSpec(**fields)


def _number(alert: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SimvueValueError(f"alert {alert!r}: {field} must be a finite number, not {value!r}")
    return float(value)


def _positive(alert: str, field: str, value: Any) -> float:
    number = _number(alert, field, value)
    if number <= 0:
        raise SimvueValueError(f"alert {alert!r}: {field} must be positive, not {value!r}")
    return number


@dataclasses.dataclass
class AlertState:
    """An alert's evaluation state within one run."""

    spec: AlertSpec
    next_due: float
    status: str = OK
    fired_at: float | None = None
    total: float = 0.0
    count: int = 0
    streak: int = 0
    matched: bool = False


@dataclasses.dataclass(frozen=True)
class Transition:
    """An alert changed state at an evaluation; ``value`` is the average that decided it."""

    spec: AlertSpec
    status: str
    value: float | None
    at: float

    def message(self) -> str:
        spec = self.spec
        if spec.source == "events":
            return f"alert '{spec.name}' is {self.status}: an event contained {spec.pattern!r}"
        if spec.source == "user":
            return f"alert '{spec.name}' is {self.status}: set by the run"
        bound = spec.threshold if spec.threshold is not None else f"[{spec.range_low}, {spec.range_high}]"
        return (
            f"alert '{spec.name}' is {self.status}: {spec.metric} averaged {self.value:g}"
            f" ({spec.rule} {bound} {'held' if self.status == CRITICAL else 'no longer holds'})"
        )


class AlertEngine:
    """Every alert of one run; the aggregator feeds it committed data and a clock."""

    def __init__(self) -> None:
        self.alerts: dict[str, AlertState] = {}
        self._by_metric: dict[str, list[AlertState]] = {}
        self._event_alerts: list[AlertState] = []
        self._to_attach: set[str] = set()

    def add(self, spec: AlertSpec, now: float) -> bool:
        """Define an alert; the same name again (e.g. from every rank) is ignored.  An alert
        named in an earlier ``attach`` is attached however it was defined."""
        if spec.name in self.alerts:
            return False
        if spec.name in self._to_attach:
            spec = dataclasses.replace(spec, attached=True)
        state = self.alerts[spec.name] = AlertState(spec, next_due=now + spec.frequency_s)
        if spec.attached:
            self._watch(state)
        return True  # an unattached one is kept with the run for a server, never evaluated here

    def attach(self, name: str) -> bool:
        """Evaluate and attach the alert ``name`` from now on (``Run.add_alerts``); True if
        that changed it.  A name not yet defined is attached when it is."""
        state = self.alerts.get(name)
        if state is None:
            self._to_attach.add(name)
            return False
        if state.spec.attached:
            return False
        state.spec = dataclasses.replace(state.spec, attached=True)
        self._watch(state)
        return True

    def _watch(self, state: AlertState) -> None:
        spec = state.spec
        if spec.source == "metrics":  # ``alert_spec`` gives every metrics alert its metric
            self._by_metric.setdefault(cast(str, spec.metric), []).append(state)
        elif spec.source == "events":
            self._event_alerts.append(state)

    @property
    def watched_metrics(self) -> Iterable[str]:
        return self._by_metric.keys()

    def observe_values(self, metric: str, values: Iterable[float]) -> None:
        """New points of ``metric`` (an array from one commit)."""
        states = self._by_metric.get(metric)
        if not states:
            return
        values = list(values)
        total, count = math.fsum(values), len(values)
        for state in states:
            state.total += total
            state.count += count

    def observe_event(self, message: str) -> None:
        for state in self._event_alerts:  # ``alert_spec`` gives every events alert its pattern
            if cast(str, state.spec.pattern) in message:
                state.matched = True

    def set_status(self, name: str, status: str, now: float) -> Transition | None:
        """A user alert's state, set by the run itself."""
        state = self.alerts.get(name)
        if state is None or not state.spec.attached or status not in (OK, CRITICAL) or status == state.status:
            return None
        return self._change(state, status, None, now)

    def evaluate(self, now: float, *, final: bool = False) -> list[Transition]:
        """Evaluate the alerts that are due (all of them when ``final``)."""
        changes = []
        for state in self.alerts.values():
            if state.spec.source == "user" or not state.spec.attached or (now < state.next_due and not final):
                continue
            state.next_due = now + state.spec.frequency_s
            change = self._evaluate(state, now)
            if change is not None:
                changes.append(change)
        return changes

    def _evaluate(self, state: AlertState, now: float) -> Transition | None:
        if state.spec.source == "events":
            if state.matched and state.status != CRITICAL:
                return self._change(state, CRITICAL, None, now)
            return None
        if not state.count:
            return None
        value = state.total / state.count
        state.total, state.count = 0.0, 0
        state.streak = state.streak + 1 if state.spec.holds(value) else 0
        status = CRITICAL if state.streak >= state.spec.window else OK
        return self._change(state, status, value, now) if status != state.status else None

    @staticmethod
    def _change(state: AlertState, status: str, value: float | None, now: float) -> Transition:
        state.status = status
        if status == CRITICAL and state.fired_at is None:
            state.fired_at = now
        return Transition(state.spec, status, value, now)
