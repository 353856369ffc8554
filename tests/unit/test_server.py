"""``simvue server``: a real server process, spoken to over real HTTP."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import msgpack
import pytest
import requests

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')
import jwt  # noqa: E402 - part of the server extra

from simvue.server.db import RUN_TABLES
from simvue.server.local import ServerProcess
from simvue.store.sqlite import DATABASE_FILE

pytestmark = pytest.mark.timeout(60)

MSGPACK = {"Content-Type": "application/msgpack"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server shared by the tests of this module that need no special options."""
    with ServerProcess(tmp_path_factory.mktemp("shared") / "server") as running:
        yield running


def cli_token(data_dir: Path, *options: str) -> str:
    done = subprocess.run([sys.executable, "-m", "simvue.cli", "server", "token", "--data", str(data_dir), *options],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def create_run(server: ServerProcess, **fields) -> dict:
    body = {"folder": "/tests", "status": "running"} | fields
    response = server.api.post(f"{server.url}/api/runs", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def post_metrics(server: ServerProcess, run_id: str, points: list[dict], **headers) -> requests.Response:
    body = msgpack.packb({"run": run_id, "metrics": points}, use_bin_type=True)
    return server.api.post(f"{server.url}/api/metrics", data=body, headers=MSGPACK | headers)


def post_events(server: ServerProcess, run_id: str, events: list[dict], **headers) -> requests.Response:
    body = msgpack.packb({"run": run_id, "events": events}, use_bin_type=True)
    return server.api.post(f"{server.url}/api/events", data=body, headers=MSGPACK | headers)


def points(n: int, start: float = 1_790_000_000.0, **extra: float) -> list[dict]:
    return [
        {"time": 0.5 * i, "timestamp": iso(start + i), "step": i, "values": {"loss": 1.0 / (i + 1), **extra}}
        for i in range(n)
    ]


def test_version_handshake(server):
    assert server.api.get(f"{server.url}/api/version").json() == {
        "version": "1.3.0", "keeps_client_times": True, "columns": 1, "content_encodings": ["gzip"]}
    assert server.api.get(f"{server.url}/api/nosim/version").json() == {"version": "1.0.0"}


def test_a_request_without_a_valid_token_is_refused_with_the_reason(server):
    secret = bytes.fromhex((server.data / "server.secret").read_text().strip())
    now = int(time.time())
    stranger = b"a different secret of 32 bytes!!"
    cases = {
        None: "missing",
        "Basic dXNlcjpwdw==": "malformed Authorization",
        "Bearer not-a-jwt": "malformed token",
        "Bearer " + jwt.encode({"sub": "u", "exp": now - 10}, secret, algorithm="HS256"): "expired",
        "Bearer " + jwt.encode({"sub": "u", "exp": now + 99}, stranger, algorithm="HS256"): "signature",
        "Bearer " + jwt.encode({"sub": "u"}, secret, algorithm="HS256"): "'exp'",
    }
    for header, reason in cases.items():
        response = requests.get(f"{server.url}/api/runs", headers={"Authorization": header} if header else {})
        assert response.status_code == 401, header
        assert reason in response.json()["detail"], (header, response.json())
    assert server.api.get(f"{server.url}/api/runs").status_code == 200


def test_issued_tokens_are_standard_jwts_with_a_future_exp(server):
    claims = jwt.decode(server.token, options={"verify_signature": False})
    assert claims["sub"] and claims["exp"] > time.time() + 364 * 86400
    short = cli_token(server.data, "--days", "1")
    assert jwt.decode(short, options={"verify_signature": False})["exp"] < time.time() + 2 * 86400
    assert requests.get(f"{server.url}/api/version", headers={"Authorization": f"Bearer {short}"}).ok


def test_folders_are_created_once_listed_and_edited(server):
    created = server.api.post(f"{server.url}/api/folders", json={"path": "/proj/part1"}).json()
    assert len(created["id"]) == 22 and created["id"].isalnum() and created["path"] == "/proj/part1"
    again = server.api.post(f"{server.url}/api/folders", json={"path": "/proj/part1"})
    assert again.status_code == 409 and again.json()["id"] == created["id"]

    url = f"{server.url}/api/folders/{created['id']}"
    server.api.put(url, json={"metadata": {"a": {"x": 1}}, "tags": ["t1", "t2"], "description": "d"})
    edited = server.api.put(url, json={"metadata": {"a": {"y": 2}}, "tags": ["t3"]}).json()
    assert edited["metadata"] == {"a": {"x": 1, "y": 2}} and edited["tags"] == ["t3"] and edited["description"] == "d"

    listed = server.api.get(f"{server.url}/api/folders", params={"filters": json.dumps(["path == /proj/part1"])}).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == created["id"]
    assert server.api.get(f"{server.url}/api/folders/nosuchfolder").status_code == 404
    made = [server.api.post(f"{server.url}/api/folders", json={"path": f"/many/{i}"}).json()["id"] for i in range(12)]
    first_page = server.api.get(f"{server.url}/api/folders", params={"count": 10}).json()["data"]
    assert [f["id"] for f in first_page] == made[::-1][:10]  # newest first: a folder just made is on page one


def test_run_create_read_and_partial_updates(server):
    run = create_run(server, folder="/runs/a", tags=["x", "y"], metadata={"lr": 0.1, "model": {"depth": 2}},
                     description="first", system={"hostname": "h"})
    assert len(run["id"]) == 22 and run["name"] and "-" in run["name"]  # a generated name
    assert run["status"] == "running" and run["heartbeat_timeout"] == 180
    assert run["folder"] == "/runs/a" and run["alerts"] == [] and run["system"] == {"hostname": "h"}
    folders = server.api.get(f"{server.url}/api/folders", params={"filters": json.dumps(["path == /runs/a"])})
    assert folders.json()["count"] == 1  # the folder was created with the run

    url = f"{server.url}/api/runs/{run['id']}"
    server.api.put(url, json={"metadata": {"model": {"width": 8}, "extra": 42}})
    server.api.put(url, json={"tags": ["z"], "description": "second", "name": "renamed"})
    ended = iso(time.time())
    final = server.api.put(url, json={"status": "completed", "endtime": ended}).json()
    assert final["metadata"] == {"lr": 0.1, "model": {"depth": 2, "width": 8}, "extra": 42}
    assert final["tags"] == ["z"] and final["description"] == "second" and final["name"] == "renamed"
    assert final["status"] == "completed" and final["endtime"] == ended
    assert server.api.get(url).json() == final


def test_metrics_and_events_round_trip(server):
    run = create_run(server, name="metrics-run")
    sent = points(5, acc=0.5)
    assert post_metrics(server, run["id"], sent[:3]).json()["stored"] == 6
    assert post_metrics(server, run["id"], sent[3:]).json()["stored"] == 4
    events = [{"message": f"event {i}", "log_level": "warning" if i == 2 else "info", "timestamp": iso(1.79e9 + i)}
              for i in range(4)]
    assert post_events(server, run["id"], events).json()["stored"] == 4

    bulk = server.api.get(f"{server.url}/api/runs/{run['id']}/metrics").json()["data"]
    assert sorted(bulk) == ["acc", "loss"]
    assert bulk["loss"] == {
        "steps": [p["step"] for p in sent],
        "times": [p["time"] for p in sent],
        "timestamps": [p["timestamp"] for p in sent],
        "values": [p["values"]["loss"] for p in sent],
    }
    only_acc = server.api.get(f"{server.url}/api/runs/{run['id']}/metrics", params={"names": ["acc"]}).json()
    assert list(only_acc["data"]) == ["acc"]
    assert server.api.get(f"{server.url}/api/runs/{run['id']}/metrics/names").json() == ["acc", "loss"]

    runs_param = json.dumps([run["id"]])
    upstream = server.api.get(
        f"{server.url}/api/metrics", params={"runs": runs_param, "metrics": json.dumps(["loss"]), "xaxis": "step"}
    ).json()
    assert [(p["step"], p["value"]) for p in upstream[run["id"]]["loss"]] == [
        (p["step"], p["values"]["loss"]) for p in sent
    ]
    thinned = server.api.get(f"{server.url}/api/metrics", params={
        "runs": runs_param, "metrics": json.dumps(["loss"]), "xaxis": "time", "max_points": 2}).json()
    assert [p["time"] for p in thinned[run["id"]]["loss"]] == [0.0, 2.0]
    assert server.api.get(f"{server.url}/api/metrics/names", params={"runs": runs_param}).json() == ["acc", "loss"]
    summary = server.api.get(f"{server.url}/api/runs/{run['id']}").json()["metrics"]["loss"]
    losses = [p["values"]["loss"] for p in sent]
    assert summary == {"count": 5, "min": min(losses), "max": max(losses), "mean": pytest.approx(sum(losses) / 5),
                       "last": losses[-1]}

    read = server.api.get(f"{server.url}/api/events", params={"run": run["id"], "start": 0, "count": 0}).json()
    assert read["count"] == 4 and read["data"] == events
    page = server.api.get(f"{server.url}/api/events", params={"run": run["id"], "start": 1, "count": 2}).json()
    assert [e["message"] for e in page["data"]] == ["event 1", "event 2"] and page["count"] == 4
    found = server.api.get(f"{server.url}/api/events", params={
        "run": run["id"], "filters": json.dumps(["event.message contains 3"])}).json()
    assert [e["message"] for e in found["data"]] == ["event 3"]


def test_json_bodies_and_missing_timestamps_are_accepted_for_metrics(server):
    run = create_run(server)
    before = time.time()
    body = {"run": run["id"], "metrics": [{"time": 1, "step": 0, "values": {"x": 2, "flag": True}}]}
    assert server.api.post(f"{server.url}/api/metrics", json=body).status_code == 200
    data = server.api.get(f"{server.url}/api/runs/{run['id']}/metrics").json()["data"]
    assert data["x"]["values"] == [2.0] and data["flag"]["values"] == [1.0]
    stamp = dt.datetime.strptime(data["x"]["timestamps"][0], "%Y-%m-%dT%H:%M:%S.%f")
    assert stamp.replace(tzinfo=dt.timezone.utc).timestamp() >= before - 1


def test_a_silent_run_becomes_lost_and_a_heartbeat_revives_it(server):
    run = create_run(server, heartbeat_timeout=1)
    never = create_run(server, heartbeat_timeout=None)
    assert never["heartbeat_timeout"] is None
    url = f"{server.url}/api/runs/{run['id']}"
    assert server.api.get(url).json()["status"] == "running"
    time.sleep(1.5)
    assert server.api.get(url).json()["status"] == "lost"
    assert server.api.get(f"{server.url}/api/runs/{never['id']}").json()["status"] == "running"
    assert server.api.put(f"{url}/heartbeat").status_code == 200
    assert server.api.get(url).json()["status"] == "running"
    time.sleep(0.6)
    post_metrics(server, run["id"], points(1))  # data counts as a sign of life too
    time.sleep(0.6)
    assert server.api.get(url).json()["status"] == "running"


def test_abort_flag_round_trip(server):
    run = create_run(server)
    url = f"{server.url}/api/runs/{run['id']}/abort"
    assert server.api.get(url).json()["status"] is False
    assert server.api.put(url, json={"reason": "user asked"}).json()["status"] is True
    assert server.api.get(url).json() == {"status": True, "reason": "user asked"}
    other = create_run(server)
    assert server.api.put(f"{server.url}/api/runs/{other['id']}/abort").status_code == 200  # no body
    assert server.api.get(f"{server.url}/api/runs/{other['id']}/abort").json()["status"] is True


def test_a_replayed_idempotency_key_is_not_applied_twice(server):
    run = create_run(server)
    batch = points(3)
    first = post_metrics(server, run["id"], batch, **{"Idempotency-Key": "batch-1"})
    replay = post_metrics(server, run["id"], batch, **{"Idempotency-Key": "batch-1"})
    other = post_metrics(server, run["id"], batch[:1], **{"Idempotency-Key": "batch-2"})
    assert first.json() == {"run": run["id"], "stored": 3, "replayed": False}
    assert replay.status_code == 200 and replay.json()["replayed"] is True
    assert other.json()["stored"] == 1
    series = server.api.get(f"{server.url}/api/runs/{run['id']}/metrics").json()["data"]["loss"]
    assert series["steps"] == [0, 1, 2, 0]

    event = [{"message": "once", "timestamp": iso(time.time())}]
    for _ in range(3):
        assert post_events(server, run["id"], event, **{"Idempotency-Key": "ev-1"}).status_code == 200
    assert server.api.get(f"{server.url}/api/events", params={"run": run["id"]}).json()["count"] == 1

    second_run = create_run(server)  # keys are per run
    assert post_metrics(server, second_run["id"], batch, **{"Idempotency-Key": "batch-1"}).json()["stored"] == 3



def test_a_run_creation_retried_with_its_idempotency_key_creates_one_run(server):
    """A client that gave up waiting for ``POST /api/runs`` (Run.init waits a few seconds)
    retries it from its uploader: the server must not make a second run."""
    body = {"name": "created-once", "folder": "/once", "status": "running"}
    key = {"Idempotency-Key": "local-run-1/create"}
    first = server.api.post(f"{server.url}/api/runs", json=body, headers=key)
    again = server.api.post(f"{server.url}/api/runs", json=body, headers=key)
    assert first.status_code == again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    other = server.api.post(f"{server.url}/api/runs", json=body, headers={"Idempotency-Key": "local-run-2/create"})
    assert other.json()["id"] != first.json()["id"]
    assert len(server.get("/runs", filters=json.dumps(["name == created-once"]))["data"]) == 2
    server.api.delete(f"{server.url}/api/runs/{first.json()['id']}")
    anew = server.api.post(f"{server.url}/api/runs", json=body, headers=key)
    assert anew.status_code == 200 and anew.json()["id"] != first.json()["id"]  # the key went with its run

def test_artifact_upload_with_checksum_check_and_download(server):
    run = create_run(server)
    content = b"hello artifact\n" * 100
    checksum = hashlib.sha256(content).hexdigest()
    created = server.api.post(f"{server.url}/api/artifacts", json={
        "name": "input.txt", "original_path": "/tmp/input.txt", "size": len(content), "mime_type": "text/plain",
        "checksum": checksum, "metadata": {"k": 1}}).json()
    assert set(created) >= {"id", "url", "storage_id"} and created["url"].startswith(server.url + "/upload/")

    early = server.api.put(f"{server.url}/api/artifacts/{created['id']}", json={"uploaded": True})
    assert early.status_code == 400 and "no content" in early.json()["detail"]
    bad_key = requests.put(created["url"].split("?")[0] + "?key=wrong", data=content)
    assert bad_key.status_code == 403
    corrupt = requests.put(created["url"], data=content + b"x")
    assert corrupt.status_code == 400 and "sha256" in corrupt.json()["detail"]
    assert corrupt.json()["detail"].startswith("The SHA256 you specified did not match the calculated checksum.")
    assert requests.put(created["url"], data=content).status_code == 200  # raw PUT, no token
    confirmed = server.api.put(f"{server.url}/api/artifacts/{created['id']}", json={"uploaded": True}).json()
    assert confirmed["uploaded"] is True and confirmed["name"] == "input.txt"

    link = server.api.put(f"{server.url}/api/runs/{run['id']}/artifacts/{created['id']}", json={"category": "input"})
    assert link.status_code == 200
    artifact = server.api.get(f"{server.url}/api/artifacts/{created['id']}").json()
    assert artifact["name"] == "input.txt" and artifact["checksum"] == checksum and artifact["runs"] == {
        run["id"]: "input"}
    assert requests.get(artifact["url"]).content == content  # keyed download URL, no token
    assert server.api.get(f"{server.url}/api/artifacts/{created['id']}/content").content == content

    listed = server.api.get(f"{server.url}/api/artifacts", params={"runs": json.dumps([run["id"]])}).json()
    assert [a["id"] for a in listed["data"]] == [created["id"]]
    of_run = server.api.get(f"{server.url}/api/runs/{run['id']}/artifacts", params={"name": "input.txt"}).json()
    assert [(a["id"], a["category"]) for a in of_run] == [(created["id"], "input")]

    same_content = server.api.post(f"{server.url}/api/artifacts", json={
        "name": "copy.txt", "size": len(content), "checksum": checksum, "run": run["id"], "category": "output"}).json()
    assert same_content["url"] is None  # already stored: nothing to upload
    assert server.api.get(f"{server.url}/api/artifacts/{same_content['id']}/content").content == content
    bad = server.api.post(f"{server.url}/api/artifacts", json={"name": "x", "checksum": "../../etc/passwd"})
    assert bad.status_code == 422


def test_alerts_deduplicate_attach_and_carry_a_status_per_run(server):
    definition = {"name": "loss-high", "source": "metrics", "notification": "none", "enabled": True,
                  "alert": {"rule": "is above", "metric": "loss", "threshold": 10.0, "frequency": 1, "window": 1}}
    first = server.api.post(f"{server.url}/api/alerts", params={"deduplicate": "True"}, json=definition)
    assert first.status_code == 200
    alert_id = first.json()["id"]
    again = server.api.post(f"{server.url}/api/alerts", params={"deduplicate": "True"}, json=definition)
    assert again.status_code == 409 and again.json()["id"] == alert_id
    user = server.api.post(f"{server.url}/api/alerts", json={"name": "manual", "source": "user"}).json()

    run = create_run(server, alerts=[alert_id])
    url = f"{server.url}/api/runs/{run['id']}"
    server.api.put(url, json={"alerts": [alert_id, user["id"]]})
    status_url = f"{server.url}/api/alerts/{user['id']}/status/{run['id']}"
    assert server.api.get(status_url).json()["status"] is None  # attached, not set by anyone yet
    assert server.api.put(status_url, json={"status": "critical"}).status_code == 200
    assert server.api.get(status_url).json()["status"] == "critical"
    attached = {a["alert"]["id"]: (a["alert"]["name"], a["status"]) for a in server.api.get(url).json()["alerts"]}
    assert attached == {alert_id: ("loss-high", None), user["id"]: ("manual", "critical")}  # none set: null

    fetched = server.api.get(f"{server.url}/api/alerts/{alert_id}").json()
    assert fetched["alert"]["threshold"] == 10.0 and fetched["source"] == "metrics"
    assert alert_id in [a["id"] for a in server.api.get(f"{server.url}/api/alerts").json()["data"]]
    critical = server.api.get(f"{server.url}/api/runs", params={"filters": json.dumps(["alert.status == critical"])})
    assert [r["id"] for r in critical.json()["data"]] == [run["id"]]
    assert server.api.put(url, json={"alerts": ["nosuchalert"]}).status_code == 404
    assert server.api.put(status_url, json={"status": "purple"}).status_code == 422

    # a definition changes in place: the rule is merged, the status per run is kept
    alert_url = f"{server.url}/api/alerts/{alert_id}"
    changed = server.api.put(alert_url, json={"description": "updated!", "alert": {"threshold": 20.0}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["description"] == "updated!" and changed.json()["alert"]["threshold"] == 20.0
    assert changed.json()["alert"]["metric"] == "loss" and changed.json()["id"] == alert_id
    assert server.api.get(alert_url).json()["description"] == "updated!"
    assert server.api.put(alert_url, json={"name": "loss-higher"}).json()["name"] == "loss-higher"
    assert server.api.put(alert_url, json={"source": "events"}).status_code == 400
    assert server.api.put(alert_url, json={"name": ""}).status_code == 422
    assert server.api.put(alert_url, json={"enabled": "yes"}).status_code == 422
    assert server.api.put(f"{server.url}/api/alerts/nosuchalert", json={"description": "x"}).status_code == 404
    assert server.api.get(status_url).json()["status"] == "critical"

    # an alert that aborts: going critical for a run asks that run to stop, and no other
    stopper = server.api.post(f"{server.url}/api/alerts", json={"name": "stopper", "source": "user", "abort": True}).json()
    other = create_run(server)
    assert server.api.get(f"{url}/abort").json()["status"] is False
    assert server.api.put(f"{server.url}/api/alerts/{stopper['id']}/status/{run['id']}", json={"status": "ok"}).ok
    assert server.api.get(f"{url}/abort").json()["status"] is False
    assert server.api.put(f"{server.url}/api/alerts/{stopper['id']}/status/{run['id']}", json={"status": "critical"}).ok
    requested = server.api.get(f"{url}/abort").json()
    assert (requested["status"], requested["reason"]) == (True, "alert 'stopper' is critical")
    assert server.api.get(f"{server.url}/api/runs/{other['id']}/abort").json()["status"] is False


def test_run_listing_filters_sorts_and_pages(server):
    made = [create_run(server, name=f"list-{i}", folder="/listing", tags=["even"] if i % 2 == 0 else [],
                       metadata={"i": i}) for i in range(5)]

    def names(**params) -> list[str]:
        response = server.api.get(f"{server.url}/api/runs", params=params)
        assert response.status_code == 200, response.text
        return [r["name"] for r in response.json()["data"]]

    in_folder = json.dumps(["folder.path == /listing"])
    assert names(filters=in_folder) == [f"list-{i}" for i in reversed(range(5))]  # newest first
    assert names(filters=json.dumps(["folder.path == /listing", "has tag.even"]), sorting=json.dumps(
        [{"id": "metadata.i", "desc": False}])) == ["list-0", "list-2", "list-4"]
    assert names(filters=json.dumps(["metadata.i >= 3", "folder.path == /listing"])) == ["list-4", "list-3"]
    assert names(filters=json.dumps(["name == list-1"])) == ["list-1"]
    assert names(filters=json.dumps(["folder.path == /listing", "created < 1h"]), count=2, start=1) == [
        "list-3", "list-2"]
    assert names(filters=in_folder, count=2, offset=4) == ["list-0"]
    total = server.api.get(f"{server.url}/api/runs", params={"filters": in_folder, "count": 1}).json()["count"]
    assert total == 5
    deleted = server.api.delete(f"{server.url}/api/runs/{made[0]['id']}")
    assert deleted.status_code == 200 and deleted.json() == {}  # what the upstream client takes as done
    assert server.api.get(f"{server.url}/api/runs/{made[0]['id']}").status_code == 404
    assert server.api.delete(f"{server.url}/api/runs/{made[0]['id']}").status_code == 404
    assert "list-0" not in names(filters=in_folder)


def test_malformed_requests_get_a_4xx_with_a_reason_and_the_server_keeps_serving(server):
    run = create_run(server)
    url = server.url
    bad_json = server.api.post(f"{url}/api/runs", data=b'{"folder": "/x"', headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["detail"]
    bad_msgpack = server.api.post(f"{url}/api/metrics", data=b"\xc1\xc1\xc1", headers=MSGPACK)
    assert bad_msgpack.status_code == 400 and "msgpack" in bad_msgpack.json()["detail"]
    bad_json_metrics = server.api.post(f"{url}/api/events", data=b"{", headers={"Content-Type": "application/json"})
    assert bad_json_metrics.status_code == 400

    wrong_types = [
        ("post", "/api/runs", {"tags": "not-a-list"}),
        ("post", "/api/runs", {"folder": "no-slash"}),
        ("post", "/api/runs", {"status": "sleeping"}),
        ("put", f"/api/runs/{run['id']}", {"metadata": ["not", "a", "dict"]}),
        ("post", "/api/folders", {"path": 5}),
    ]
    for method, path, body in wrong_types:
        response = getattr(server.api, method)(f"{url}{path}", json=body)
        assert response.status_code == 422, (path, body, response.text)
        assert response.json()["detail"][0]["loc"][0] == "body"
    wrong_metric = post_metrics(server, run["id"], [{"time": "soon", "step": -1, "values": {"bad name!": "x"}}])
    assert wrong_metric.status_code == 422 and len(wrong_metric.json()["detail"]) >= 3

    unknown = "A" * 22
    to_nowhere = post_metrics(server, unknown, points(1))  # a body naming no run: a validation error, as upstream
    assert to_nowhere.status_code == 422 and to_nowhere.json()["detail"] == [
        {"loc": ["body", "run"], "msg": f"no run with id {unknown!r}", "type": "value_error"}]
    assert post_events(server, unknown, [{"message": "m"}]).status_code == 404
    for path in (f"/api/runs/{unknown}", f"/api/runs/{unknown}/abort", f"/api/events?run={unknown}",
                 f"/api/artifacts/{unknown}", f"/api/alerts/{unknown}"):
        response = server.api.get(url + path)
        assert response.status_code == 404 and unknown in response.json()["detail"], path
    assert server.api.put(f"{url}/api/runs/{unknown}", json={"status": "completed"}).status_code == 404
    bad_filter = server.api.get(f"{url}/api/runs", params={"filters": json.dumps(["flavour == sweet"])})
    assert bad_filter.status_code == 400 and "flavour" in bad_filter.json()["detail"]
    assert server.api.get(f"{url}/api/runs", params={"filters": "not json"}).status_code == 400

    assert server.api.get(f"{url}/api/version").status_code == 200



JSON = "application/json"
DEEP = 10_000  # levels of nesting in the "deeply nested" bodies


def _json(value: object) -> bytes:
    """``value`` as JSON text that may hold what strict JSON cannot: NaN, Infinity, lone surrogates."""
    return json.dumps(value, allow_nan=True, ensure_ascii=True).encode()


def _msgpack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")


def hostile_requests(run_id: str, folder_id: str) -> list[tuple[str, str, str, bytes, str]]:
    """``(label, method, path, body, content type)``: requests carrying values that no answer
    can hold (non-finite numbers, integers past 64 bits, lone surrogates, dates outside years
    1-9999, absurd nesting).  Each must be refused with a 4xx."""
    nan, inf = float("nan"), float("inf")
    deep_json = b"[" * DEEP + b"]" * DEEP
    deep_msgpack = b"\x91" * DEEP + b"\xc0"  # a one-element array, DEEP times, around nil
    year_0 = "0001-01-01T00:00:00+14:00"  # reads back as a date in year 0
    year_10000 = "9999-12-31T23:59:59-01:00"
    checksum = "a" * 64

    def point(**fields: object) -> dict:
        return {"time": 1.0, "step": 0, "values": {"x": 1.0}} | fields

    cases: list[tuple[str, str, str, object]] = [
        ("run system NaN", "POST", "/api/runs", {"system": {"x": nan}}),
        ("run metadata Infinity", "POST", "/api/runs", {"metadata": {"x": inf}}),
        ("run heartbeat_timeout Infinity", "POST", "/api/runs", {"heartbeat_timeout": inf}),
        ("run heartbeat_timeout NaN", "POST", "/api/runs", {"heartbeat_timeout": nan}),
        ("run visibility NaN", "POST", "/api/runs", {"visibility": {"users": [nan]}}),
        ("run notifications -Infinity", "POST", "/api/runs", {"notifications": {"x": -inf}}),
        ("run ttl 2**70", "POST", "/api/runs", {"ttl": 2**70}),
        ("run ttl 2**63", "POST", "/api/runs", {"ttl": 2**63}),
        ("run metadata 2**64", "POST", "/api/runs", {"metadata": {"x": 2**64}}),
        ("run system -2**63-1", "POST", "/api/runs", {"system": {"x": -(2**63) - 1}}),
        ("run description surrogate", "POST", "/api/runs", {"description": "\ud800"}),
        ("run system key surrogate", "POST", "/api/runs", {"system": {"\udfff": 1}}),
        ("run created in year 0", "POST", "/api/runs", {"created": year_0}),
        ("run started in year 10000", "POST", "/api/runs", {"started": year_10000}),
        ("run update system NaN", "PUT", f"/api/runs/{run_id}", {"system": {"x": nan}}),
        ("run update heartbeat_timeout Infinity", "PUT", f"/api/runs/{run_id}", {"heartbeat_timeout": inf}),
        ("run update ttl 2**70", "PUT", f"/api/runs/{run_id}", {"ttl": 2**70}),
        ("run update description surrogate", "PUT", f"/api/runs/{run_id}", {"description": "\ud800"}),
        ("run update endtime in year 0", "PUT", f"/api/runs/{run_id}", {"endtime": year_0}),
        ("abort reason surrogate", "PUT", f"/api/runs/{run_id}/abort", {"reason": "\ud800"}),
        ("folder metadata NaN", "POST", "/api/folders", {"path": "/hostile/a", "metadata": {"a": nan}}),
        ("folder description surrogate", "POST", "/api/folders", {"path": "/hostile/b", "description": "\ud800"}),
        ("folder update metadata Infinity", "PUT", f"/api/folders/{folder_id}", {"metadata": {"a": inf}}),
        ("folder update description surrogate", "PUT", f"/api/folders/{folder_id}", {"description": "\udc00"}),
        ("alert definition NaN", "POST", "/api/alerts", {"name": "a", "source": "user", "alert": {"threshold": nan}}),
        ("alert extra field Infinity", "POST", "/api/alerts", {"name": "b", "source": "user", "x": inf}),
        ("alert name surrogate", "POST", "/api/alerts", {"name": "\ud800", "source": "user"}),
        ("artifact metadata NaN", "POST", "/api/artifacts", {"name": "n", "checksum": checksum, "metadata": {"a": nan}}),
        ("artifact size 2**64", "POST", "/api/artifacts", {"name": "n", "checksum": checksum, "size": 2**64}),
        ("artifact MIME type not Latin-1", "POST", "/api/artifacts",
         {"name": "n", "checksum": checksum, "mime_type": "text/\u0100"}),
        ("artifact MIME type with a newline", "POST", "/api/artifacts",
         {"name": "n", "checksum": checksum, "mime_type": "text/plain\r\nX-Injected: 1"}),
        ("metric time NaN", "POST", "/api/metrics", {"run": run_id, "metrics": [point(time=nan)]}),
        ("metric time Infinity", "POST", "/api/metrics", {"run": run_id, "metrics": [point(time=inf)]}),
        ("metric step 2**64", "POST", "/api/metrics", {"run": run_id, "metrics": [point(step=2**64)]}),
        ("metric timestamp in year 0", "POST", "/api/metrics", {"run": run_id, "metrics": [point(timestamp=year_0)]}),
        ("metrics run surrogate", "POST", "/api/metrics", {"run": "\ud800", "metrics": []}),
        ("event message surrogate", "POST", "/api/events", {"run": run_id, "events": [{"message": "\ud800"}]}),
        ("event timestamp in year 10000", "POST", "/api/events",
         {"run": run_id, "events": [{"message": "m", "timestamp": year_10000}]}),
    ]
    requests_: list[tuple[str, str, str, bytes, str]] = [
        (label, method, path, _json(body), JSON) for label, method, path, body in cases
    ]
    requests_ += [
        ("run body nested 10,000 deep", "POST", "/api/runs", deep_json, JSON),
        ("run system nested 10,000 deep", "POST", "/api/runs", b'{"system": ' + deep_json + b"}", JSON),
        ("alert nested 10,000 deep", "POST", "/api/alerts",
         b'{"name": "c", "source": "user", "alert": ' + deep_json + b"}", JSON),
        ("metrics nested 10,000 deep", "POST", "/api/metrics", deep_json, JSON),
        ("events nested 10,000 deep", "POST", "/api/events", deep_json, JSON),
        ("metrics msgpack nested 10,000 deep", "POST", "/api/metrics", deep_msgpack, MSGPACK["Content-Type"]),
    ]
    msgpack_cases: list[tuple[str, str, object]] = [
        ("metric time NaN (msgpack)", "/api/metrics", {"run": run_id, "metrics": [point(time=nan)]}),
        ("metric time -Infinity (msgpack)", "/api/metrics", {"run": run_id, "metrics": [point(time=-inf)]}),
        ("metric step 2**64-1 (msgpack)", "/api/metrics", {"run": run_id, "metrics": [point(step=2**64 - 1)]}),
        ("metric timestamp in year 0 (msgpack)", "/api/metrics",
         {"run": run_id, "metrics": [point(timestamp=year_0)]}),
        ("metrics with a msgpack extension type", "/api/metrics",
         {"run": run_id, "metrics": [point(values={"x": msgpack.ExtType(5, b"x")})]}),
        ("event message surrogate (msgpack)", "/api/events", {"run": run_id, "events": [{"message": "\ud800"}]}),
        ("event timestamp in year 10000 (msgpack)", "/api/events",
         {"run": run_id, "events": [{"message": "m", "timestamp": year_10000}]}),
    ]
    requests_ += [(label, "POST", path, _msgpack(body), MSGPACK["Content-Type"]) for label, path, body in msgpack_cases]
    deep_query = "[" * 2000  # short enough for the request line, far too deep to decode
    requests_ += [
        (f"GET {path} {parameter} nested 2,000 deep", "GET", f"{path}{'&' if '?' in path else '?'}{parameter}={deep_query}",
         b"", JSON)
        for path, parameter in (("/api/runs", "filters"), ("/api/runs", "sorting"), ("/api/folders", "filters"),
                                ("/api/artifacts", "runs"), ("/api/metrics/names", "runs"),
                                (f"/api/events?run={run_id}", "filters"))
    ]
    return requests_


def test_hostile_values_get_a_4xx_and_nothing_stored_breaks_a_later_read(tmp_path):
    """Finding: one run with ``"system": {"x": NaN}`` made ``GET /api/runs`` answer 500 for good."""
    with ServerProcess(tmp_path / "server") as server:
        run = create_run(server)
        folder = server.api.post(f"{server.url}/api/folders", json={"path": "/hostile"}).json()
        wrong: dict[str, str] = {}
        for label, method, path, body, content_type in hostile_requests(run["id"], folder["id"]):
            try:  # a connection of its own: a server that failed may also have dropped the last one
                response = requests.request(method, server.url + path, data=body or None, timeout=30, headers={
                    "Authorization": f"Bearer {server.token}", "Content-Type": content_type})
            except requests.RequestException as exc:
                wrong[label] = f"no answer: {exc}"
                continue
            if response.status_code not in (400, 422):
                wrong[label] = f"{response.status_code} {response.text[:200]}"
            elif not response.json().get("detail"):
                wrong[label] = f"{response.status_code} without a detail"
        assert wrong == {}
        assert server.unreadable(run["id"]) == {}
        server.stop()
        server.start()  # what is stored is read back by a fresh process too
        assert server.unreadable(run["id"]) == {}


def test_a_refused_value_is_named_in_the_answer(server):
    run = create_run(server)
    answer = server.api.post(f"{server.url}/api/runs", data=b'{"system": {"gpu": {"temp": NaN}}}',
                             headers={"Content-Type": JSON})
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "system", "gpu", "temp"] and "finite" in error["msg"], error
    packed = msgpack.packb({"run": run["id"], "metrics": [{"time": 1.0, "step": 2**64 - 1, "values": {"x": 1.0}}]})
    answer = server.api.post(f"{server.url}/api/metrics", data=packed, headers=MSGPACK)
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "metrics", 0, "step"] and "64-bit" in error["msg"], error
    deep = server.api.post(f"{server.url}/api/events", data=b"[" * DEEP + b"]" * DEEP, headers={"Content-Type": JSON})
    assert deep.status_code == 400 and "nested" in deep.json()["detail"]
    # Non-finite metric values stay what they were: stored, and read back as null.
    packed = msgpack.packb({"run": run["id"], "metrics": [{"time": 1.0, "step": 0, "values": {"x": float("nan")}}]})
    assert server.api.post(f"{server.url}/api/metrics", data=packed, headers=MSGPACK).status_code == 200
    assert server.metrics(run["id"])["x"]["values"] == [None]


def test_values_an_older_server_stored_are_read_back_as_null(tmp_path):
    """A data directory written before the server refused non-finite values still reads."""
    from simvue.store import SeriesChunk, Store, StoreBatch

    store = Store(tmp_path / "server")
    try:
        run_id = store.create_run(
            name="legacy", folder="/legacy", description=None, metadata={"bad": float("nan"), "text": "\ud800"},
            tags=[], status="running", system={"x": float("inf")}, heartbeat_timeout_s=float("inf"))
        chunk = SeriesChunk()
        chunk.append(0, float("nan"), time.time(), 1.0)
        store.write(run_id, StoreBatch(metrics={"loss": chunk}))
    finally:
        store.close()
    with ServerProcess(tmp_path / "server") as server:
        assert server.unreadable(run_id) == {}
        run = server.get(f"/runs/{run_id}")
        assert run["metadata"] == {"bad": None, "text": "\ufffd"} and run["system"] == {"x": None}
        assert run["heartbeat_timeout"] is None
        assert server.metrics(run_id)["loss"]["times"] == [None]


def test_the_data_directory_and_every_file_in_it_are_private(tmp_path):
    """0700 directories and 0600 files, whatever the umask; a directory left readable by an
    older server is made private too."""
    from simvue.store import Store

    def exposed(directory: Path) -> dict[str, str]:
        found = {directory.name: oct(directory.stat().st_mode & 0o777)} if directory.stat().st_mode & 0o777 != 0o700 else {}
        for path in directory.rglob("*"):
            mode = path.lstat().st_mode & 0o777
            if mode != (0o700 if path.is_dir() else 0o600):
                found[str(path.relative_to(directory))] = oct(mode)
        return found

    data = tmp_path / "server"
    previous = os.umask(0o022)
    try:
        Store(data).close()
        for path in [data, *data.rglob("*")]:  # as an older server left it: readable by everyone
            path.chmod(0o755 if path.is_dir() else 0o644)
        assert exposed(data), "the test needs a readable directory to start from"
        with ServerProcess(data) as server:
            run = create_run(server)
            post_metrics(server, run["id"], points(3))
            post_events(server, run["id"], [{"message": "m"}])
            content = b"private content\n"
            created = server.api.post(f"{server.url}/api/artifacts", json={
                "name": "a.txt", "checksum": hashlib.sha256(content).hexdigest(), "run": run["id"]}).json()
            assert requests.put(created["url"], data=content).status_code == 200
            cli_token(data)
            assert (data / "artifacts").is_dir() and (data / "server.json").exists()
            assert exposed(data) == {}  # while it runs: the database's -wal and -shm files too
        assert exposed(data) == {}
        fresh = tmp_path / "fresh"
        cli_token(fresh)  # `simvue server token` on a new directory creates it
        assert exposed(fresh) == {}
    finally:
        os.umask(previous)


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a hand-written request (its headers may lie about the body); the answer's status and body."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before all is sent
            sock.sendall(head.encode() + b"\r\n" + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            headers, _, answer = received.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in headers.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), None)
            if length is not None and len(answer) >= length:
                break
    return int(received.split(b" ", 2)[1]), answer


def test_faults_body_limit_and_stats(tmp_path):
    env = {"SIMVUE_SERVER_FAULTS": "GET /api/version=429x1@3; PUT /api/runs=503x1"}
    with ServerProcess(tmp_path / "server", "POST /api/metrics=500x2", options=["--max-body-mb", "1"],
                       env=env) as server:
        run = create_run(server)
        statuses = [post_metrics(server, run["id"], points(1)).status_code for _ in range(3)]
        assert statuses == [500, 500, 200]
        limited = server.api.get(f"{server.url}/api/version")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
        assert server.api.get(f"{server.url}/api/version").status_code == 200
        unavailable = server.api.put(f"{server.url}/api/runs/{run['id']}/heartbeat")
        assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "1"

        auth = f"Authorization: Bearer {server.token}\r\n"
        status, answer = raw_request(server.url, (
            f"POST /api/metrics HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/msgpack\r\n"
            "Content-Length: 1000000000\r\n"), b"\x80" * 1000)
        assert status == 413 and b"limit" in answer
        chunked = b"".join(b"%x\r\n%s\r\n" % (65536, b"a" * 65536) for _ in range(20))
        status, _ = raw_request(server.url, (
            f"POST /api/events HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n"), chunked)
        assert status == 413
        assert server.api.get(f"{server.url}/api/version").status_code == 200

        for client in ("node1:11", "node1:12", "node1:11"):
            server.api.get(f"{server.url}/api/runs/{run['id']}", headers={"X-Simvue-Client": client})
        stats = server.api.get(f"{server.url}/api/server/stats").json()
        assert stats["clients"] == ["node1:11", "node1:12"]
        assert stats["requests"]["POST /api/metrics"] == 4 and stats["requests"]["GET /api/version"] == 3
        assert stats["requests"]["GET /api/runs/{run_id}"] == 3 and stats["started"]


def test_many_concurrent_writers_all_succeed(server):
    runs = [create_run(server)["id"] for _ in range(4)]

    def write(i: int) -> int:
        run_id = runs[i % len(runs)]
        batch = [{"time": 0.0, "step": i * 10 + k, "values": {"v": float(k)}} for k in range(10)]
        return post_metrics(server, run_id, batch).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(write, range(200)))
    assert statuses == [200] * 200
    counts = [server.api.get(f"{server.url}/api/runs/{r}").json()["metrics"]["v"]["count"] for r in runs]
    assert counts == [500] * 4


def test_a_restarted_server_keeps_its_data_and_accepts_old_tokens(tmp_path):
    data_dir = tmp_path / "server"
    first = ServerProcess(data_dir)
    try:
        assert any("SIMVUE_TOKEN=" in line for line in first.output)  # the first start explains itself
        assert json.loads((data_dir / "server.json").read_text())["url"] == first.url
        run = create_run(first, name="survivor", tags=["keep"])
        post_metrics(first, run["id"], points(4))
        post_events(first, run["id"], [{"message": "before restart"}])
        old_token = first.token
    finally:
        assert first.stop(signal.SIGINT) == 0  # Ctrl-C is a clean stop too
    assert not (data_dir / "server.json").exists()

    with ServerProcess(data_dir) as second:
        assert not any("SIMVUE_TOKEN=" in line for line in second.output)
        response = requests.get(f"{second.url}/api/runs/{run['id']}", headers={"Authorization": f"Bearer {old_token}"})
        assert response.status_code == 200 and response.json()["tags"] == ["keep"]
        series = second.api.get(f"{second.url}/api/runs/{run['id']}/metrics").json()["data"]["loss"]
        assert series["steps"] == [0, 1, 2, 3]
        assert second.api.get(f"{second.url}/api/events", params={"run": run["id"]}).json()["count"] == 1


def test_without_the_server_extra_simvue_works_and_the_server_says_what_to_install(tmp_path):
    blocked = "import sys; sys.modules.update(fastapi=None, uvicorn=None, jwt=None); "
    check = blocked + "import simvue, simvue.cli; from simvue.cli import main; sys.exit(main(sys.argv[1:]))"
    for command in (["server", "--data", str(tmp_path)], ["server", "token", "--data", str(tmp_path)]):
        done = subprocess.run([sys.executable, "-c", check, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "pip install 'simvue[server]'" in done.stderr, done.stderr


# -- the data directory, the first start, stopping ------------------------------------------------


def test_without_data_both_commands_use_one_directory_outside_the_working_tree(tmp_path):
    from simvue.server.cli import default_data_dir

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    assert default_data_dir(work, {"HOME": str(home)}) == home / ".local" / "share" / "simvue" / "server"
    assert default_data_dir(work, {"HOME": str(home), "XDG_DATA_HOME": str(tmp_path / "xdg")}) == (
        tmp_path / "xdg" / "simvue" / "server")
    assert default_data_dir(work, {"HOME": str(home), "SIMVUE_SERVER_DATA": str(tmp_path / "d")}) == tmp_path / "d"
    (work / ".simvue-server").mkdir()
    (work / ".simvue-server" / "simvue.db").touch()  # what an earlier version left: still used
    assert default_data_dir(work, {"HOME": str(home)}) == work / ".simvue-server"

    other = tmp_path / "elsewhere"
    other.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_DATA_HOME", None)
    env.pop("SIMVUE_SERVER_DATA", None)
    token = subprocess.run([sys.executable, "-m", "simvue.cli", "server", "token"], cwd=other, env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert (home / ".local" / "share" / "simvue" / "server" / "server.secret").exists()
    assert list(other.iterdir()) == []
    assert token.count(".") == 2


def test_the_first_start_shows_the_url_and_token_even_if_a_token_was_made_before(tmp_path):
    """`simvue server &` then `simvue server token` at once: the token command often makes
    the secret first; the server's first start must still say how to reach it."""
    data = tmp_path / "server"
    made_first = cli_token(data)
    with ServerProcess(data) as server:
        printed = "".join(server.output)
        assert f"export SIMVUE_URL={server.url}" in printed and "export SIMVUE_TOKEN=" in printed, printed
        assert requests.get(f"{server.url}/api/runs", headers={"Authorization": f"Bearer {made_first}"}).ok
    with ServerProcess(data) as again:
        assert "SIMVUE_TOKEN=" not in "".join(again.output)  # only the first start


def test_a_stop_signal_right_after_the_ready_line_stops_the_server(tmp_path):
    """Found: a SIGTERM between the ready line and uvicorn taking over the signals was lost,
    and the server ran on."""
    for attempt in range(3):
        process = subprocess.Popen(
            [sys.executable, "-m", "simvue.cli", "server", "--port", "0", "--data", str(tmp_path / f"s{attempt}")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if "listening on" in line:
                    break
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            process.kill()
            process.wait()
        assert not (tmp_path / f"s{attempt}" / "server.json").exists()


# -- what the upstream Client reads beyond a run's own fields ----------------------------------


def test_runs_carry_runtime_user_and_event_counts(server):
    run = create_run(server, started=iso(1_790_000_000.0), created=iso(1_790_000_000.0))
    post_events(server, run["id"], [{"message": "a"}, {"message": "b", "log_level": "warning"}])
    ended = server.api.put(f"{server.url}/api/runs/{run['id']}",
                           json={"status": "completed", "endtime": iso(1_790_000_000.0 + 90_061.5)}).json()
    assert ended["runtime"] == "25:01:01.500000"  # hours go past a day
    assert ended["events"] == {"info": {"count": 1}, "warning": {"count": 1}}
    assert ended["user"] and ended["created"] == iso(1_790_000_000.0)
    assert create_run(server, status="created")["runtime"] is None


def test_list_filters_may_be_plain_text_and_repeated(server):
    run = create_run(server, name="plain-filter", tags=["pf"])
    url = f"{server.url}/api/runs"
    for params in ({"filters": "name == plain-filter"}, [("filters", "has tag.pf"), ("filters", '["name == plain-filter"]')]):
        assert [r["id"] for r in server.api.get(url, params=params).json()["data"]] == [run["id"]]
    assert server.api.get(url, params={"filters": "name is plain"}).status_code == 400
    assert server.api.get(url, params={"filters": '{"not": "a list"}'}).status_code == 400


def test_alert_status_keeps_when_it_first_fired_and_alerts_can_be_deleted(server):
    run = create_run(server)
    alert = server.api.post(f"{server.url}/api/alerts", json={"name": "fires", "source": "user"}).json()
    assert (alert["auto"], alert["delay"], alert["run_tags"]) == (False, 0, [])
    status_url = f"{server.url}/api/alerts/{alert['id']}/status/{run['id']}"
    first = server.api.put(status_url, json={"status": "critical", "fired_at": iso(1_790_000_000.0)}).json()
    assert first["fired_at"] == iso(1_790_000_000.0)
    assert server.api.put(status_url, json={"status": "ok"}).json()["fired_at"] == iso(1_790_000_000.0)
    again = server.api.put(status_url, json={"status": "critical"}).json()
    assert again["fired_at"] == iso(1_790_000_000.0)  # the first firing stays
    (entry,) = server.api.get(f"{server.url}/api/runs/{run['id']}").json()["alerts"]
    assert (entry["status"], entry["fired_at"]) == ("critical", iso(1_790_000_000.0))
    unfired = server.api.post(f"{server.url}/api/alerts", json={"name": "quiet", "source": "user"}).json()
    now = time.time()
    stamped = server.api.put(f"{server.url}/api/alerts/{unfired['id']}/status/{run['id']}",
                             json={"status": "critical"}).json()
    assert abs(dt.datetime.fromisoformat(stamped["fired_at"]).replace(tzinfo=dt.timezone.utc).timestamp() - now) < 5

    assert server.api.delete(f"{server.url}/api/alerts/{alert['id']}").json() == {"id": alert["id"]}
    assert server.api.get(f"{server.url}/api/alerts/{alert['id']}").status_code == 404
    assert [e["alert"]["name"] for e in server.api.get(f"{server.url}/api/runs/{run['id']}").json()["alerts"]] == [
        "quiet"]


def test_tags_have_ids_and_renaming_or_deleting_one_changes_every_run(server):
    first = create_run(server, tags=["tag-a", "tag-b"])
    second = create_run(server, tags=["tag-b"])
    listed = {tag["name"]: tag for tag in server.api.get(f"{server.url}/api/tags").json()["data"]}
    assert {"tag-a", "tag-b"} <= set(listed) and listed["tag-a"]["colour"].startswith("#")
    tag_b = listed["tag-b"]["id"]
    renamed = server.api.put(f"{server.url}/api/tags/{tag_b}", json={"name": "tag-c", "description": "d"}).json()
    assert (renamed["id"], renamed["name"], renamed["description"]) == (tag_b, "tag-c", "d")
    tags_of = lambda run: server.api.get(f"{server.url}/api/runs/{run['id']}").json()["tags"]  # noqa: E731
    assert tags_of(first) == ["tag-a", "tag-c"] and tags_of(second) == ["tag-c"]
    assert server.api.put(f"{server.url}/api/tags/{tag_b}", json={"name": "tag-a"}).status_code == 409
    assert server.api.delete(f"{server.url}/api/tags/{tag_b}").status_code == 200
    assert tags_of(first) == ["tag-a"] and tags_of(second) == []
    assert server.api.get(f"{server.url}/api/tags/{tag_b}").status_code == 404
    made = server.api.post(f"{server.url}/api/tags", json={"name": "unused", "colour": "#123456"})
    assert made.status_code == 200 and made.json()["colour"] == "#123456"
    assert server.api.post(f"{server.url}/api/tags", json={"name": "unused"}).json()["id"] == made.json()["id"]
    newest = server.api.get(f"{server.url}/api/tags", params={"count": 1}).json()["data"]
    assert [tag["name"] for tag in newest] == ["unused"]  # newest first: a tag just made is on page one

    # a tag outlives the run that brought it, even if no one listed the tags in between
    brief = create_run(server, tags=["brief-tag"])
    server.api.put(f"{server.url}/api/runs/{brief['id']}", json={"tags": ["brief-tag", "later-tag"]})
    assert server.api.delete(f"{server.url}/api/runs/{brief['id']}").status_code == 200
    names = {tag["name"] for tag in server.api.get(f"{server.url}/api/tags").json()["data"]}
    assert {"brief-tag", "later-tag"} <= names


def test_folders_form_a_tree_and_delete_with_what_they_hold(tmp_path):
    with ServerProcess(tmp_path / "server") as server:
        api, url = server.api, f"{server.url}/api"
        deep = create_run(server, folder="/tree/a/b")
        beside = create_run(server, folder="/tree/c")
        paths = {f["path"]: f["id"] for f in api.get(f"{url}/folders").json()["data"]}
        assert {"/tree", "/tree/a", "/tree/a/b", "/tree/c"} <= set(paths)
        assert api.get(f"{url}/folders/{paths['/tree']}").json()["ttl"] is None
        assert api.put(f"{url}/folders/{paths['/tree']}", json={"ttl": 3600}).json()["ttl"] == 3600

        tree = f"{url}/folders/{paths['/tree']}"
        assert api.delete(tree).status_code == 409  # subfolders
        assert api.delete(tree, params={"recursive": "True"}).status_code == 409  # runs
        only_runs = api.delete(f"{url}/folders/{paths['/tree/c']}", params={"runs": "True", "runs_only": "True"})
        assert only_runs.json() == {"folders": [], "runs": [beside["id"]]}
        assert api.get(f"{url}/folders/{paths['/tree/c']}").status_code == 200
        everything = api.delete(tree, params={"recursive": "True", "runs": "True"}).json()
        assert everything["runs"] == [deep["id"]] and set(everything["folders"]) == {
            paths[p] for p in ("/tree", "/tree/a", "/tree/a/b", "/tree/c")}
        assert api.get(f"{url}/runs/{deep['id']}").status_code == 404
        assert not [f for f in api.get(f"{url}/folders").json()["data"] if f["path"].startswith("/tree")]
        assert server.unreadable() == {}
    with ServerProcess(tmp_path / "server") as restarted:  # the store's folders went too: not adopted back
        assert not [f for f in restarted.get("/folders")["data"] if f["path"].startswith("/tree")]


def _columns(steps, times, stamps, values) -> list[bytes]:
    return [array("q", steps).tobytes(), array("d", times).tobytes(), array("d", stamps).tobytes(),
            array("d", values).tobytes()]


def test_the_usual_metrics_body_is_read_as_the_model_reads_it(server):
    """POST /api/metrics reads the usual body without a model object per point: what it
    stores must be what the model (which reads every other body) stores."""
    entries = [
        {"step": 0, "time": 0, "timestamp": "2026-01-02T03:04:05", "values": {"a": 1, "b": True}},
        {"step": 1, "time": 0.5, "timestamp": "2026-01-02T03:04:05.5Z", "values": {"a": 1.5}},
        {"step": 2, "time": 1.0, "timestamp": "2026-01-02T03:04:06.000123", "values": {"a": math.nan, "b": 2.0}},
        {"step": 3, "time": 2.0, "timestamp": "2026-01-02 03:04:07.25", "values": {"a": -1e300}, "extra": [1]},
    ]
    usual, other = create_run(server), create_run(server)
    assert post_metrics(server, usual["id"], entries).status_code == 200
    # an offset the fast reading does not take: this body goes through the model
    odd = [{**entries[0], "timestamp": "2026-01-02T03:04:05+00:00"}, *entries[1:]]
    assert post_metrics(server, other["id"], odd).status_code == 200
    assert server.metrics(usual["id"]) == server.metrics(other["id"])
    assert server.metrics(usual["id"])["a"]["timestamps"][1] == "2026-01-02T03:04:05.500000"
    for bad in ({"step": -1}, {"step": 2**64 - 1}, {"time": math.nan}, {"time": "1"}, {"values": {"a": "x"}},
                {"values": {"bad\x00": 1.0}}, {"timestamp": "2026-13-02T03:04:05"},
                {"values": {"a": 2**64 - 1}}, {"timestamp": 5}):
        answer = post_metrics(server, usual["id"], [{**entries[1], **bad}])
        assert answer.status_code == 422, (bad, answer.text)
    assert len(server.metrics(usual["id"])["a"]["values"]) == 4


def test_gzip_bodies_are_inflated_within_the_body_limit(tmp_path):
    """A body sent with Content-Encoding: gzip is read inflated; the limit holds for what it
    inflates to (a small body that would inflate past it is a 413, without inflating it all);
    a cut or corrupt one is a 400, and any other encoding a 415."""
    with ServerProcess(tmp_path / "server", options=["--max-body-mb", "1"]) as server:
        run = create_run(server)
        url = f"{server.url}/api/metrics"
        body = msgpack.packb({"run": run["id"], "metrics": points(2000)})
        gz = {**MSGPACK, "Content-Encoding": "gzip"}
        answer = server.api.post(url, data=gzip.compress(body), headers=gz)
        assert answer.json()["stored"] == 2000, answer.text
        events = json.dumps({"run": run["id"], "events": [{"message": "zipped", "timestamp": iso(1e9)}]}).encode()
        assert server.api.post(f"{server.url}/api/events", data=gzip.compress(events),
                               headers={"Content-Type": "application/json", "Content-Encoding": "GZIP"}).status_code == 200
        bomb = gzip.compress(msgpack.packb({"run": run["id"], "pad": bytes(50 << 20)}))
        assert len(bomb) < 100_000
        started = time.monotonic()
        too_big = server.api.post(url, data=bomb, headers=gz)
        assert too_big.status_code == 413 and "once inflated" in too_big.json()["detail"]
        assert time.monotonic() - started < 10
        for label, data, status in (
            ("cut short", gzip.compress(body)[:-20], 400),
            ("not gzip", body, 400),
            ("trailing bytes", gzip.compress(body) + b"xyz", 400),
            ("empty", b"", 400),
        ):
            answer = server.api.post(url, data=data, headers=gz)
            assert answer.status_code == status, (label, answer.text)
        other = server.api.post(url, data=body, headers={**MSGPACK, "Content-Encoding": "br"})
        assert other.status_code == 415 and "gzip" in other.json()["detail"]
        assert len(server.metrics(run["id"])["loss"]["values"]) == 2000  # nothing refused was stored
        assert [e["message"] for e in server.events(run["id"])] == ["zipped"]


def test_metrics_arrive_as_packed_columns_checked_whole(server):
    run = create_run(server)
    api, url = server.api, f"{server.url}/api/runs/{run['id']}/columns"
    assert server.api.get(f"{server.url}/api/version").json()["columns"] == 1
    body = {"metrics": {"loss": _columns([0, 1, 2], [0.0, 0.5, 1.0], [1e9, 1e9 + 1, 1e9 + 2], [3.0, math.nan, 1.0]),
                        "rank1/x": _columns([5], [2.0], [1e9 + 3], [math.inf])}}
    stored = api.post(url, data=msgpack.packb(body), headers={**MSGPACK, "Idempotency-Key": "k1"})
    assert stored.json() == {"run": run["id"], "stored": 4, "replayed": False}
    again = api.post(url, data=msgpack.packb(body), headers={**MSGPACK, "Idempotency-Key": "k1"})
    assert again.json()["replayed"] is True
    metrics = server.metrics(run["id"])
    assert metrics["loss"]["steps"] == [0, 1, 2] and metrics["loss"]["values"] == [3.0, None, 1.0]
    assert metrics["rank1/x"]["values"] == [None] and metrics["loss"]["timestamps"][2] == iso(1e9 + 2)

    good = _columns([0], [0.0], [1e9], [1.0])
    hostile = [
        ("not msgpack", b"\xc1\xc1", 400),
        ("a list", msgpack.packb([1, 2]), 422),
        ("no metrics", msgpack.packb({"points": {}}), 422),
        ("bad name", msgpack.packb({"metrics": {"bad\x00name": good}}), 422),
        ("name too long", msgpack.packb({"metrics": {"n" * 300: good}}), 422),
        ("three columns", msgpack.packb({"metrics": {"x": good[:3]}}), 422),
        ("text columns", msgpack.packb({"metrics": {"x": ["a", "b", "c", "d"]}}), 422),
        ("lengths differ", msgpack.packb({"metrics": {"x": [*good[:3], good[3] * 2]}}), 422),
        ("not 8-byte values", msgpack.packb({"metrics": {"x": [b"1234567"] * 4}}), 422),
        ("empty columns", msgpack.packb({"metrics": {"x": [b""] * 4}}), 422),
        ("negative step", msgpack.packb({"metrics": {"x": _columns([-1], [0.0], [1e9], [1.0])}}), 422),
        ("NaN time", msgpack.packb({"metrics": {"x": _columns([0], [math.nan], [1e9], [1.0])}}), 422),
        ("infinite timestamp", msgpack.packb({"metrics": {"x": _columns([0], [0.0], [math.inf], [1.0])}}), 422),
        ("five columns", msgpack.packb({"metrics": {"x": [*good, good[0]]}}), 400),  # the decoder refuses it
        ("a map too big", msgpack.packb({"metrics": dict.fromkeys(map(str, range(10)), good)})[:-3], 400),
    ]
    for label, data, status in hostile:
        answer = api.post(url, data=data, headers=MSGPACK)
        assert answer.status_code == status, (label, answer.text)
    assert api.post(url, json={"metrics": {}}).status_code == 415  # JSON cannot carry the columns
    assert api.post(f"{server.url}/api/runs/{'A' * 22}/columns", data=msgpack.packb(body), headers=MSGPACK
                    ).status_code == 404
    assert server.metrics(run["id"])["loss"]["steps"] == [0, 1, 2]  # nothing refused was stored
    assert server.unreadable(run["id"]) == {}


def _upload(server: ServerProcess, run_id: str, name: str, content: bytes) -> str:
    """An artifact of ``run_id`` with ``content`` on the server (uploaded unless stored); its id."""
    checksum = hashlib.sha256(content).hexdigest()
    created = server.api.post(f"{server.url}/api/artifacts", json={
        "name": name, "size": len(content), "checksum": checksum, "run": run_id, "category": "output"}).json()
    if created["url"]:
        assert requests.put(created["url"], data=content).status_code == 200
    return created["id"]


def _rows(data: Path, run_ids: list[str]) -> dict[str, int]:
    """How many rows of each table belong to ``run_ids`` (read from the database itself)."""
    db = sqlite3.connect(data / DATABASE_FILE)
    try:
        ids = json.dumps(run_ids)
        counts = {table: db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} IN (SELECT value FROM json_each(?))",
                                    (ids,)).fetchone()[0] for table, column in RUN_TABLES}
        counts["metric_chunks"] = db.execute(
            "SELECT COUNT(*) FROM metric_chunks WHERE metric_id NOT IN (SELECT id FROM metrics)").fetchone()[0]
        counts["server_artifacts (unlinked)"] = db.execute(
            "SELECT COUNT(*) FROM server_artifacts WHERE id NOT IN (SELECT artifact_id FROM server_run_artifacts)"
        ).fetchone()[0]
        return {table: count for table, count in counts.items() if count}
    finally:
        db.close()


def test_deleting_a_folder_tree_removes_everything_of_its_runs_and_content_nothing_else_has(tmp_path):
    data = tmp_path / "server"
    with ServerProcess(data) as server:
        api, url = server.api, f"{server.url}/api"
        inside = [create_run(server, folder="/doomed"), create_run(server, folder="/doomed/deeper")]
        outside = create_run(server, folder="/kept")
        alert = api.post(f"{url}/alerts", json={"name": "watch", "source": "user", "alert": {}}).json()["id"]
        grid = api.post(f"{url}/grids", json={"name": "g", "grid": [[0, 1]], "labels": ["x"]}).json()["id"]
        for run in (*inside, outside):
            assert post_metrics(server, run["id"], points(20)).status_code == 200
            assert post_events(server, run["id"], [{"message": "m", "timestamp": iso(1e9)}]).status_code == 200
            assert api.put(f"{url}/runs/{run['id']}", json={"alerts": [alert]}).status_code == 200
            values = [{"metric": "f", "grid": grid, "step": 0, "time": 0.0, "timestamp": iso(1e9), "array": [1, 2]}]
            assert api.post(f"{url}/runs/{run['id']}/metrics/", json=values).status_code == 200
        only_inside = _upload(server, inside[0]["id"], "a.bin", b"only inside" * 100)
        _upload(server, inside[1]["id"], "b.bin", b"shared content" * 100)
        shared_copy = _upload(server, outside["id"], "c.bin", b"shared content" * 100)  # same content, its own record
        linked_both = _upload(server, inside[1]["id"], "d.bin", b"linked to both" * 100)
        assert api.put(f"{url}/runs/{outside['id']}/artifacts/{linked_both}", json={"category": "input"}).ok
        blobs = data / "artifacts"
        digest = {name: hashlib.sha256(content * 100).hexdigest()
                  for name, content in (("only", b"only inside"), ("shared", b"shared content"), ("both", b"linked to both"))}
        assert all((blobs / d).exists() for d in digest.values())

        folder = next(f["id"] for f in api.get(f"{url}/folders").json()["data"] if f["path"] == "/doomed")
        answer = api.delete(f"{url}/folders/{folder}", params={"recursive": "true", "runs": "true"})
        assert answer.status_code == 200 and sorted(answer.json()["runs"]) == sorted(r["id"] for r in inside)

        assert _rows(data, [r["id"] for r in inside]) == {}  # metrics, events, alerts, grids, artifacts: gone
        assert not (blobs / digest["only"]).exists()  # nothing else had this content
        assert (blobs / digest["shared"]).exists() and (blobs / digest["both"]).exists()
        assert api.get(f"{url}/artifacts/{only_inside}").status_code == 404
        kept = api.get(f"{url}/artifacts/{linked_both}").json()
        assert kept["runs"] == {outside["id"]: "input"}
        assert api.get(f"{url}/artifacts/{shared_copy}/content").content == b"shared content" * 100
        assert len(server.metrics(outside["id"])["loss"]["values"]) == 20  # the run outside is whole
        assert api.get(f"{url}/runs/{outside['id']}/metrics/f/values").json()["array"] == [1, 2]
        assert server.unreadable() == {}

        # deleting an artifact: its content goes once no other artifact has it
        assert api.delete(f"{url}/artifacts/{linked_both}").json() == {"id": linked_both}
        assert not (blobs / digest["both"]).exists()
        assert api.delete(f"{url}/artifacts/{linked_both}").status_code == 404
        assert api.delete(f"{url}/runs/{outside['id']}").json() == {}
        assert api.get(f"{url}/runs/{outside['id']}").status_code == 404
        assert not (blobs / digest["shared"]).exists()
        assert _rows(data, [outside["id"]]) == {}


def test_tensor_metrics_are_stored_on_their_grid_and_read_back(server):
    run = create_run(server)
    api, url = server.api, f"{server.url}/api"
    grid = api.post(f"{url}/grids", json={"name": "g", "grid": [[0, 1, 2], [0.0, 0.5]], "labels": ["x", "y"]}).json()
    assert grid["grid"] == [[0.0, 1.0, 2.0], [0.0, 0.5]]
    assert api.put(f"{url}/runs/{run['id']}/grids/{grid['id']}", json={"metric": "field"}).status_code == 200
    values = [{"metric": "field", "grid": grid["id"], "step": step, "time": float(step), "timestamp": iso(1e9 + step),
               "array": [[step, 1.0], [2.0, 3.0], [4.0, -step]]} for step in range(3)]
    stored = api.post(f"{url}/runs/{run['id']}/metrics/", data=msgpack.packb(values), headers=MSGPACK)
    assert stored.json() == {"run": run["id"], "stored": 3}
    at_one = api.get(f"{url}/runs/{run['id']}/metrics/field/values", params={"step": 1}).json()
    assert at_one["array"] == [[1, 1.0], [2.0, 3.0], [4.0, -1]] and at_one["timestamp"] == iso(1e9 + 1)
    assert api.get(f"{url}/runs/{run['id']}/metrics//field/values", params={"step": 2}).json()["step"] == 2
    (span,) = api.get(f"{url}/runs/{run['id']}/metrics/field/span").json()
    assert (span["min"], span["max"], span["steps"]) == (-2.0, 4.0, 3)
    assert (span["min_time"], span["max_time"]) == (0.0, 2.0)
    assert (span["min_timestamp"], span["max_timestamp"]) == (iso(1e9), iso(1e9 + 2))
    (listed,) = api.get(f"{url}/runs/{run['id']}/grids").json()
    assert (listed["id"], listed["metric"], listed["labels"]) == (grid["id"], "field", ["x", "y"])

    wrong_shape = [{**values[0], "array": [[1.0, 2.0]]}]
    answer = api.post(f"{url}/runs/{run['id']}/metrics/", json=wrong_shape)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", 0, "array"]
    # the grid's first axis along the array's last (a row runs along x), as the upstream client's default grid
    along_rows = [{**values[0], "step": 7, "array": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}]
    assert api.post(f"{url}/runs/{run['id']}/metrics/", json=along_rows).status_code == 200
    nan = api.post(f"{url}/runs/{run['id']}/metrics/", data=msgpack.packb(
        [{**values[0], "array": [[math.nan, 1.0], [2.0, 3.0], [4.0, 5.0]]}]), headers=MSGPACK)
    assert nan.status_code == 422
    unknown = [{**values[0], "grid": "A" * 22}]
    assert api.post(f"{url}/runs/{run['id']}/metrics/", json=unknown).status_code == 404
    assert api.get(f"{url}/runs/{run['id']}/metrics/field/values", params={"step": 9}).status_code == 404
    assert api.get(f"{url}/runs/{run['id']}/metrics/other/values").status_code == 404
    assert server.unreadable(run["id"]) == {}


def test_a_batch_of_runs_is_created_in_one_request_or_not_at_all(server):
    batch = [{"name": f"batched-{i}", "folder": "/batch", "metadata": {"i": i}, "status": "created"} for i in range(5)]
    made = server.api.post(f"{server.url}/api/runs", json=batch)
    assert made.status_code == 200, made.text
    assert [run["name"] for run in made.json()] == [f"batched-{i}" for i in range(5)]
    for i, run in enumerate(made.json()):
        read = server.api.get(f"{server.url}/api/runs/{run['id']}").json()
        assert (read["name"], read["metadata"], read["folder"], read["status"]) == (f"batched-{i}", {"i": i}, "/batch",
                                                                                      "created")
    before = server.api.get(f"{server.url}/api/runs").json()["count"]
    unknown_alert = [{"name": "fine", "folder": "/batch"}, {"name": "bad", "folder": "/batch", "alerts": ["nope"]}]
    assert server.api.post(f"{server.url}/api/runs", json=unknown_alert).status_code == 404
    wrong_shape = [{"name": "fine", "folder": "/batch"}, {"name": 5, "folder": "/batch"}]
    answer = server.api.post(f"{server.url}/api/runs", json=wrong_shape)
    assert answer.status_code == 422
    keyed = server.api.post(f"{server.url}/api/runs", json=batch[:1], headers={"Idempotency-Key": "k1"})
    assert keyed.status_code == 400 and "idempotent" in keyed.json()["detail"]
    too_many = server.api.post(f"{server.url}/api/runs", json=[{"folder": "/batch"}] * 1001)
    assert too_many.status_code == 400
    assert server.api.get(f"{server.url}/api/runs").json()["count"] == before  # nothing made by a refused batch
    assert server.api.post(f"{server.url}/api/runs", json=[]).json() == []


def test_runs_and_folders_can_be_starred_and_unstarred(server):
    run = create_run(server, folder="/stars")
    (folder,) = server.api.get(f"{server.url}/api/folders", params={"filters": json.dumps(["path == /stars"])}).json()[
        "data"]
    run_url, folder_url = f"{server.url}/api/runs/{run['id']}", f"{server.url}/api/folders/{folder['id']}"
    assert run["starred"] is False and folder["starred"] is False
    for url in (run_url, folder_url):
        answer = server.api.put(f"{url}/starred", json={"starred": True})
        assert answer.status_code == 200 and answer.json()["starred"] is True
        assert server.api.get(url).json()["starred"] is True
        assert server.api.put(f"{url}/starred", json={"starred": True}).ok  # again: still starred, once
        assert server.api.put(f"{url}/starred", json={"starred": "yes"}).status_code == 422
        assert server.api.put(f"{url}/starred", json={}).status_code == 422
    assert server.api.put(f"{run_url}/starred", json={"starred": False}).json()["starred"] is False
    assert server.api.get(run_url).json()["starred"] is False and server.api.get(folder_url).json()["starred"] is True
    starred_folders = server.api.get(f"{server.url}/api/folders", params={"filters": json.dumps(["starred"])}).json()
    assert [f["id"] for f in starred_folders["data"]] == [folder["id"]]
    assert server.api.get(f"{server.url}/api/runs", params={"filters": json.dumps(["starred"])}).json()["data"] == []
    server.api.put(f"{run_url}/starred", json={"starred": True})
    starred_runs = server.api.get(f"{server.url}/api/runs", params={"filters": json.dumps(["starred"])}).json()
    assert [r["id"] for r in starred_runs["data"]] == [run["id"]]
    assert server.api.put(f"{server.url}/api/runs/nosuchrun/starred", json={"starred": True}).status_code == 404
    assert server.api.put(f"{server.url}/api/folders/nosuchfolder/starred", json={"starred": True}).status_code == 404
    server.api.delete(folder_url, params={"recursive": "True", "runs": "True"})
    assert server.api.get(folder_url).status_code == 404 and server.api.get(run_url).status_code == 404
    assert server.unreadable() == {}
