"""``simvue.Client``: read runs back for analysis, from the local store or a server.

The method names and their main arguments follow the Simvue client's ``Client``, so
analysis scripts written for it keep working::

    from simvue import Client
    client = Client()
    for run_id, run in client.get_runs(["status == completed", "has tag.mpi"]):
        print(run.name, run.metadata)
    values = client.get_metric_values(["rank0/loss"], "step", run_ids=[run_id])
    # {"rank0/loss": {(0, run_id): 1.0, (1, run_id): 0.98, ...}}

With a server configured (see docs/online.md) it reads the server; otherwise, or with
``offline=True``, the local store (``store=`` or ``$SIMVUE_STORE`` or ``./.simvue``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .api import config as api_config
from .api.connection import Connection
from .api.remote import RemoteStore
from .artifacts import deserialize
from .config import Settings
from .errors import SimvueRunError, SimvueValueError
from .store import RunNotFound, Store
from .validation import format_timestamp, optional_timestamp

XAXES = ("step", "time", "timestamp")
_SERIES_KEY = {"step": "steps", "time": "times", "timestamp": "timestamps"}


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """One run as read back: the fields a Simvue ``Run`` object offers for reading."""

    id: str
    name: str
    status: str
    folder: str
    description: str | None
    tags: list[str]
    metadata: dict[str, Any]
    system: dict[str, Any]
    created: str | None
    started: str | None
    endtime: str | None

    @classmethod
    def from_store(cls, run: dict[str, Any]) -> RunInfo:
        return cls(
            id=run["id"], name=run["name"], status=run["status"], folder=run["folder"],
            description=run["description"], tags=list(run["tags"]), metadata=run["metadata"],
            system=run["system"], created=optional_timestamp(run["created"]),
            started=optional_timestamp(run["started"]), endtime=optional_timestamp(run["ended"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Client:
    """Reads runs, metrics and events (see the module docstring)."""

    def __init__(
        self,
        *,
        store: str | Path | None = None,
        offline: bool = False,
        server_url: str | None = None,
        server_token: str | None = None,
    ) -> None:
        server = api_config.resolve("offline" if offline else None, server_url, server_token)
        if server.online:
            self._source: Store | RemoteStore = RemoteStore(Connection(server))
        else:
            self._source = Store(Path(store) if store else Settings().store_path())
        self.online = server.online

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs -------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunInfo:
        """The run with this id (or, failing that, the newest run of this name)."""
        try:
            return RunInfo.from_store(self._source.run(run_id))
        except RunNotFound as exc:
            raise SimvueRunError(str(exc)) from None

    def get_run_id_from_name(self, name: str) -> str:
        return self.get_run(name).id

    def get_run_name_from_id(self, run_id: str) -> str:
        return self.get_run(run_id).name

    def get_runs(
        self,
        filters: list[str] | None = None,
        *,
        output_format: str = "objects",
        count_limit: int | None = 100,
        start_index: int = 0,
        folder: str | None = None,
        tags: list[str] | None = None,
        status: str | None = None,
        **_ignored: Any,
    ) -> Any:
        """Runs matching every filter, oldest first.

        ``filters`` takes the Simvue forms ``name == X``, ``status == X``, ``folder.path == X``,
        ``has tag.X`` and ``metadata.KEY == X``; ``folder`` (with sub-folders), ``tags`` (all
        of them) and ``status`` are the same as keywords.  ``output_format``: ``objects``
        (pairs of id and ``RunInfo``), ``dict`` (id -> dict) or ``dataframe`` (pandas).
        """
        tests = [_run_filter(text) for text in filters or []]
        runs = [
            RunInfo.from_store(run)
            for run in self._source.runs(status=status, folder=folder)
            if set(tags or ()) <= set(run["tags"])
        ]
        runs = [run for run in runs if all(test(run) for test in tests)]
        runs = runs[start_index:][:count_limit] if count_limit is not None else runs[start_index:]
        if output_format == "objects":
            return iter([(run.id, run) for run in runs])
        if output_format == "dict":
            return {run.id: run.to_dict() for run in runs}
        if output_format == "dataframe":
            return _pandas().DataFrame([run.to_dict() for run in runs])
        raise SimvueValueError(f"output_format must be objects, dict or dataframe, not {output_format!r}")

    def get_folder(self, folder_path: str) -> dict[str, Any] | None:
        return self._source.folder(folder_path)

    # -- metrics and events -------------------------------------------------------------------

    def get_metrics_names(self, run_id: str) -> Iterator[str]:
        return iter(self._source.metric_names(self.get_run(run_id).id))

    def get_metric_series(self, run_id: str, name: str) -> dict[str, list]:
        """Every point of one series, in logging order: ``{"steps", "times", "timestamps",
        "values"}`` lists (timestamps as epoch seconds)."""
        series = self._source.metric_series(self.get_run(run_id).id, name)
        return {key: list(values) for key, values in series.items()}

    def get_metric_values(
        self,
        metric_names: list[str],
        xaxis: str,
        *,
        output_format: str = "dict",
        run_ids: list[str] | None = None,
        run_filters: list[str] | None = None,
        use_run_names: bool = False,
        aggregate: bool = False,
        max_points: int | None = None,
    ) -> Any:
        """``{metric: {(x, run): value}}`` for the runs given by id or by filters, as the
        Simvue client returns it; ``output_format="dataframe"`` gives a pandas frame with
        columns run, metric, x and value.  Names are stored names: ``rank3/loss``,
        ``loss.mean`` and so on.  Returns None when no run matches."""
        if not metric_names:
            raise SimvueValueError("no metric names were given")
        if xaxis not in XAXES:
            raise SimvueValueError(f"xaxis must be one of {', '.join(XAXES)}, not {xaxis!r}")
        if aggregate:
            raise SimvueValueError("aggregate=True is not supported; reduce across ranks with init(reduce=...)")
        if run_ids and run_filters:
            raise SimvueValueError("give run_ids or run_filters, not both")
        runs = [self.get_run(run_id) for run_id in run_ids] if run_ids else [
            run for _, run in self.get_runs(run_filters, count_limit=None)
        ]
        if not runs:
            return None
        rows: list[tuple[str, str, float, float]] = []  # run, metric, x, value
        for run in runs:
            label = run.name if use_run_names else run.id
            names = set(self._source.metric_names(run.id))
            for metric in metric_names:
                if metric not in names:
                    continue
                series = self._source.metric_series(run.id, metric)
                xs = series[_SERIES_KEY[xaxis]]
                points = list(zip(xs, series["values"]))
                if max_points and len(points) > max_points:
                    stride = -(-len(points) // max_points)
                    points = points[::stride]
                rows.extend((label, metric, x, value) for x, value in points)
        if output_format == "dataframe":
            return _pandas().DataFrame(rows, columns=["run", "metric", xaxis, "value"])
        if output_format != "dict":
            raise SimvueValueError(f"output_format must be dict or dataframe, not {output_format!r}")
        values: dict[str, dict[tuple, float]] = {metric: {} for metric in metric_names}
        for label, metric, x, value in rows:
            values[metric][(x, label)] = value
        return values

    def get_events(
        self,
        run_id: str,
        *,
        message_contains: str | None = None,
        start_index: int | None = None,
        count_limit: int | None = None,
    ) -> list[dict[str, str]]:
        """The run's events in order: ``{"message", "timestamp", "log_level"}``."""
        events = [
            {"message": e["message"], "timestamp": format_timestamp(e["timestamp"]), "log_level": e["level"]}
            for e in self._source.events(self.get_run(run_id).id)
            if message_contains is None or message_contains in e["message"]
        ]
        events = events[start_index or 0 :]
        return events if count_limit is None else events[:count_limit]

    def get_alerts(self, run_id: str, *, critical_only: bool = False) -> list[dict[str, Any]]:
        """The run's alerts: definition fields, ``status`` (ok/critical) and ``fired_at``."""
        alerts = [alert_summary(alert) for alert in self._source.alerts(self.get_run(run_id).id)]
        return [a for a in alerts if a["status"] == "critical"] if critical_only else alerts

    # -- artifacts -------------------------------------------------------------------------------

    def list_artifacts(self, run_id: str) -> list[dict[str, Any]]:
        """The run's artifacts: ``{name, category, size, checksum, mime_type, ...}``."""
        return self._source.artifacts(self.get_run(run_id).id)

    def get_artifact(self, run_id: str, name: str, *, allow_pickle: bool = False) -> Any:
        """An artifact's content as the object it was saved from (numpy array, dict, ...),
        or its bytes for a file (see docs/artifacts.md)."""
        run = self.get_run(run_id)
        listed = {artifact["name"]: artifact for artifact in self._source.artifacts(run.id)}
        if name not in listed:
            raise SimvueRunError(f"run {run.name!r} has no artifact named {name!r}")
        data = self._source.artifact_bytes(run.id, name)
        return deserialize(data, listed[name]["mime_type"], allow_pickle=allow_pickle)

    def get_artifact_as_file(self, run_id: str, name: str, output_dir: str | Path = ".") -> Path:
        """Write an artifact's content to ``output_dir`` (under its base name); its path."""
        run = self.get_run(run_id)
        data = self._source.artifact_bytes(run.id, name)
        target = Path(output_dir) / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def abort_run(self, run_id: str, reason: str) -> bool:
        """Ask a running job to stop (needs a server; see docs/online.md, abort requests)."""
        if not isinstance(self._source, RemoteStore):
            raise SimvueRunError("abort_run needs a server: a local run can only be stopped by its job")
        self._source.connection.request("PUT", f"/runs/{self.get_run(run_id).id}/abort", json={"reason": reason})
        return True


