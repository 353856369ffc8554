"""``simvue server``'s tenants, users, whoami, storage records and statistics, over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os

import msgpack
import pytest

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')
pytest.importorskip("hypothesis", reason='hypothesis is not installed: pip install -e ".[test]"')
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from simvue.server.auth import TOKEN_SUBJECT
from simvue.server.local import ServerProcess

pytestmark = pytest.mark.timeout(120)

# What the upstream client (2.6.2) sends for User.new(...).commit(): the fields both nested and flat.
USER_FIELDS = {"username": "jbloggs", "fullname": "Joe Bloggs", "email": "jbloggs@simvue.io", "is_manager": False,
               "is_readonly": True, "welcome": False, "is_admin": False, "is_enabled": True}
S3 = {"name": "bucket-store", "backend": "S3", "disable_check": True, "is_tenant_useable": False,
      "is_default": False, "is_enabled": False,
      "config": {"bucket": "dummy-bucket", "endpoint_url": "https://not-a-real-url.io/", "region_name": "eu-1",
                 "access_key_id": "key", "secret_access_key": "not_a_key", "ca_cert": "cert"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("admin") / "server") as running:
        yield running


def call(server: ServerProcess, method: str, path: str, **kwargs):
    return server.api.request(method, f"{server.url}/api{path}", timeout=30, **kwargs)


def ok(server: ServerProcess, method: str, path: str, **kwargs) -> dict:
    response = call(server, method, path, **kwargs)
    assert response.status_code == 200, (method, path, response.status_code, response.text)
    return response.json()


def new_tenant(server: ServerProcess, name: str, **fields) -> dict:
    return ok(server, "POST", "/tenants", json={"name": name, **fields})


def test_whoami_answers_for_the_tokens_user_an_administrator_in_the_default_tenant(server):
    me = ok(server, "GET", "/whoami")
    assert me["username"] == TOKEN_SUBJECT and me["is_admin"] is True and me["is_deleted"] is False
    tenants = ok(server, "GET", "/tenants")["data"]
    assert me["tenant"] in [t["id"] for t in tenants]
    assert [t["name"] for t in tenants if t["id"] == me["tenant"]] == ["default"]
    assert ok(server, "GET", f"/users/{me['id']}") == me
    refused = call(server, "DELETE", f"/users/{me['id']}")
    assert refused.status_code == 409 and "own user" in refused.json()["detail"]


def test_tenants_are_created_read_listed_updated_and_deleted(server):
    made = new_tenant(server, "physics", max_runs=10)
    assert made["name"] == "physics" and made["is_enabled"] is True and made["max_runs"] == 10
    assert made["max_request_rate"] == 0 and made["max_data_volume"] == 0 and made["created"].startswith("20")
    assert ok(server, "GET", f"/tenants/{made['id']}") == made
    listing = ok(server, "GET", "/tenants")
    assert made in listing["data"] and listing["count"] == len(listing["data"]) >= 2
    assert ok(server, "GET", "/tenants", params={"start": 1, "count": 1})["data"] == [listing["data"][1]]

    again = call(server, "POST", "/tenants", json={"name": "physics"})
    assert again.status_code == 409 and again.json()["id"] == made["id"]
    changed = ok(server, "PUT", f"/tenants/{made['id']}", json={"is_enabled": False, "max_runs": 0, "name": "phys"})
    assert (changed["name"], changed["is_enabled"], changed["max_runs"]) == ("phys", False, 0)
    assert changed["created"] == made["created"]
    assert call(server, "PUT", f"/tenants/{made['id']}", json={"name": "default"}).status_code == 409

    assert ok(server, "DELETE", f"/tenants/{made['id']}") == {"id": made["id"]}
    assert call(server, "GET", f"/tenants/{made['id']}").status_code == 404
    assert call(server, "DELETE", f"/tenants/{made['id']}").status_code == 404
    assert made["id"] not in [t["id"] for t in ok(server, "GET", "/tenants")["data"]]


def test_users_are_created_in_a_tenant_edited_moved_and_deleted(server):
    tenant = new_tenant(server, "users-tenant")
    other = new_tenant(server, "other-tenant")
    made = ok(server, "POST", "/users", json={"user": USER_FIELDS, "tenant": tenant["id"], **USER_FIELDS})
    assert {key: made[key] for key in USER_FIELDS} == USER_FIELDS
    assert made["tenant"] == tenant["id"] and made["is_deleted"] is False
    assert ok(server, "GET", f"/users/{made['id']}") == made
    assert made in ok(server, "GET", "/users")["data"]

    duplicate = call(server, "POST", "/users", json={"username": "jbloggs", "tenant": tenant["id"]})
    assert duplicate.status_code == 409 and duplicate.json()["id"] == made["id"]
    busy = call(server, "DELETE", f"/tenants/{tenant['id']}")
    assert busy.status_code == 409 and "user" in busy.json()["detail"]

    moved = ok(server, "PUT", f"/users/{made['id']}", json={"fullname": "J. Bloggs", "tenant": other["id"],
                                                            "is_manager": True})
    assert (moved["fullname"], moved["tenant"], moved["is_manager"]) == ("J. Bloggs", other["id"], True)
    assert moved["username"] == "jbloggs" and moved["email"] == "jbloggs@simvue.io"
    assert ok(server, "DELETE", f"/tenants/{tenant['id']}") == {"id": tenant["id"]}  # it has no users now

    plain = ok(server, "POST", "/users", json={"username": "plain"})  # no tenant: the token's user's
    assert plain["tenant"] == ok(server, "GET", "/whoami")["tenant"] and plain["fullname"] == "plain"
    for user in (made, plain):
        assert ok(server, "DELETE", f"/users/{user['id']}") == {"id": user["id"]}
        assert call(server, "GET", f"/users/{user['id']}").status_code == 404
    assert ok(server, "DELETE", f"/tenants/{other['id']}") == {"id": other["id"]}


def test_storage_records_of_both_kinds_keep_their_fields_and_never_answer_secrets(server):
    s3 = ok(server, "POST", "/storage", json=S3)
    assert s3["backend"] == "S3" and s3["name"] == "bucket-store" and s3["is_enabled"] is False
    assert s3["config"] == {"bucket": "dummy-bucket", "endpoint_url": "https://not-a-real-url.io/",
                            "region_name": "eu-1", "access_key_id": "key"}
    assert ok(server, "GET", f"/storage/{s3['id']}") == s3
    files = ok(server, "POST", "/storage", json={"name": "disk", "backend": "File", "is_default": True})
    assert files["config"] == {} and files["is_default"] is True and files["is_tenant_useable"] is True
    listing = ok(server, "GET", "/storage")
    assert isinstance(listing, list) and s3 in listing and files in listing
    assert ok(server, "GET", "/storage", params={"start": 1, "count": 1}) == [files]

    changed = ok(server, "PUT", f"/storage/{s3['id']}", json={"config": {"region_name": "eu-2"}, "is_default": True})
    assert changed["config"] == s3["config"] | {"region_name": "eu-2"} and changed["is_default"] is True
    assert ok(server, "GET", f"/storage/{files['id']}")["is_default"] is False  # one default at a time
    assert "secret_access_key" not in json.dumps(ok(server, "GET", "/storage"))

    assert call(server, "POST", "/storage", json=S3).json()["id"] == s3["id"]  # 409 names the existing one
    assert call(server, "PUT", f"/storage/{files['id']}", json={"config": {"bucket": "b"}}).status_code == 400
    assert call(server, "PUT", f"/storage/{files['id']}", json={"name": "bucket-store"}).status_code == 409
    no_bucket = call(server, "POST", "/storage", json={"name": "nb", "backend": "S3", "config": {}})
    assert no_bucket.status_code == 422 and "bucket" in no_bucket.json()["detail"]
    for made in (s3, files):
        assert ok(server, "DELETE", f"/storage/{made['id']}") == {"id": made["id"]}
        assert call(server, "GET", f"/storage/{made['id']}").status_code == 404
    assert ok(server, "GET", "/storage") == []


def test_stats_count_runs_by_status_and_what_the_tokens_user_owns(tmp_path):
    with ServerProcess(tmp_path / "server") as server:
        before = ok(server, "GET", "/stats")
        assert before == {"runs": {"created": 0, "running": 0, "completed": 0, "failed": 0, "terminated": 0,
                                   "lost": 0, "data": 0}}
        for status in ("running", "running", "completed"):
            ok(server, "POST", "/runs", json={"folder": "/s", "status": status, "tags": ["a", "b"]})
        run = ok(server, "POST", "/runs", json={"folder": "/s", "status": "created"})
        points = [{"time": 0.0, "step": i, "values": {"x": 1.0, "y": 2.0}} for i in range(5)]
        ok(server, "POST", "/metrics", data=msgpack.packb({"run": run["id"], "metrics": points}),
           headers={"Content-Type": "application/msgpack"})
        ok(server, "POST", "/events", json={"run": run["id"], "events": [{"message": "m"}]})
        counts = ok(server, "GET", "/stats")["runs"]
        assert (counts["running"], counts["completed"], counts["created"], counts["failed"]) == (2, 1, 1, 0)

        new_tenant(server, "elsewhere")
        ok(server, "POST", "/users", json={"username": "nobody"})
        per_user = ok(server, "GET", "/stats", params={"single": "False"})
        assert per_user[TOKEN_SUBJECT] == {"runs": 4, "alerts": 0, "tags": 2, "files": 0, "volume": 0,
                                           "events": 1, "metrics": 10}
        assert per_user["nobody"] == dict.fromkeys(per_user[TOKEN_SUBJECT], 0)
        me = ok(server, "GET", "/whoami")
        assert set(ok(server, "GET", "/stats", params={"single": "false", "tenant": me["tenant"]})) == {
            TOKEN_SUBJECT, "nobody"}
        assert call(server, "GET", "/stats", params={"single": "false", "tenant": "missing"}).status_code == 404


def test_records_outlive_a_restart_and_the_tokens_user_is_made_once(tmp_path):
    with ServerProcess(tmp_path / "server") as server:
        tenant = new_tenant(server, "kept")
        user = ok(server, "POST", "/users", json={"username": "kept-user", "tenant": tenant["id"]})
        storage = ok(server, "POST", "/storage", json=S3)
        me = ok(server, "GET", "/whoami")
        server.stop()
        server.start()
        assert ok(server, "GET", f"/tenants/{tenant['id']}") == tenant
        assert ok(server, "GET", f"/users/{user['id']}") == user
        assert ok(server, "GET", f"/storage/{storage['id']}") == storage
        assert ok(server, "GET", "/whoami") == me
        assert [u["username"] for u in ok(server, "GET", "/users")["data"]] == [TOKEN_SUBJECT, "kept-user"]


BAD_REQUESTS = [
    ("POST", "/tenants", {}, 422),
    ("POST", "/tenants", {"name": ""}, 422),
    ("POST", "/tenants", {"name": "   "}, 422),
    ("POST", "/tenants", {"name": "x" * 100_000}, 422),
    ("POST", "/tenants", {"name": 5}, 422),
    ("POST", "/tenants", {"name": "t", "is_enabled": "yes"}, 422),
    ("POST", "/tenants", {"name": "t", "max_runs": -1}, 422),
    ("POST", "/tenants", {"name": "t", "max_runs": 1.5}, 422),
    ("POST", "/tenants", {"name": "t", "max_runs": 2**70}, 422),
    ("POST", "/tenants", ["not", "an", "object"], 422),
    ("POST", "/users", {"fullname": "no username"}, 422),
    ("POST", "/users", {"username": "u", "email": "not-an-email"}, 422),
    ("POST", "/users", {"username": "u", "user": "not-an-object"}, 422),
    ("POST", "/users", {"username": "u", "tenant": "missing"}, 404),
    ("POST", "/users", {"username": "u", "tenant": "t" * 100_000}, 422),
    ("POST", "/storage", {"name": "s", "backend": "FTP"}, 422),
    ("POST", "/storage", {"name": "s", "backend": "S3", "config": {"bucket": 3}}, 422),
    ("POST", "/storage", {"name": "s", "backend": "File", "config": {"bucket": "b"}}, 400),
    ("PUT", "/tenants/missing", {"name": "n"}, 404),
    ("PUT", "/users/missing", {"fullname": "n"}, 404),
    ("PUT", "/storage/missing", {"name": "n"}, 404),
    ("DELETE", "/tenants/missing", None, 404),
    ("DELETE", "/users/missing", None, 404),
    ("DELETE", "/storage/missing", None, 404),
    ("GET", "/storage/missing", None, 404),
]


def test_bad_input_gets_a_clear_4xx_and_nothing_is_made(server):
    before = [ok(server, "GET", path) for path in ("/tenants", "/users", "/storage")]
    for method, path, body, status in BAD_REQUESTS:
        response = call(server, method, path, json=body)
        assert response.status_code == status, (method, path, str(body)[:80], response.text[:300])
        assert response.json()["detail"]
    for raw in (b'{"name": "t"', b'{"name": "\xff\xfe"}', b"\xc1"):
        for path in ("/tenants", "/users", "/storage"):
            response = call(server, "POST", path, data=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (path, raw, response.text)
    assert call(server, "GET", "/stats", params={"single": "perhaps"}).status_code == 422
    assert call(server, "GET", "/tenants", params={"count": -1}).status_code == 422
    assert [ok(server, "GET", path) for path in ("/tenants", "/users", "/storage")] == before


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("name", "backend", "config", "is_enabled", "max_runs", "username", "email", "user", "tenant",
          "bucket", "is_default")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A server of its own, with a tenant, user and storage for the ``PUT`` of each to aim at."""
    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # not .hypothesis/ in the working tree
        set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    with ServerProcess(tmp_path_factory.mktemp("fuzzed") / "server") as running:
        tenant = new_tenant(running, "target")
        targets = {
            "/tenants": tenant["id"],
            "/users": ok(running, "POST", "/users", json={"username": "target", "tenant": tenant["id"]})["id"],
            "/storage": ok(running, "POST", "/storage", json=S3)["id"],
        }
        yield running, targets


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(["/tenants", "/users", "/storage"]), method=st.sampled_from(["POST", "PUT"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5) | JSON_VALUES,
       packed=st.booleans())
def test_arbitrary_bodies_never_get_a_5xx_and_what_they_make_reads_back(fuzzed, path, method, body, packed):
    """Any JSON or msgpack body (NaN and Infinity included) is refused with a 4xx or stored whole."""
    server, targets = fuzzed
    target = path if method == "POST" else f"{path}/{targets[path]}"
    content, kind = json.dumps(body).encode(), "json"
    if packed:
        with contextlib.suppress(OverflowError):  # msgpack holds no integer past 64 bits: JSON it is
            content, kind = msgpack.packb(body), "msgpack"
    response = call(server, method, target, data=content, headers={"Content-Type": f"application/{kind}"})
    assert response.status_code < 500, (method, target, body, response.text)
    assert response.json()["detail"] if response.status_code >= 400 else response.json()["id"]
    if response.status_code == 200:
        made = response.json()
        assert ok(server, "GET", f"{path}/{made['id']}") == made
        if method == "POST":
            ok(server, "DELETE", f"{path}/{made['id']}")
