"""Reading runs from a server with the same calls as the local ``Store``.

The ``simvue`` command lists, shows and exports runs through this when a server is
configured.  Runs, events and folders are read through the Simvue API's collections; metric
values through ``GET /api/runs/{id}/metrics``, the bulk read that ``simvue server`` offers.
"""

from __future__ import annotations

import json
from array import array
from typing import Any
from urllib.parse import quote

from ..store import RunNotFound
from ..validation import timestamp as parse_timestamp
from .connection import Connection, ServerRejected

PAGE = 100


class RemoteStore:
    """The read side of ``simvue.store.Store``, answered by a server."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.path = connection.base
        self._metric_cache: dict[str, dict[str, dict[str, list]]] = {}

    def close(self) -> None:
        self.connection.close()

    def runs(self, *, status: str | None = None, folder: str | None = None) -> list[dict]:
        filters = [f"status == {status}"] if status else []
        runs = [_run_dict(run) for run in self._all("/runs", {"filters": json.dumps(filters)} if filters else {})]
        if folder is not None:
            prefix = folder.rstrip("/") + "/"
            runs = [r for r in runs if r["folder"] == folder or r["folder"].startswith(prefix)]
        return sorted(runs, key=lambda r: r["created"] or 0.0)

    def run(self, name_or_id: str) -> dict:
        try:
            return _run_dict(self.connection.request("GET", f"/runs/{name_or_id}"))
        except ServerRejected as exc:
            if exc.status not in (400, 404, 422):
                raise
        found = self._all("/runs", {"filters": json.dumps([f"name == {name_or_id}"])})
        if not found:
            raise RunNotFound(f"no run named {name_or_id!r} on {self.path}")
        return max((_run_dict(run) for run in found), key=lambda r: r["created"] or 0.0)

    def metric_names(self, run_id: str) -> list[str]:
        return sorted(self._metrics(run_id))

    def metric_series(self, run_id: str, name: str) -> dict[str, array]:
        series = self._metrics(run_id).get(name, {})
        return {
            "steps": array("q", series.get("steps", [])),
            "times": array("d", series.get("times", [])),
            "timestamps": array("d", [parse_timestamp(ts) for ts in series.get("timestamps", [])]),
            "values": array("d", series.get("values", [])),
        }

    def metric_counts(self, run_id: str) -> dict[str, int]:
        return {name: len(series.get("values", [])) for name, series in sorted(self._metrics(run_id).items())}

    def _metrics(self, run_id: str) -> dict[str, dict[str, list]]:
        """Every series of a run, read in one request and kept for this object's life."""
        if run_id not in self._metric_cache:
            answer = self.connection.request("GET", f"/runs/{run_id}/metrics") or {}
            self._metric_cache[run_id] = answer.get("data", {})
        return self._metric_cache[run_id]

    def grids(self, run_id: str) -> list[dict]:
        """The run's grids, shaped as ``Store.grids``."""
        found = {g["id"]: {"id": g["id"], "name": g["name"], "axes": g["grid"], "labels": g["labels"]}
                 for g in self._run_grids(run_id)}
        return sorted(found.values(), key=lambda g: (g["name"], g["id"]))

    def grid_metrics(self, run_id: str) -> dict[str, str]:
        return {g["metric"]: g["id"] for g in sorted(self._run_grids(run_id), key=lambda g: g["metric"])}

    def _run_grids(self, run_id: str) -> list[dict]:
        answer = self.connection.request("GET", f"/runs/{run_id}/grids") or []
        return [g for g in answer if isinstance(g, dict) and {"id", "name", "metric", "grid", "labels"} <= g.keys()]

    def array_values(self, run_id: str, metric: str) -> list[dict]:
        """The values of an array metric by step, shaped as ``Store.array_values``: the span
        says which steps to ask for, one request each."""
        path = f"/runs/{run_id}/metrics/{quote(metric, safe='/')}"
        span = (self.connection.request("GET", f"{path}/span") or [{}])[0]
        if not span.get("steps"):
            return []
        found = []
        for step in range(span["first_step"], span["last_step"] + 1):
            try:
                answer = self.connection.request("GET", f"{path}/values", params={"step": step})
            except ServerRejected as exc:
                if exc.status == 404:  # no value at this step
                    continue
                raise
            values, shape = _flattened(answer["array"])
            found.append({"step": answer["step"], "time": answer["time"],
                          "timestamp": parse_timestamp(answer["timestamp"]), "shape": shape, "values": values})
            if len(found) == span["steps"]:
                break
        return found

    def events(self, run_id: str) -> list[dict]:
        return [
            {"timestamp": parse_timestamp(e["timestamp"]), "message": e["message"], "level": e.get("log_level", "info")}
            for e in self._all("/events", {"run": run_id})
        ]

    def alerts(self, run_id: str) -> list[dict]:
        """The run's alerts as the server lists them on the run (definition, status, and when
        it first fired, where the server says)."""
        run = self.connection.request("GET", f"/runs/{run_id}") or {}
        alerts = []
        for entry in run.get("alerts") or []:
            alert = entry.get("alert", {})
            definition = {**(alert.get("alert") or {}), "name": alert.get("name"), "source": alert.get("source")}
            if "frequency" in definition:
                definition["frequency_s"] = definition.pop("frequency") * 60.0
            fired_at = entry.get("fired_at")
            alerts.append({**definition, "definition": definition, "status": entry.get("status", "ok"),
                           "fired_at": parse_timestamp(fired_at) if isinstance(fired_at, str) and fired_at else None})
        return alerts

    def artifacts(self, run_id: str) -> list[dict]:
        """The run's artifacts (``GET /api/artifacts?runs=[id]``), shaped as ``Store.artifacts``."""
        found = []
        for artifact in self._all("/artifacts", {"runs": json.dumps([run_id])}):
            created = artifact.get("created")
            found.append(
                {
                    "name": artifact.get("name"),
                    "category": (artifact.get("runs") or {}).get(run_id) or artifact.get("category"),
                    "size": artifact.get("size"),
                    "checksum": artifact.get("checksum"),
                    "mime_type": artifact.get("mime_type"),
                    "original_path": artifact.get("original_path"),
                    "metadata": artifact.get("metadata") or {},
                    "created": parse_timestamp(created) if isinstance(created, str) and created else None,
                    "id": artifact.get("id"),
                    "url": artifact.get("url"),
                }
            )
        return sorted(found, key=lambda a: a["name"] or "")

    def artifact_bytes(self, run_id: str, name: str) -> bytes:
        """One artifact's content, from its download ``url`` (or ``/api/artifacts/{id}/content``)."""
        for artifact in self.artifacts(run_id):
            if artifact["name"] == name:
                url = artifact["url"] or f"{self.connection.base}/artifacts/{artifact['id']}/content"
                response = self.connection._session.get(url, timeout=self.connection.timeout)
                if response.status_code >= 400:
                    raise ServerRejected("GET", url, response.status_code, response.text[:200])
                return response.content
        raise KeyError(f"run {run_id} has no artifact named {name!r}")

    def folder(self, path: str) -> dict | None:
        found = self._all("/folders", {"filters": json.dumps([f"path == {path}"])})
        for folder in found:
            if folder.get("path") == path:
                return {key: folder.get(key) for key in ("path", "description", "metadata", "tags")}
        return None

    def _all(self, path: str, params: dict[str, Any]) -> list[dict]:
        items: list[dict] = []
        while True:
            page = self.connection.request("GET", path, params={**params, "start": len(items), "count": PAGE}) or {}
            data = page.get("data", []) if isinstance(page, dict) else page
            items.extend(data)
            if len(data) < PAGE:
                return items


def _run_dict(run: dict) -> dict:
    """A server's run object in the shape ``Store.run`` returns."""

    def seconds(key: str) -> float | None:
        value = run.get(key)
        return parse_timestamp(value) if isinstance(value, str) and value else None

    return {
        "id": run["id"],
        "name": run.get("name", ""),
        "folder": run.get("folder", "/"),
        "description": run.get("description"),
        "status": run.get("status", ""),
        "metadata": run.get("metadata") or {},
        "tags": run.get("tags") or [],
        "system": run.get("system") or {},
        "created": seconds("created"),
        "started": seconds("started"),
        "ended": seconds("endtime"),
        "heartbeat": seconds("heartbeat"),
        "heartbeat_timeout_s": run.get("heartbeat_timeout"),
        "options": {
            key: run[key] for key in ("ttl", "visibility", "notifications") if key in run
        },
    }


def _flattened(nested: Any) -> tuple[array, list[int]]:
    """The numbers of nested lists, in C order, and their shape."""
    shape: list[int] = []
    level = nested
    while isinstance(level, list):
        shape.append(len(level))
        level = level[0] if level else None
    flat = nested
    for _ in shape[1:]:
        flat = [value for row in flat for value in row]
    return array("d", flat), shape
