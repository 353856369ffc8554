"""The alert methods of ``Run``: the older ``add_alert`` and today's ``create_*_alert``.

Definitions travel to the aggregator like any record and are evaluated there on the merged
data (``simvue.aggregator.alerts``), so an alert added on every rank is defined once and
can watch ``rank3/loss`` or ``loss.max``.  ``frequency`` is in minutes (fractions allowed).
"""

from __future__ import annotations

from typing import Any

from ._run_parts import RunParts
from .aggregator.alerts import CRITICAL, OK, RULES, AlertSpec, alert_spec
from .errors import SimvueError, SimvueValueError
from .transport.protocol import AlertAttachRecord, AlertRecord, AlertStateRecord, RecordKind


class AlertsMixin(RunParts):
    """``add_alert``, ``create_metric_threshold_alert``, ``create_metric_range_alert``,
    ``create_event_alert``, ``create_user_alert``, ``add_alerts`` and ``log_alert``."""

    def add_alert(
        self,
        name: str,
        source: str = "metrics",
        frequency: float = 1,
        window: int = 5,
        rule: str | None = None,
        metric: str | None = None,
        threshold: float | None = None,
        range_low: float | None = None,
        range_high: float | None = None,
        notification: str = "none",
        pattern: str | None = None,
        *,
        type: str | None = None,
        description: str | None = None,
        trigger_abort: bool = False,
    ) -> bool:
        """Define an alert on this run (see docs/alerts.md).  The older form
        ``add_alert(name, type, metric, frequency, window, threshold=...)`` works too."""
        if source in RULES:  # the older Simvue() client: add_alert(name, type, metric, frequency, window, ...)
            if isinstance(frequency, str):  # ... with the metric and what follows given by position
                rule, metric, frequency, window, threshold = (
                    source, frequency, window, rule, metric if threshold is None else threshold
                )
            else:
                rule = source
            source = "metrics"
        return self._define_alert(
            "add_alert",
            name=name, source=source, rule=type or rule, metric=metric, threshold=threshold,
            range_low=range_low, range_high=range_high, frequency=frequency, window=window,
            pattern=pattern, notification=notification, description=description, trigger_abort=trigger_abort,
        ) is not None

    def create_metric_threshold_alert(
        self, name: str, metric: str, threshold: float, rule: str, *, description: str | None = None,
        window: int = 5, frequency: float = 1, aggregation: str = "average", notification: str = "none",
        trigger_abort: bool = False, attach_to_run: bool = True,
    ) -> str | None:
        """Critical when ``metric`` averages ``is above``/``is below`` ``threshold`` at
        ``window`` consecutive evaluations, one every ``frequency`` minutes.  With
        ``attach_to_run=False`` (any ``create_*_alert``) the alert is only defined: kept with
        the run and sent to a server, but neither evaluated for nor attached to this run."""
        return self._define_alert(
            "create_metric_threshold_alert", name=name, source="metrics", rule=rule, metric=metric, attached=attach_to_run,
            threshold=threshold, frequency=frequency, window=window, notification=notification,
            description=description, trigger_abort=trigger_abort, aggregation=aggregation,
        )

    def create_metric_range_alert(
        self, name: str, metric: str, range_low: float, range_high: float, rule: str, *,
        description: str | None = None, window: int = 5, frequency: float = 1, aggregation: str = "average",
        notification: str = "none", trigger_abort: bool = False, attach_to_run: bool = True,
    ) -> str | None:
        """Critical when ``metric`` averages ``is inside range``/``is outside range``."""
        return self._define_alert(
            "create_metric_range_alert", name=name, source="metrics", rule=rule, metric=metric, attached=attach_to_run,
            range_low=range_low, range_high=range_high, frequency=frequency, window=window,
            notification=notification, description=description, trigger_abort=trigger_abort,
            aggregation=aggregation,
        )

    def create_event_alert(
        self, name: str, pattern: str, *, description: str | None = None, frequency: float = 1,
        notification: str = "none", trigger_abort: bool = False, attach_to_run: bool = True,
    ) -> str | None:
        """Critical once an event's message contains ``pattern``."""
        return self._define_alert(
            "create_event_alert", name=name, source="events", pattern=pattern, frequency=frequency, attached=attach_to_run,
            notification=notification, description=description, trigger_abort=trigger_abort,
        )

    def create_user_alert(
        self, name: str, *, description: str | None = None, notification: str = "none",
        trigger_abort: bool = False, attach_to_run: bool = True,
    ) -> str | None:
        """An alert whose state the run sets itself with ``log_alert``."""
        return self._define_alert(
            "create_user_alert", name=name, source="user", notification=notification, attached=attach_to_run,
            description=description, trigger_abort=trigger_abort,
        )

    def add_alerts(self, ids: list[str] | None = None, names: list[str] | None = None) -> bool:
        """Attach alerts this run defined with ``attach_to_run=False``, by id or name (an
        alert's id is its name here): from now on they are evaluated for the run.  A name
        no alert has yet is attached when an alert of that name is defined."""
        wanted: list[str] = []
        for what, given in (("ids", ids), ("names", names)):
            if given is None:
                continue
            if isinstance(given, str) or not isinstance(given, (list, tuple, set, frozenset)):
                return self._fail("add_alerts", SimvueValueError(f"add_alerts: {what} must be a list of str, not {given!r}"))
            for item in given:
                if not isinstance(item, str) or not item.strip():
                    return self._fail("add_alerts", SimvueValueError(f"add_alerts: {item!r} is not an alert id or name"))
                wanted.append(item)
        if not wanted:
            return self._fail("add_alerts", SimvueValueError("add_alerts needs alert ids or alert names"))
        return self._record(AlertAttachRecord(RecordKind.ALERT_ATTACH, list(dict.fromkeys(wanted))), "add_alerts")

    def log_alert(self, identifier: str | None = None, state: str = "critical", *, name: str | None = None) -> bool:
        """Set a user alert's state, ``ok`` or ``critical``."""
        alert = identifier or name
        if not isinstance(alert, str) or state not in (OK, CRITICAL):
            return self._fail("log_alert", SimvueValueError(
                f"log_alert needs an alert name and state 'ok' or 'critical', not {alert!r}, {state!r}"
            ))
        return self._record(AlertStateRecord(RecordKind.ALERT_STATE, alert, state), "log_alert")

    def _define_alert(
        self, call: str, *, frequency: float = 1, trigger_abort: Any = False, aggregation: str = "average",
        **fields: Any,
    ) -> str | None:
        try:
            if aggregation != "average":
                raise SimvueValueError(f"alert {fields.get('name')!r}: only aggregation='average' is supported")
            if isinstance(frequency, bool) or not isinstance(frequency, (int, float)):
                raise SimvueValueError(f"alert {fields.get('name')!r}: frequency must be minutes, not {frequency!r}")
            spec = alert_spec(frequency_s=frequency * 60.0, trigger_abort=trigger_abort, **fields)
        except SimvueError as exc:
            self._fail(call, exc)
            return None
        return spec.name if self._record(AlertRecord(RecordKind.ALERT, spec.to_dict()), call) else None


__all__ = ["AlertSpec", "AlertsMixin"]
