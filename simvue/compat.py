"""Older and alternative spellings of the ``Run`` API (the ``Simvue()`` client, Simtrack,
OpsML-style verbs), kept so that scripts written for them run unchanged.

Every method here is a thin mapping onto a ``Run`` call: it records the same records, returns
``True``/``False`` like the rest of the API, and reports bad input through the run's error
policy (``suppress_errors``).  See ``docs/compat.md`` for the table of old call -> behaviour.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import validation
from .api import config as api_config
from .artifacts import ArtifactsMixin
from .config import Settings
from .errors import SimvueError, SimvueTypeError, SimvueValueError
from .transport.protocol import MetadataRecord, RecordKind, TagsRecord, TagsSetRecord

# An OpsML tag ``add_tag(key, value)`` becomes the Simvue tag ``f"{key}{TAG_SEPARATOR}{value}"``.
TAG_SEPARATOR = "="
_TAG_VALUE_TYPES = (str, int, float)


def _tag(key: Any, value: Any) -> str:
    """The Simvue tag for the OpsML key/value tag ``key: value``."""
    if not isinstance(key, str):
        raise SimvueTypeError(f"tag key {key!r} is a {type(key).__name__}, not a str")
    if not key or TAG_SEPARATOR in key:
        raise SimvueValueError(f"tag key {key!r} must be a non-empty str without {TAG_SEPARATOR!r}")
    if not isinstance(value, _TAG_VALUE_TYPES):
        raise SimvueTypeError(f"tag {key!r}: value {value!r} is a {type(value).__name__}, not a str or number")
    return f"{key}{TAG_SEPARATOR}{value}"


def _parameters(parameters: Any) -> dict[str, Any]:
    """Validated parameters, as the metadata they are stored as."""
    if not isinstance(parameters, Mapping):
        raise SimvueTypeError(f"parameters must be a dict of name -> value, not {type(parameters).__name__}")
    for key in parameters:
        if not isinstance(key, str) or not key:
            raise SimvueValueError(f"parameter name {key!r} is not a non-empty str")
    return validation.metadata(parameters)


# ``set_metric_units``: each unit's size in SI (MKS) base units, for the units a simulation
# most often logs; any other unit is stored as given, with the MKS unit and factor the caller
# passes (or none).
MKS_UNITS: dict[str, tuple[str, float]] = {
    **{unit: ("m", factor) for unit, factor in (
        ("m", 1.0), ("km", 1e3), ("cm", 1e-2), ("mm", 1e-3), ("um", 1e-6), ("µm", 1e-6), ("nm", 1e-9),
        ("Å", 1e-10), ("angstrom", 1e-10), ("ft", 0.3048), ("inch", 0.0254), ("in", 0.0254), ("yd", 0.9144),
        ("mile", 1609.344), ("mi", 1609.344),
    )},
    **{unit: ("s", factor) for unit, factor in (
        ("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("ns", 1e-9), ("min", 60.0), ("h", 3600.0),
        ("hr", 3600.0), ("day", 86400.0),
    )},
    **{unit: ("kg", factor) for unit, factor in (("kg", 1.0), ("g", 1e-3), ("mg", 1e-6), ("t", 1e3), ("lb", 0.45359237))},
    "K": ("K", 1.0), "A": ("A", 1.0), "mol": ("mol", 1.0), "cd": ("cd", 1.0),
    "N": ("kg*m/s**2", 1.0), "kN": ("kg*m/s**2", 1e3),
    "J": ("kg*m**2/s**2", 1.0), "kJ": ("kg*m**2/s**2", 1e3), "MJ": ("kg*m**2/s**2", 1e6),
    "eV": ("kg*m**2/s**2", 1.602176634e-19), "keV": ("kg*m**2/s**2", 1.602176634e-16),
    "MeV": ("kg*m**2/s**2", 1.602176634e-13),
    "W": ("kg*m**2/s**3", 1.0), "kW": ("kg*m**2/s**3", 1e3), "MW": ("kg*m**2/s**3", 1e6),
    "Pa": ("kg/(m*s**2)", 1.0), "kPa": ("kg/(m*s**2)", 1e3), "MPa": ("kg/(m*s**2)", 1e6),
    "bar": ("kg/(m*s**2)", 1e5), "atm": ("kg/(m*s**2)", 101325.0),
    "Hz": ("1/s", 1.0), "kHz": ("1/s", 1e3), "MHz": ("1/s", 1e6), "GHz": ("1/s", 1e9),
    "m/s": ("m/s", 1.0), "km/h": ("m/s", 1 / 3.6), "V": ("kg*m**2/(A*s**3)", 1.0), "T": ("kg/(A*s**2)", 1.0),
}


def metric_units(metric: Any, units: Any, mks_unit: Any = None, mks_conversion: Any = None) -> dict[str, Any]:
    """``{"units", "mks_units", "mks_conversion"}`` for one metric, as ``set_metric_units``
    stores it under the metadata's ``simvue.metrics.<metric>``."""
    if not isinstance(metric, str) or not metric:
        raise SimvueValueError(f"set_metric_units: metric name {metric!r} is not a non-empty str")
    if not isinstance(units, str) or not units:
        raise SimvueValueError(f"set_metric_units: units for {metric!r} must be a non-empty str, not {units!r}")
    if mks_unit is not None and not isinstance(mks_unit, str):
        raise SimvueTypeError(f"set_metric_units: mks_unit must be a str, not {mks_unit!r}")
    if mks_conversion is not None and (
        isinstance(mks_conversion, bool) or not isinstance(mks_conversion, (int, float))
        or not math.isfinite(mks_conversion)
    ):
        raise SimvueTypeError(f"set_metric_units: mks_conversion must be a finite number, not {mks_conversion!r}")
    known_unit, known_factor = MKS_UNITS.get(units.strip(), (None, None))
    return {
        "units": units,
        "mks_conversion": mks_conversion if mks_conversion is not None else known_factor,
        "mks_units": mks_unit if mks_unit is not None else known_unit,
    }


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """``Run.user_config.run``: how the run records."""

    mode: str


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """``Run.user_config``: the server (``url``, ``token``), the mode and simvue's settings,
    as this run resolved them."""

    server: api_config.ServerConfig
    run: RunOptions
    settings: Settings


