"""Run settings: one frozen dataclass, units in the names, resolved once.

Precedence for every field: a ``run.config(...)`` argument, then the environment variable
``SIMVUE_<FIELD>`` (for example ``SIMVUE_SENDER_TIMEOUT_S=5``), then the default below.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import SimvueTypeError, SimvueValueError

# Cross-rank reductions, by the name ``reduce=`` uses (see ``simvue.aggregator.merge``).
REDUCERS: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": lambda values: math.fsum(values) / len(values),
    "min": min,
    "max": max,
    "sum": math.fsum,
}
REDUCE_OPTIONS = (*REDUCERS, "namespace")
STORE_ENV = "SIMVUE_STORE"
DEFAULT_STORE_DIR = ".simvue"
ABORT_ACTIONS = ("terminate", "run", "ignore")
UPLOAD_FORMATS = ("auto", "upstream")
# Where the aggregator runs: "process", a process of its own (``simvue.aggregator.host``);
# "thread", a thread of the process that creates the run; "auto": a process for rank 0 of a
# multi-rank MPI job, a thread otherwise (docs/performance.md measures both).
AGGREGATE_IN = ("auto", "process", "thread")
# Per-node relays (docs/mpi.md, "Relays"): "auto" relays a rank on another host than the
# aggregator when the job has at least ``RELAY_MIN_RANKS`` ranks, "on" whenever the host
# differs, "off" never.
RELAY_MODES = ("auto", "on", "off")
RELAY_MIN_RANKS = 64
# Settings that take one of a few words.
CHOICES = {"upload_format": UPLOAD_FORMATS, "aggregate_in": AGGREGATE_IN, "relay": RELAY_MODES}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run needs to know about timing, limits and where data goes."""

    suppress_errors: bool = True
    store: str | None = None
    flush_interval_s: float = 0.05
    heartbeat_interval_s: float = 1.0
    sender_timeout_s: float = 120.0
    commit_interval_s: float = 0.2
    close_timeout_s: float = 30.0
    rendezvous_timeout_s: float = 60.0
    reduce_wait_s: float = 10.0
    run_heartbeat_timeout_s: float = 30.0
    max_buffered_records: int = 100_000
    upload_interval_s: float = 1.0
    # "auto": metrics go to a server as packed columns when it offers that (``simvue server``),
    # in the Simvue server's own format otherwise; "upstream": always the Simvue format.
    upload_format: str = "auto"
    aggregate_in: str = "auto"  # see AGGREGATE_IN
    server_heartbeat_interval_s: float = 60.0
    abort_poll_interval_s: float = 10.0
    retry_max_interval_s: float = 30.0
    resources_interval_s: float = 30.0  # 0: no resource sampling (see simvue.resources)
    reduce: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # What a process does when the run is asked to stop (docs/online.md): "terminate" it,
    # end the "run" and carry on, or "ignore" it.
    abort_on_alert: str = "terminate"
    # With a full buffer, wait up to close_timeout_s for room instead of spilling at once.
    queue_blocking: bool = False
    # A server's artifact storage, kept with the run's options (docs/artifacts.md).
    storage_id: str | None = None
    # Energy and CO2 estimates from the resource samples (docs/resources.md).
    enable_emission_metrics: bool = False
    cpu_watts_per_core: float = 10.0
    co2_grams_per_kwh: float = 475.0
    # Whether ranks on other nodes than the aggregator's send through a relay on their node
    # ("auto" | "on" | "off"; see RELAY_MODES and docs/mpi.md).
    relay: str = "auto"

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` validated and applied; unknown names raise."""
        fields = {f.name for f in dataclasses.fields(self)}
        own: dict[str, Any] = {}
        # An on/off switch wins over an interval given in the same call.
        for key, value in sorted(changes.items(), key=lambda item: RESOURCES_OPTIONS.get(item[0]) in ("on", "off")):
            if key in RESOURCES_OPTIONS:
                own["resources_interval_s"] = _resources_interval(
                    key, value, own.get("resources_interval_s", self.resources_interval_s)
                )
            elif key in fields:
                own[key] = _check(key, value)
            else:
                raise SimvueValueError(
                    f"unknown configuration option {key!r}; known: {', '.join(sorted(fields | RESOURCES_OPTIONS.keys()))}"
                )
        settings = dataclasses.replace(self, **own)
        if settings.enable_emission_metrics and not settings.resources_interval_s:
            raise SimvueValueError("enable_emission_metrics needs resource sampling: set resources_metrics_interval too")
        return settings

    def store_path(self) -> Path:
        """The directory of the local store: ``store`` setting, ``$SIMVUE_STORE``, or ``./.simvue``."""
        return Path(self.store or os.environ.get(STORE_ENV) or DEFAULT_STORE_DIR).absolute()


def from_environment() -> Settings:
    """Defaults overlaid with any ``SIMVUE_<FIELD>`` environment variables."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        if field.name in ("reduce", "store"):
            continue
        raw = os.environ.get(f"SIMVUE_{field.name.upper()}")
        if raw is None:
            continue
        try:
            if field.type in ("str", "str | None"):
                changes[field.name] = raw
            elif field.type == "bool":
                changes[field.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif field.type == "int":
                changes[field.name] = int(raw)
            else:
                changes[field.name] = float(raw)
        except ValueError:
            raise SimvueValueError(f"environment variable SIMVUE_{field.name.upper()}={raw!r} is not a number") from None
    if os.environ.get("SIMVUE_DISABLE_SYSTEM_METRICS", "").strip().lower() in ("1", "true", "yes", "on"):
        changes["resources_interval_s"] = 0.0
    return Settings().replace(**changes)


# Every name other clients use for the resource sampling interval or switch (seconds or bool).
RESOURCES_OPTIONS = {
    "resources_interval_s": "seconds",
    "resources_metrics_interval": "seconds",  # Simvue
    "system_metrics_interval": "seconds",  # Simvue 2.x; -1 means the default
    "hardware_interval": "seconds",  # OpsML
    "disable_resources_metrics": "off",  # Simvue
    "log_hardware": "on",  # OpsML
}
DEFAULT_RESOURCES_INTERVAL_S = 30.0
MIN_RESOURCES_INTERVAL_S = 1.0


def _resources_interval(key: str, value: Any, current: float) -> float:
    """The sampling interval after setting ``key`` to ``value``; 0 means off."""
    kind = RESOURCES_OPTIONS[key]
    if kind != "seconds":
        if not isinstance(value, bool):
            raise SimvueTypeError(f"{key} must be True or False")
        on = value if kind == "on" else not value
        return (current or DEFAULT_RESOURCES_INTERVAL_S) if on else 0.0
    if value is None or value is False:
        return 0.0
    if key == "system_metrics_interval" and value == -1:
        return DEFAULT_RESOURCES_INTERVAL_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise SimvueValueError(f"{key} must be a number of seconds (0 or None turns sampling off), got {value!r}")
    return 0.0 if value == 0 else max(MIN_RESOURCES_INTERVAL_S, float(value))


def _check(key: str, value: Any) -> Any:
    if key in ("suppress_errors", "queue_blocking", "enable_emission_metrics"):
        if not isinstance(value, bool):
            raise SimvueTypeError(f"{key} must be True or False")
        return value
    if key == "abort_on_alert":
        if isinstance(value, bool):  # older clients: True stops the process, False ignores
            return "terminate" if value else "ignore"
        if value not in ABORT_ACTIONS:
            raise SimvueValueError(f"abort_on_alert must be one of {', '.join(ABORT_ACTIONS)}, not {value!r}")
        return value
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise SimvueValueError(f"{key} must be one of {', '.join(CHOICES[key])}, not {value!r}")
        return value
    if key == "storage_id":
        if value is not None and not isinstance(value, str):
            raise SimvueTypeError("storage_id must be a str")
        return value
    if key == "store":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise SimvueTypeError("store must be a directory path")
        return None if value is None else os.fspath(value)
    if key == "reduce":
        return normalise_reduce(value)
    if key == "max_buffered_records":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SimvueValueError("max_buffered_records must be a positive int")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        unit = "" if key in ("cpu_watts_per_core", "co2_grams_per_kwh") else " of seconds"
        raise SimvueValueError(f"{key} must be a positive, finite number{unit}, got {value!r}")
    return float(value)


def normalise_reduce(value: Any) -> dict[str, tuple[str, ...]]:
    """Turn the user's ``reduce=`` argument into ``{metric name or '*': (op, ...)}``.

    Accepted forms: ``None``; a list of ops applied to every metric (``["mean", "max"]``);
    a dict ``{"loss": ["mean", "max"], "*": ["sum"]}``; an op string (``"mean"``).
    Ops are ``mean``, ``min``, ``max``, ``sum``; ``namespace`` keeps the per-rank series too.
    """
    if value is None:
        return {}
    if isinstance(value, str) or (isinstance(value, Sequence) and not isinstance(value, Mapping)):
        value = {"*": value}
    if not isinstance(value, Mapping):
        raise SimvueTypeError("reduce must be a list of ops or a dict of metric name -> list of ops")
    out: dict[str, tuple[str, ...]] = {}
    for name, ops in value.items():
        if not isinstance(name, str) or not name:
            raise SimvueValueError(f"reduce key {name!r} must be a metric name or '*'")
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        bad = [op for op in ops if op not in REDUCE_OPTIONS]
        if bad or not ops:
            raise SimvueValueError(
                f"reduce ops for {name!r} must be among {', '.join(REDUCE_OPTIONS)}; got {list(ops)!r}"
            )
        out[name] = tuple(dict.fromkeys(ops))
    return out