def alert_summary(alert: dict[str, Any]) -> dict[str, Any]:
    """A stored alert as exported: its definition, ``status`` and ``fired_at`` (ISO)."""
    fields = ("name", "source", "rule", "metric", "threshold", "range_low", "range_high", "pattern")
    summary = {key: alert[key] for key in fields if alert.get(key) is not None}
    if alert.get("source") == "metrics":
        summary["window"] = alert.get("window")
    if alert.get("source") in ("metrics", "events") and alert.get("frequency_s") is not None:
        summary["frequency"] = alert["frequency_s"] / 60.0
    summary.update(status=alert["status"], fired_at=optional_timestamp(alert["fired_at"]))
    if not alert.get("attached", True):
        summary["attached"] = False
    return summary


def _run_filter(text: str):
    """A predicate on ``RunInfo`` for one Simvue filter string."""
    text = text.strip()
    if text.startswith("has tag."):
        tag = text[len("has tag."):]
        return lambda run: tag in run.tags
    field, operator, value = (part.strip() for part in text.partition("=="))
    if operator != "==" or not field:
        raise SimvueValueError(f"unsupported filter {text!r}: use 'FIELD == VALUE' or 'has tag.NAME'")
    if field == "folder.path":
        return lambda run: run.folder == value
    if field in ("name", "status", "id", "description"):
        return lambda run: str(getattr(run, field)) == value
    if field.startswith("metadata."):
        keys = field[len("metadata."):].split(".")

        def matches(run: RunInfo) -> bool:
            node: Any = run.metadata
            for key in keys:
                if not isinstance(node, dict) or key not in node:
                    return False
                node = node[key]
            return node == _literal(value)

        return matches
    raise SimvueValueError(f"unsupported filter field {field!r} in {text!r}")


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pandas():
    try:
        import pandas
    except ImportError:
        raise SimvueValueError("output_format='dataframe' needs pandas: pip install pandas") from None
    return pandas
