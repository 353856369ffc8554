"""Older and alternative spellings of the ``Run`` API (the ``Simvue()`` client, Simtrack,
OpsML-style verbs), kept so that scripts written for them run unchanged.

Every method here is a thin mapping onto a ``Run`` call: it records the same records, returns
``True``/``False`` like the rest of the API, and reports bad input through the run's error
policy (``suppress_errors``).  See ``docs/compat.md`` for the table of old call -> behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import validation
from .artifacts import ArtifactsMixin
from .errors import SimvueError, SimvueTypeError, SimvueValueError
from .transport.protocol import MetadataRecord, RecordKind, TagsRecord

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

    # -- helpers -------------------------------------------------------------------------

    def _record_checked(self, call: str, build: Callable[[], tuple]) -> bool:
        """Build a record (validating the caller's input) and send it, or report the error."""
        try:
            record = build()
        except SimvueError as exc:
            return self._fail(call, exc)
        return self._record(record, call)