class CompatMixin(ArtifactsMixin):
    """Methods ``Run`` offers under other clients' names; each maps onto a ``Run`` call."""

    # -- the older Simvue() client: Simvue(), log, event, folder_details ----------------------

    def event(self, message: str | BaseException, timestamp: str | None = None) -> bool:
        """The older name of ``log_event``; an exception is recorded as ``"Type: message"``."""
        return self.log_event(message, timestamp)

    def folder_details(
        self,
        path: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        description: str | None = None,
    ) -> bool:
        """The older name of ``set_folder_details``."""
        return self.set_folder_details(path, metadata, tags, description)

    # -- OpsML RunCard verbs: log_parameter(s), add_tag(s) ---------------------------------

    def log_metric(
        self,
        key: str,
        value: int | float,
        step: int | None = None,
        *,
        time: float | None = None,
        timestamp: str | None = None,
    ) -> bool:
        """Record one metric value: ``log_metrics({key: value}, step)``.  With no ``step`` the
        process's automatic step is used (and advanced), as for ``log_metrics``."""
        if not isinstance(key, str):  # an unhashable key would fail before validation
            error = SimvueTypeError(f"metric name {key!r} is a {type(key).__name__}, not a str")
            return self._fail("log_metric", error)
        return self.log_metrics({key: value}, step, time, timestamp)

    def log_parameter(self, key: str, value: Any) -> bool:
        """Record a parameter of the run: stored as the top-level metadata entry ``key``."""
        return self._record_checked("log_parameter", lambda: MetadataRecord(RecordKind.METADATA, _parameters({key: value})))

    def log_parameters(self, parameters: Mapping[str, Any]) -> bool:
        """Record several parameters at once (one metadata update)."""
        return self._record_checked("log_parameters", lambda: MetadataRecord(RecordKind.METADATA, _parameters(parameters)))

    def add_tag(self, key: str, value: str | int | float) -> bool:
        """Add the OpsML key/value tag as the Simvue tag ``"key=value"``."""
        return self._record_checked("add_tag", lambda: TagsRecord(RecordKind.TAGS, [_tag(key, value)]))

    def add_tags(self, tags: Mapping[str, str | int | float]) -> bool:
        """Add each ``key: value`` of ``tags`` as the Simvue tag ``"key=value"``."""

        def build() -> tuple:
            if not isinstance(tags, Mapping):
                raise SimvueTypeError(f"tags must be a dict of key -> value, not {type(tags).__name__}")
            return TagsRecord(RecordKind.TAGS, [_tag(key, value) for key, value in tags.items()])

        return self._record_checked("add_tags", build)

    def log_artifact_from_file(
        self, name: str, local_path: str | os.PathLike, artifact_path: str | None = None
    ) -> bool:
        """Store the file ``local_path`` as the output artifact ``name``: ``save(local_path,
        "output", name=name)``.  OpsML's ``artifact_path`` is accepted and ignored."""
        try:
            if not isinstance(name, str) or not name:
                raise SimvueValueError(f"artifact name {name!r} is not a non-empty str")
            if not isinstance(local_path, (str, os.PathLike)):
                raise SimvueTypeError(f"artifact path {local_path!r} is not a path")
        except SimvueError as exc:
            return self._fail("log_artifact_from_file", exc)
        return self.save(os.fspath(local_path), "output", name=name)

    # -- the upstream 2.x client's other calls and properties ---------------------------------

    def set_tags(self, tags: Iterable[str]) -> bool:
        """Replace the run's tags with ``tags`` (``update_tags`` adds to them)."""
        return self._record_checked("set_tags", lambda: TagsSetRecord(RecordKind.TAGS_SET, validation.tags(tags)))

    def set_metric_units(
        self,
        metric_name: str | Mapping[str, str],
        *,
        units: str | None = None,
        mks_unit: str | None = None,
        mks_conversion: float | None = None,
    ) -> bool:
        """Record the units of a metric: ``set_metric_units("x", units="ft")``, or of several,
        ``set_metric_units({"x": "ft", "t": "s"})``.  Stored in the metadata under
        ``simvue.metrics.<name>`` as ``{"units", "mks_units", "mks_conversion"}``; the MKS
        unit and factor are filled in for common units (``MKS_UNITS``) unless given."""

        def build() -> tuple:
            if isinstance(metric_name, Mapping):
                if units is not None or mks_unit is not None or mks_conversion is not None:
                    raise SimvueValueError("set_metric_units: give units= and the mks_ options only with one metric name")
                described = {name: metric_units(name, unit) for name, unit in metric_name.items()}
            else:
                described = {metric_name: metric_units(metric_name, units, mks_unit, mks_conversion)}
            return MetadataRecord(RecordKind.METADATA, {"simvue": {"metrics": described}})

        return self._record_checked("set_metric_units", build)

    @property
    def status(self) -> str | None:
        """The run's status as this process knows it: ``created`` or ``running`` once
        started, what ``set_status`` set, ``completed``/``failed``/``terminated`` once closed
        here; None before ``init`` and when disabled."""
        return None if self._state == "disabled" else self._status

    @property
    def uid(self) -> str:
        """An identifier of this ``Run`` object, unique and fixed from its creation (the run
        itself is ``id``; each process's handle has its own ``uid``)."""
        uid = self.__dict__.get("_uid")
        if uid is None:
            uid = self.__dict__["_uid"] = uuid.uuid4().hex
        return uid

    @property
    def duration(self) -> float:
        """Seconds since the run started (since this ``Run`` was created, before ``init``)."""
        return time.time() - self._t0

    @property
    def mode(self) -> str:
        """``online`` (sent to a server), ``offline`` (the local store only) or ``disabled``."""
        if self._state == "disabled" or self._mode == "disabled":
            return "disabled"
        server = self._server or self._resolved_server()
        return "online" if server.online else "offline"

    @property
    def user_config(self) -> UserConfig:
        """The server, mode and settings this run uses (read-only)."""
        return UserConfig(server=self._server or self._resolved_server(), run=RunOptions(self.mode), settings=self._settings)

    @property
    def dispatcher(self) -> None:
        """Always None: records travel through simvue's transport (docs/architecture.md),
        not a dispatcher object."""
        return None

    def _resolved_server(self) -> api_config.ServerConfig:
        try:
            return api_config.resolve(self._mode, self._server_url, self._server_token)
        except SimvueError:
            return api_config.ServerConfig()

    # -- helpers -------------------------------------------------------------------------

    def _record_checked(self, call: str, build: Callable[[], tuple]) -> bool:
        """Build a record (validating the caller's input) and send it, or report the error."""
        try:
            record = build()
        except SimvueError as exc:
            return self._fail(call, exc)
        return self._record(record, call)
