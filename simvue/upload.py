"""Sending runs to a Simvue server.  A run's uploader and ``simvue push`` share one replicator.

The local store is the only place the aggregator writes.  When a server is configured, an
``Uploader`` follows the store: a thread in the aggregator's process that copies the run from
the store to the server with a ``Replicator``, remembering in the store's ``uploads`` table
how far it got (a metric chunk cursor, an event cursor, and the run fields last sent).  So

* a server that is down or answers 5xx/429 costs nothing but time: the replicator backs off
  and resumes from its cursor, in the order the data was committed;
* ``simvue push`` after the job ends, or after an interrupted push, sends only what is left;
* metric and event batches carry an ``Idempotency-Key`` so a server that honours it (ours
  does) never applies one twice, even if the answer to a request was lost.

Artifacts follow the Simvue upload flow (``POST /api/artifacts``, ``PUT`` the content to the
returned ``url`` unless the server already has it, ``PUT /api/artifacts/{id}`` uploaded,
``PUT /api/runs/{id}/artifacts/{aid}`` with the category); each one finished is remembered in
the store's ``artifact_uploads`` table, so a resumed upload sends only the rest.

A run's final status is sent only after all of its data.  Requests per run are bounded:
one pass every ``upload_interval_s`` with at most one metrics and one events request unless
there is a backlog (then back-to-back batches of up to ``MAX_POINTS_PER_REQUEST`` points),
a heartbeat every ``server_heartbeat_interval_s`` and an abort poll every
``abort_poll_interval_s``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import requests

from ._util import nested
from .abort import AbortSignal
from .api.config import ServerConfig
from .api.connection import Backoff, Connection, ServerRejected, ServerUnavailable, clip, describe_failure, is_local
from .config import DEFAULT_STORE_DIR, Settings
from .errors import SimvueWarning
from .store import Store, still_stopping
from .store.sqlite import pack_column
from .validation import FINAL_STATUSES, format_timestamp, optional_timestamp

# How long ``Run.init`` waits for the server's first answers, all of them together (the
# version handshake, then creating the folder and the run).  A server that has not answered
# by then does not hold up the job: the run starts locally and the uploader's thread creates
# it on the server, with the ordinary timeouts and backoff, once the server answers.
INIT_TIMEOUT_S = 5.0
# A server on this machine that refuses connections at ``init`` may be one started a moment
# before (``simvue server &`` then the job, as docs/online.md shows): it is asked again every
# STARTING_SERVER_POLL_S for up to STARTING_SERVER_WAIT_S (within INIT_TIMEOUT_S) before the
# run starts without it.  A remote server that refuses is not waited for.
STARTING_SERVER_WAIT_S = 3.0
STARTING_SERVER_POLL_S = 0.1
MAX_POINTS_PER_REQUEST = 100_000
MAX_EVENTS_PER_REQUEST = 16_000
MAX_COLUMN_POINTS_PER_REQUEST = 500_000  # 16 MB of columns
MAX_ARRAY_VALUES_PER_REQUEST = 1_000_000  # numbers in array values (about 9 MB packed)
CHUNKS_PER_READ = 16
MIN_SERVER_HEARTBEAT_TIMEOUT_S = 180.0
log = logging.getLogger(__name__)


class Replicator:
    """Copies one run from a local store to a server, resumably.  One thread at a time."""

    def __init__(self, store: Store, connection: Connection, run_id: str, *, upload_format: str = "auto") -> None:
        self.store = store
        self.connection = connection
        self.run_id = run_id
        self.upload_format = upload_format
        self.server = connection.config.url or ""
        self.state = store.upload(run_id, self.server) or {
            "remote_id": None,
            "folder_id": None,
            "chunk_id": 0,
            "chunk_offset": 0,
            "event_id": 0,
            "sent": {},
            "state": "pending",
            "error": None,
        }
        self._second_prefixes: dict[int, str] = {}

    @property
    def remote_id(self) -> str | None:
        return self.state["remote_id"]

    @property
    def complete(self) -> bool:
        return self.state["state"] == "sent"

    def _save(self, **fields: Any) -> None:
        self.state.update(fields)
        self.store.save_upload(self.run_id, self.server, **fields)

    def reject(self, error: str) -> None:
        """Record that the server refused this run; it stays local until pushed again."""
        self._save(state="rejected", error=error)

    def create(self, heartbeat_interval_s: float, deadline: float | None = None) -> str:
        """Create the run (and its folder) on the server, once; ``deadline`` (monotonic) bounds
        the wait for the server's answers.

        The run is dated by its own times, not by when it reaches the server: ``started`` is
        sent (and ``created`` too, to a server that keeps it), so a run pushed or uploaded
        late keeps its place among the others.  The creation carries an ``Idempotency-Key``
        naming the local run: a creation retried after its answer was lost (or not waited
        for) gives the same run on a server that honours the key, as ``simvue server`` does."""
        if self.remote_id is not None:
            return self.remote_id
        run = self.store.run(self.run_id)
        folder = self.connection.request(
            "POST", "/folders", json={"path": run["folder"]}, conflict_ok=True, deadline=deadline
        ) or {}
        status = "created" if run["status"] == "created" else "running"
        timeout = max(run["heartbeat_timeout_s"] or 0.0, 3 * heartbeat_interval_s, MIN_SERVER_HEARTBEAT_TIMEOUT_S)
        body = {
            "name": run["name"],
            "folder": run["folder"],
            "status": status,
            "description": run["description"],
            "tags": run["tags"],
            "metadata": run["metadata"],
            "system": run["system"],
            "heartbeat_timeout": timeout,
            "ttl": run["options"].get("ttl"),
            "alerts": [],
            "notifications": run["options"].get("notifications", {"state": "none"}),
            "visibility": run["options"].get("visibility", {"tenant": False, "public": False, "users": []}),
        }
        if status == "running" and run["started"] is not None:
            body["started"] = format_timestamp(run["started"])
        if self.connection.keeps_client_times:
            body["created"] = format_timestamp(run["created"])
        answer = self.connection.request(
            "POST", "/runs", json=body, conflict_ok=True, deadline=deadline,
            headers={"Idempotency-Key": f"{self.run_id}/create"},
        )
        if not isinstance(answer, dict) or not answer.get("id"):
            raise ServerRejected("POST", "/runs", 200, f"the answer has no run id: {answer!r}")
        sent = {"status": status, "metadata": run["metadata"], "tags": run["tags"], "description": run["description"],
                "started": body.get("started") and run["started"]}
        self._save(remote_id=answer["id"], folder_id=folder.get("id"), sent=sent, state="sending", error=None)
        return answer["id"]

    def send_metrics(self) -> int:
        """Send the next batch of metric points; returns how many were sent (0: caught up).

        The Simvue format has one entry per ``log_metrics`` call: the metrics one call logged
        are stored as chunks of one commit with the same steps, times and timestamps (a
        group, see ``_next_points``), so each group's rows become entries as they are."""
        if self.connection.columnar and self.upload_format == "auto":
            return self.send_columns()
        groups, cursor = self._next_points(MAX_POINTS_PER_REQUEST)
        entries = []
        timestamp = self._timestamp
        for steps, times, stamps, values in groups:
            names = list(values)
            for step, t, ts, row in zip(steps, times, stamps, zip(*values.values())):
                entries.append({"time": t, "timestamp": timestamp(ts), "step": step, "values": dict(zip(names, row))})
        return self._send_points(groups, cursor, "/metrics", {"run": self.remote_id, "metrics": entries})

    def send_columns(self) -> int:
        """``send_metrics`` to a server that takes the store's columns (``POST
        /api/runs/{id}/columns``): each metric's steps, times, timestamps and values as packed
        little-endian arrays, from the same cursor, so that either format resumes where the
        other stopped."""
        groups, cursor = self._next_points(MAX_COLUMN_POINTS_PER_REQUEST)
        columns: dict[str, list[bytearray]] = {}
        for steps, times, stamps, values in groups:
            shared = (pack_column(steps), pack_column(times), pack_column(stamps))
            for name, column in values.items():
                parts = columns.get(name)
                if parts is None:
                    parts = columns[name] = [bytearray(), bytearray(), bytearray(), bytearray()]
                for part, packed in zip(parts, (*shared, pack_column(column))):
                    part += packed
        body = {"metrics": {name: [bytes(part) for part in parts] for name, parts in columns.items()}}
        return self._send_points(groups, cursor, f"/runs/{self.remote_id}/columns", body)

    def _send_points(self, groups: list[tuple], cursor: tuple[int, int, int], path: str, body: dict) -> int:
        """Post ``body`` (the points of ``groups``) once, then move the cursor past them."""
        chunk_id, offset = self.state["chunk_id"], self.state["chunk_offset"]
        sent = sum(len(steps) * len(values) for steps, _, _, values in groups)
        if sent:
            self._post(path, body, f"{self.run_id}/metrics/{chunk_id}.{offset}")
        if cursor[:2] != (chunk_id, offset):  # also past empty chunks
            self._save(chunk_id=cursor[0], chunk_offset=cursor[1], sent={**self.state["sent"], "chunk_group": cursor[2]})
        return sent

    def _next_points(self, budget: int) -> tuple[list[tuple], tuple[int, int, int]]:
        """The next points to send, about ``budget`` of them (at least one row), as groups
        ``(steps, times, timestamps, {metric: values})``, and the cursor after them.

        A group is a run of consecutive chunks with the same steps, times and timestamps
        and different metrics: what one commit holds of the calls that logged them together.
        The cursor is ``(chunk id, offset, group size)``: the next point is at ``offset`` in
        each of the ``group size`` chunks from ``chunk id`` on (with an offset of 0, the group
        is found again when reading).  A cursor saved before groups existed has no size: its
        offset is in one chunk."""
        chunk_id, offset = self.state["chunk_id"], self.state["chunk_offset"]
        size = self.state["sent"].get("chunk_group", 1) if offset else 0
        chunks = self._chunks_from(chunk_id)
        following = next(chunks, None)
        groups: list[tuple] = []
        cursor = (chunk_id, offset, size)
        while following is not None and budget > 0:
            members = [following]
            following = next(chunks, None)
            while following is not None and (
                len(members) < size if size else _same_rows(following, members)
            ):
                members.append(following)
                following = next(chunks, None)
            _, _, steps, times, stamps, _ = members[0]
            take = min(len(steps) - offset, max(1, budget // len(members)))
            stop = offset + take
            groups.append((steps[offset:stop], times[offset:stop], stamps[offset:stop],
                           {member[1]: member[5][offset:stop] for member in members}))
            budget -= take * len(members)
            if stop < len(steps):
                cursor = (members[0][0], stop, len(members))
                break
            cursor, offset, size = (members[-1][0] + 1, 0, 0), 0, 0
        return groups, cursor

    def points_left(self) -> int:
        offset = self.state["chunk_offset"]
        size = self.state["sent"].get("chunk_group", 1) if offset else 0
        return self.store.metric_points_from(self.run_id, self.state["chunk_id"]) - offset * size

    def _chunks_from(self, chunk_id: int) -> Iterator[tuple]:
        """The run's metric chunks from ``chunk_id`` on, read a few at a time (a request
        takes only what fits in it, so reading the whole rest of the run would be waste)."""
        while True:
            rows = self.store.metric_chunks_from(self.run_id, chunk_id, CHUNKS_PER_READ)
            yield from rows
            if len(rows) < CHUNKS_PER_READ:
                return
            chunk_id = rows[-1][0] + 1

    def send_events(self) -> int:
        """Send the next batch of events; returns how many were sent (0: caught up)."""
        after = self.state["event_id"]
        rows = self.store.events_after(self.run_id, after, MAX_EVENTS_PER_REQUEST)
        if not rows:
            return 0
        body = {
            "run": self.remote_id,
            "events": [
                {"message": message, "log_level": level, "timestamp": self._timestamp(ts)}
                for _, ts, message, level in rows
            ],
        }
        self._post("/events", body, f"{self.run_id}/events/{after}")
        self._save(event_id=rows[-1][0])
        return len(rows)

    def send_grids(self) -> None:
        """Create the run's grids on the server and put its array metrics on them, each
        once (and again when a metric moves to another grid)."""
        remote = dict(self.state["sent"].get("grids", {}))  # grid id here -> id there
        placed = dict(self.state["sent"].get("grid_metrics", {}))  # metric -> grid id here
        todo = {m: g for m, g in self.store.grid_metrics(self.run_id).items() if placed.get(m) != g}
        if not todo:
            return
        grids = {grid["id"]: grid for grid in self.store.grids(self.run_id)}
        for metric, grid_id in todo.items():
            if grid_id not in remote:
                grid = grids[grid_id]
                answer = self.connection.request(
                    "POST", "/grids", json={"name": grid["name"], "grid": grid["axes"], "labels": grid["labels"]}
                )
                if not isinstance(answer, dict) or not answer.get("id"):
                    raise ServerRejected("POST", "/grids", 200, f"the answer has no grid id: {answer!r}")
                remote[grid_id] = answer["id"]
                self._save(sent={**self.state["sent"], "grids": remote})
            self.connection.request("PUT", f"/runs/{self.remote_id}/grids/{remote[grid_id]}", json={"metric": metric})
            placed[metric] = grid_id
            self._save(sent={**self.state["sent"], "grid_metrics": placed})

    def send_arrays(self) -> int:
        """Send the next batch of array values (after their grids); returns how many were
        sent (0: caught up)."""
        after = self.state["sent"].get("array_row", 0)
        rows = self.store.array_values_after(self.run_id, after, MAX_ARRAY_VALUES_PER_REQUEST)
        if not rows:
            return 0
        self.send_grids()
        remote, placed = self.state["sent"].get("grids", {}), self.state["sent"].get("grid_metrics", {})
        body = []
        for _, metric, step, t, ts, shape, values in rows:
            grid_id = placed.get(metric)
            if grid_id is None:  # its grid is not stored yet: the next pass sends it
                break
            body.append({"metric": metric, "grid": remote[grid_id], "step": step, "time": t,
                         "timestamp": self._timestamp(ts), "array": nested(values, shape)})
        if not body:
            return 0
        last = rows[len(body) - 1][0]
        self.connection.request(
            "POST", f"/runs/{self.remote_id}/metrics/", packed=body,
            headers={"Idempotency-Key": f"{self.run_id}/arrays/{after}"},
        )
        self._save(sent={**self.state["sent"], "array_row": last})
        return len(body)

    def send_changes(self, run: dict[str, Any], *, job_over: bool = False) -> bool:
        """Send what changed in the run's fields since last time; ``run`` must have been read
        before the data was drained, so a final status is never sent ahead of data.
        Returns True once the run's final status is on the server."""
        sent = dict(self.state["sent"])
        update: dict[str, Any] = {}
        for field in ("metadata", "tags", "description"):
            if run[field] != sent.get(field):
                update[field] = run[field]
        status = run["status"]
        if status != sent.get("status"):
            update["status"] = status
        if status in FINAL_STATUSES and ("status" in update or run["ended"] != sent.get("ended")):
            # again when the end time stored ahead of time is replaced by the final one
            update["endtime"] = format_timestamp(run["ended"] or time.time())
        if run["started"] is not None and run["started"] != sent.get("started"):
            # a run created before it started (init(running=False), then reconnect)
            update["started"] = format_timestamp(run["started"])
        if update:
            self.connection.request("PUT", f"/runs/{self.remote_id}", json=update)
            sent.update({key: value for key, value in update.items() if key not in ("endtime", "started")})
            sent["started"] = run["started"]
            sent["ended"] = run["ended"]
            self._save(sent=sent)
        folder = self.store.folder(run["folder"])
        details = folder and {key: folder[key] for key in ("metadata", "tags", "description")}
        if details and (details["metadata"] or details["tags"] or details["description"]) and details != sent.get(
            "folder"
        ):
            if self.state["folder_id"]:
                self.connection.request("PUT", f"/folders/{self.state['folder_id']}", json=details)
            sent["folder"] = details
            self._save(sent=sent)
        if status in FINAL_STATUSES and (job_over or (run["ended"] is not None and not still_stopping(run))):
            # A final status is stored before the run has ended (a terminated job's, at
            # once, with its processes ``stopping``): while the job lives, the run is
            # complete on the server only once its last commit is in the store.
            self._save(state="sent", error=None)
            return True
        return False

    def sync(
        self,
        heartbeat_interval_s: float,
        progress: Callable[[int], None] | None = None,
        *,
        job_over: bool = False,
        artifact_progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Send everything the store holds for the run now.  True when the run is complete
        on the server (its final status sent).  ``progress(points)`` is called as metric
        points go, then ``artifact_progress(bytes)`` as artifacts' content goes."""
        self.create(heartbeat_interval_s)
        run = self.store.run(self.run_id)
        points = events = 0
        while sent := self.send_metrics():
            points += sent
            if progress:
                progress(sent)
        while sent := self.send_events():
            events += sent
        while self.send_arrays():
            pass
        self.send_alerts()
        artifacts = self.send_artifacts(artifact_progress)
        complete = self.send_changes(run, job_over=job_over)
        if points or events or artifacts:
            log.debug("run %s: sent %d points, %d events, %d artifacts to %s", self.run_id, points, events, artifacts,
                      self.server)
        return complete

    def _unsent_artifacts(self) -> list[dict[str, Any]]:
        done = self.store.artifact_uploads(self.run_id, self.server)
        return [a for a in self.store.artifacts(self.run_id) if done.get(a["name"], (None,))[0] != a["checksum"]]

    def artifact_bytes_left(self) -> int:
        """The size of the run's artifacts not yet on the server."""
        return sum(artifact["size"] or 0 for artifact in self._unsent_artifacts())

    def send_artifacts(self, progress: Callable[[int], None] | None = None) -> int:
        """Upload the run's artifacts not yet on the server; returns how many were sent.
        ``progress(bytes)`` is called as their content goes (each whole artifact counted
        once, whether its content went or the server already had it)."""
        count = 0
        for artifact in self._unsent_artifacts():
            name = artifact["name"]
            body = {key: artifact[key] for key in ("name", "original_path", "size", "mime_type", "checksum", "metadata")}
            answer = self.connection.request("POST", "/artifacts", json=body, conflict_ok=True)
            if not isinstance(answer, dict) or not answer.get("id"):
                raise ServerRejected("POST", "/artifacts", 200, f"the answer has no artifact id: {answer!r}")
            artifact_id = answer["id"]
            sent = 0

            def report(size: int) -> None:
                nonlocal sent
                sent += size
                if progress:
                    progress(size)

            if answer.get("url"):
                self._upload_content(answer["url"], artifact["checksum"], report)
            self.connection.request("PUT", f"/artifacts/{artifact_id}", json={"uploaded": True})
            self.connection.request(
                "PUT", f"/runs/{self.remote_id}/artifacts/{artifact_id}", json={"category": artifact["category"]}
            )
            self.store.save_artifact_upload(self.run_id, self.server, name, artifact["checksum"], artifact_id)
            if (artifact["size"] or 0) > sent:
                report((artifact["size"] or 0) - sent)
            count += 1
        return count

    def _upload_content(self, url: str, checksum: str, progress: Callable[[int], None] | None = None) -> None:
        """``PUT`` a blob to an upload URL (it carries its own authorisation: no token);
        ``progress(bytes)`` as it is read out."""
        try:
            with open(self.store.blobs.path(checksum), "rb") as content:
                body = content if progress is None else _Counted(content, progress)
                response = requests.put(url, data=body, timeout=self.connection.timeout)
        except requests.RequestException as exc:
            reason = describe_failure(exc, self.connection.timeout)
            raise ServerUnavailable(f"PUT {url.split('?')[0]}: {reason}", reason=reason) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise ServerUnavailable(
                f"PUT {url.split('?')[0]} answered {response.status_code}", reason=f"answered {response.status_code}"
            )
        if response.status_code >= 400:
            raise ServerRejected("PUT", url.split("?")[0], response.status_code, clip(response.text, 200))

    def send_alerts(self) -> None:
        """Define new alerts on the server, attach them to the run, and send state changes."""
        sent = dict(self.state["sent"])
        known: dict[str, dict] = dict(sent.get("alerts", {}))
        alerts = self.store.alerts(self.run_id)
        new = [alert for alert in alerts if alert["name"] not in known]
        for alert in new:
            answer = self.connection.request(
                "POST", "/alerts", params={"deduplicate": "True"}, json=_alert_body(alert), conflict_ok=True
            )
            if not isinstance(answer, dict) or not answer.get("id"):
                raise ServerRejected("POST", "/alerts", 200, f"the answer has no alert id: {answer!r}")
            # no status on the server yet (null there): the first pass sends what the run has, "ok" too
            known[alert["name"]] = {"id": answer["id"], "status": None}
        attached = [alert for alert in alerts if alert.get("attached", True)]
        if any(alert.get("attached", True) for alert in new):
            ids = [known[alert["name"]]["id"] for alert in attached]
            self.connection.request("PUT", f"/runs/{self.remote_id}", json={"alerts": ids})
        for alert in attached:
            entry = known[alert["name"]]
            if alert["status"] != entry["status"]:
                change: dict[str, Any] = {"status": alert["status"]}
                if self.connection.keeps_client_times and alert.get("fired_at") is not None:
                    change["fired_at"] = optional_timestamp(alert["fired_at"])
                self.connection.request("PUT", f"/alerts/{entry['id']}/status/{self.remote_id}", json=change)
                entry["status"] = alert["status"]
        if known != sent.get("alerts", {}):
            sent["alerts"] = known
            self._save(sent=sent)

    def heartbeat(self) -> None:
        self.connection.request("PUT", f"/runs/{self.remote_id}/heartbeat")

    def abort_requested(self) -> bool:
        answer = self.connection.request("GET", f"/runs/{self.remote_id}/abort")
        return bool(isinstance(answer, dict) and answer.get("status"))

    def _post(self, path: str, body: dict, key: str) -> None:
        self.connection.request("POST", path, packed=body, headers={"Idempotency-Key": key})

    def _timestamp(self, seconds: float) -> str:
        """``format_timestamp(seconds)``, three times faster: the date and time of day are
        formatted once per whole second."""
        whole = int(seconds // 1)
        micro = round((seconds - whole) * 1e6)
        if micro == 1_000_000:
            whole, micro = whole + 1, 0
        prefix = self._second_prefixes.get(whole)
        if prefix is None:
            if len(self._second_prefixes) > 100_000:
                self._second_prefixes.clear()
            prefix = self._second_prefixes[whole] = format_timestamp(whole)[:-6]  # "...T12:34:56."
        return f"{prefix}{micro:06d}"


def _same_rows(chunk: tuple, group: list[tuple]) -> bool:
    """Whether ``chunk`` (``(id, metric, steps, times, timestamps, values)``) belongs to the
    group of chunks ``group``: the same steps, times and timestamps, another metric."""
    first = group[0]
    return (
        chunk[2] == first[2] and chunk[3] == first[3] and chunk[4] == first[4]
        and all(member[1] != chunk[1] for member in group)
    )


def _alert_body(alert: dict[str, Any]) -> dict[str, Any]:
    """An alert definition in the shape Simvue servers take (``POST /api/alerts``)."""
    body: dict[str, Any] = {
        "name": alert["name"],
        "description": alert.get("description"),
        "notification": alert.get("notification", "none"),
        "source": alert["source"],
        "enabled": True,
        "abort": bool(alert.get("trigger_abort")),
    }
    frequency = alert["frequency_s"] / 60.0
    if alert["source"] == "metrics":
        rule = {"rule": alert["rule"], "frequency": frequency, "window": alert["window"], "metric": alert["metric"],
                "aggregation": "average"}
        if alert["rule"] in ("is above", "is below"):
            rule["threshold"] = alert["threshold"]
        else:
            rule.update(range_low=alert["range_low"], range_high=alert["range_high"])
        body["alert"] = rule
    elif alert["source"] == "events":
        body["alert"] = {"pattern": alert["pattern"], "frequency": frequency}
    return body


def start_upload(
    directory: Path, config: ServerConfig, run_id: str, run_name: str, settings: Settings, abort: AbortSignal
) -> Uploader | None:
    """Create run ``run_id`` of the store at ``directory`` on the server and start following
    it there.  A server that does not answer within ``INIT_TIMEOUT_S`` is retried by the
    uploader's thread, so the job is held up that long at most (one line on stderr says so);
    a server on this machine that is still starting is waited for, up to
    ``STARTING_SERVER_WAIT_S``.  A server that refuses the run raises ``ServerRejected`` in
    strict mode; with ``suppress_errors`` it gives one warning and None: the run stays in the
    local store, for ``simvue push``."""
    uploader = Uploader(directory, config, run_id, run_name, settings, abort)
    try:
        _create_when_listening(uploader, deadline=time.monotonic() + INIT_TIMEOUT_S)
    except ServerUnavailable as exc:
        os.write(
            2,
            f"simvue: the server at {config.url} {exc.reason}; run '{run_name}' is recorded locally"
            " and will be sent when the server answers\n".encode(),
        )
        uploader.warned_unreachable = True  # one line says so, not one here and one from the thread
    except ServerRejected as exc:
        uploader.replicator.reject(str(exc))
        uploader.close()
        if not settings.suppress_errors:
            raise
        warnings.warn(
            f"simvue: {exc}; the run is recorded in the local store only (send it later with simvue push)",
            SimvueWarning,
            stacklevel=4,
        )
        return None
    uploader.start()
    return uploader


def _create_when_listening(uploader: Uploader, deadline: float) -> None:
    """``uploader.create(deadline)``; while a server on this machine refuses connections, asked
    again every ``STARTING_SERVER_POLL_S`` for up to ``STARTING_SERVER_WAIT_S``: one started
    just before the job may not be listening yet."""
    patience = min(deadline, time.monotonic() + (STARTING_SERVER_WAIT_S if is_local(uploader.config.url) else 0.0))
    while True:
        try:
            uploader.create(deadline=deadline)
            return
        except ServerUnavailable as exc:
            if not exc.refused or time.monotonic() + STARTING_SERVER_POLL_S > patience:
                raise
        time.sleep(STARTING_SERVER_POLL_S)


class Uploader:
    """The aggregator's background thread that keeps a server in step with the store; a
    follower of the store (``aggregator.service.Follower``)."""

    def __init__(
        self,
        directory: Path,
        config: ServerConfig,
        run_id: str,
        run_name: str,
        settings: Settings,
        abort: AbortSignal,
    ) -> None:
        self.directory = directory
        self.config = config
        self.run_name = run_name
        self.settings = settings
        self.abort = abort
        self.connection = Connection(config)
        self.store = Store(directory)
        self.replicator = Replicator(self.store, self.connection, run_id, upload_format=settings.upload_format)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self.warned_unreachable = False  # the one stderr line about an unreachable server was written
        self._version_checked = False
        self.error: ServerRejected | None = None
        self._thread = threading.Thread(target=self._run, name="simvue-uploader", daemon=True)

    def create(self, deadline: float | None = None) -> None:
        """First contact, on the thread that starts the run: the version handshake and the
        run's creation, all answered by ``deadline`` (monotonic) or ``ServerUnavailable``.
        ``ServerUnavailable`` leaves both to the thread; ``ServerRejected`` is for the caller
        to report."""
        self.connection.check_version(deadline)
        self._version_checked = True
        self.replicator.create(self.settings.server_heartbeat_interval_s, deadline)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Release the connections of an uploader that was never started."""
        self.store.close()
        self.connection.close()

    def wake(self) -> None:
        self._wake.set()

    def finish(self, timeout_s: float) -> bool:
        """Send the rest, including the final status; False if the server did not take it
        all within ``timeout_s`` (the run then stays in the store, ready for ``simvue push``)."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)
        complete = self.replicator.complete
        if not complete:
            reason = str(self.error) if self.error else f"{self.config.url} could not be reached"
            store = self.directory
            hint = "" if store == Path(DEFAULT_STORE_DIR).absolute() else f" --store {store}"
            os.write(
                2,
                f"simvue: run '{self.run_name}' was not fully sent ({reason}); it is kept in {store}."
                f" Send it with: simvue push{hint} {self.run_name}\n".encode(),
            )
        return complete

    def _run(self) -> None:
        settings = self.settings
        backoff = Backoff(cap_s=settings.retry_max_interval_s)
        next_heartbeat = next_abort_poll = 0.0
        retry_at = 0.0
        aborted = False
        try:
            while True:
                if retry_at:
                    wait = retry_at - time.monotonic()
                else:
                    wait = 0.0 if self._closing.is_set() else settings.upload_interval_s
                if wait > 0:
                    self._wake.wait(wait)
                    self._wake.clear()
                if retry_at and time.monotonic() < retry_at:
                    continue  # woken during a backoff: keep waiting it out
                closing = self._closing.is_set()
                try:
                    if not self._version_checked:  # init did not get that far
                        self.connection.check_version()
                        self._version_checked = True
                    complete = self.replicator.sync(settings.server_heartbeat_interval_s)
                    now = time.monotonic()
                    if not complete and now >= next_heartbeat:
                        self.replicator.heartbeat()
                        next_heartbeat = now + settings.server_heartbeat_interval_s
                    if not complete and not aborted and now >= next_abort_poll:
                        next_abort_poll = now + settings.abort_poll_interval_s
                        if self.replicator.abort_requested():
                            aborted = True
                            self.abort.request("the server asked this run to stop")
                except ServerUnavailable as exc:
                    delay = backoff.next_delay(exc.retry_after)
                    log.debug("run %r: %s; retrying in %.1f s", self.run_name, exc, delay)
                    retry_at = time.monotonic() + delay
                    if not self.warned_unreachable:
                        self.warned_unreachable = True
                        os.write(
                            2,
                            f"simvue: the server at {self.config.url} {exc.reason}; retrying in the background,"
                            f" and run '{self.run_name}' is kept in the local store meanwhile\n".encode(),
                        )
                    continue
                retry_at = 0.0
                backoff.reset()
                if complete or closing:
                    return
        except ServerRejected as exc:
            self.error = exc
            self.replicator.reject(str(exc))
            os.write(2, f"simvue: {exc}; run '{self.run_name}' stays in the local store\n".encode())
        except Exception:  # noqa: BLE001 - the upload must never take the job down
            os.write(2, ("simvue: uploader failed:\n" + traceback.format_exc()).encode())
        finally:
            self.store.close()
            self.connection.close()


class _Counted:
    """A file being uploaded that reports each block as it is read out.  It has a length,
    so the upload is one plain request of known size (not chunked), as storage URLs expect."""

    def __init__(self, file: BinaryIO, progress: Callable[[int], None]) -> None:
        self._file, self._progress = file, progress
        self._length = os.fstat(file.fileno()).st_size - file.tell()

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        block = self._file.read(size)
        if block:
            self._progress(len(block))
        return block
