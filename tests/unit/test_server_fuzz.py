"""Every route of ``simvue server`` under hostile input: never a 5xx, and nothing it stores
breaks a later read.

The routes, their query and path parameters and their body models are read from the
server's routers, so a new route is fuzzed without being listed here.  Hypothesis puts hostile
values (NaN, +-Infinity, integers past 64 bits, lone surrogates, dates outside years 1-9999,
nesting 10,000 deep, wrong types) into every field of a valid body, nested fields included,
sent as JSON or msgpack, and into the query and path.  One real server process serves the
whole module; the budget is fixed (examples per route, a deadline per example) and the
examples are derandomised, so a CI run is repeatable and bounded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
import requests

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')
hypothesis = pytest.importorskip("hypothesis", reason='hypothesis is not installed: pip install -e ".[test]"')
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from simvue.server.local import ServerProcess  # noqa: E402
from simvue.server.routes import alerts, artifacts, events, folders, metrics, runs, service  # noqa: E402

pytestmark = pytest.mark.timeout(120)  # each route takes a few seconds; shrinking a failure takes longer

EXAMPLES_PER_ROUTE = 30
DEADLINE = dt.timedelta(seconds=10)
CONTENT = b"fuzzed artifact content\n"

# Bodies the handler reads itself (msgpack or JSON), and what they hold.
RAW_BODY_MODELS: dict[str, type[BaseModel]] = {
    "POST /api/metrics": metrics.MetricsPost,
    "POST /api/events": events.EventsPost,
}
# Artifact bytes (any bytes will do), and packed metric columns (their own hostile bodies are in
# test_server.py::test_metrics_arrive_as_packed_columns_checked_whole).
RAW_CONTENT_ROUTES = {"PUT /upload/{artifact_id}", "POST /api/runs/{run_id}/columns"}
NO_BODY_ROUTES = {"PUT /api/runs/{run_id}/heartbeat"}

# A valid body per model, so that a hostile value in one field is not refused for another.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "FolderCreate": {"path": "/fuzz/folder"},
    "FolderUpdate": {"description": "d"},
    "AlertUpdate": {"description": "d", "alert": {"threshold": 2.0}},
    "Starred": {"starred": True},
    "RunCreate": {"folder": "/fuzz", "status": "running", "name": "fuzzed"},
    "RunUpdate": {"status": "running"},
    "AbortRequest": {"reason": "r"},
    "MetricsPost": {"run": "{run_id}", "metrics": [{"time": 1.0, "step": 0, "values": {"x": 1.0}}]},
    "EventsPost": {"run": "{run_id}", "events": [{"message": "m", "log_level": "info"}]},
    "ArtifactCreate": {"name": "a", "checksum": hashlib.sha256(CONTENT).hexdigest(), "run": "{run_id}"},
    "ArtifactUpdate": {"uploaded": True},
    "ArtifactLink": {"category": "output"},
    "AlertCreate": {"name": "fuzzed", "source": "metrics", "alert": {"metric": "x"}},
    "AlertStatusUpdate": {"status": "critical"},
}


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    query: tuple[str, ...]
    path_params: tuple[str, ...]
    body: type[BaseModel] | None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _flat(dependant: Any, attribute: str) -> list[str]:
    names = [param.name for param in getattr(dependant, attribute)]
    for sub in dependant.dependencies:
        names += _flat(sub, attribute)
    return names


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):  # ``Model | None`` too
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def server_routes() -> list[Route]:
    """Every route the server serves, as its routers declare it."""
    routers = [("/api", module.router) for module in (service, folders, runs, metrics, events, artifacts, alerts)]
    routers.append(("", artifacts.content_router))
    found = []
    for prefix, router in routers:
        for route in router.routes:
            for method in sorted(route.methods):  # type: ignore[attr-defined]
                name = f"{method} {prefix}{route.path}"  # type: ignore[attr-defined]
                field = route.body_field  # type: ignore[attr-defined]
                body = _model_of(field.field_info.annotation) if field is not None else RAW_BODY_MODELS.get(name)
                found.append(Route(method, prefix + route.path, tuple(_flat(route.dependant, "query_params")),  # type: ignore[attr-defined]
                                   tuple(_flat(route.dependant, "path_params")), body))  # type: ignore[attr-defined]
    return found


ROUTES = server_routes()


def test_every_route_with_a_body_has_a_model_and_a_valid_body():
    """A new route that reads its own body must say what the body holds, or it is fuzzed blind."""
    assert len(ROUTES) > 30
    for route in ROUTES:
        if route.method in ("POST", "PUT") and route.body is None:
            assert str(route) in RAW_CONTENT_ROUTES | NO_BODY_ROUTES, f"{route}: add it to RAW_BODY_MODELS"
        if route.body is not None:
            assert route.body.__name__ in VALID_BODIES, f"{route}: add a valid {route.body.__name__} to VALID_BODIES"


# -- hostile values ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Deep:
    """A value nested ``depth`` levels deep, written out directly (no encoder nests that far)."""

    depth: int
    kind: str  # "list" or "dict"

    def json(self) -> str:
        return ("[" * self.depth + "0" + "]" * self.depth) if self.kind == "list" else (
            '{"a":' * self.depth + "0" + "}" * self.depth)

    def msgpack(self) -> bytes:
        return (b"\x91" if self.kind == "list" else b"\x81\xa1a") * self.depth + b"\xc0"


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
LONE_SURROGATE_TEXT = st.tuples(st.text(max_size=5), SURROGATES, st.text(max_size=5)).map("".join)
HOSTILE_SCALARS = st.sampled_from([
    math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 2**63, 2**63 - 1, -(2**63) - 1, 2**64, 2**70, 10**30,
    -1, 0, True, False, None, "", "\ud800", "\udfff", "a\udc00b", "\x00", "x" * 5000, "text/\u0100", "a\r\nb: c",
    "../../etc/passwd", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-01:00", "2026-02-30T00:00:00",
    "2026-01-01T00:00:00", "NaN", "/", "/a/../b",
])
HOSTILE_LEAVES = st.one_of(
    HOSTILE_SCALARS, HOSTILE_SCALARS, HOSTILE_SCALARS,  # the known troublemakers, half of the time
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.one_of(st.characters(), SURROGATES), max_size=12),
    LONE_SURROGATE_TEXT,
    st.builds(Deep, st.sampled_from([10, 70, 1000, 10_000]), st.sampled_from(["list", "dict"])),
)
HOSTILE = st.recursive(
    HOSTILE_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | LONE_SURROGATE_TEXT, inner,
                                                                max_size=3),
    max_leaves=6,
)


# Values a field of the right type may hold, at the edges: the server must store them and
# answer them back.
ODD_TEXT = st.one_of(
    st.sampled_from([
        "", "\x00", "a\x00b", "x" * 10_000, "\u00e9", "\u65e5\u672c", "\U0001f600", "\u202e", "\ufeff", "null",
        "'; DROP TABLE runs; --", "%s%n", "0001-01-01T00:00:00", "9999-12-31T23:59:59", "9999-12-31T23:59:59Z",
        "1970-01-01T00:00:00+14:00", "2026-01-01T00:00:00.000001", "/", "/a b/c.d", "text/plain; charset=utf-8",
    ]),
    st.text(max_size=30),
)
EDGE_JSON = st.recursive(
    st.one_of(
        ODD_TEXT, st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.sampled_from([2**63 - 1, -(2**63), 1.7976931348623157e308, 5e-324, -0.0]),
        st.builds(Deep, st.sampled_from([30, 55]), st.sampled_from(["list", "dict"])),  # inside the limit
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=6,
)


def edge_values(annotation: Any) -> st.SearchStrategy:
    """Odd but valid values for a field of type ``annotation``."""
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.sampled_from([0, 1, 2**31, 2**63 - 1]) | st.integers(min_value=0, max_value=2**63 - 1)
    if annotation is float:
        return st.sampled_from([5e-324, 1e308, 1.7976931348623157e308, 2**63 - 1, 0.5]) | st.floats(
            min_value=1e-300, allow_nan=False, allow_infinity=False)
    if annotation is str:
        return ODD_TEXT
    if typing.get_origin(annotation) is list:
        return st.lists(edge_values(_unwrap(typing.get_args(annotation)[0])), max_size=4)
    return EDGE_JSON


def to_json(value: Any) -> bytes:
    """JSON text, including what strict JSON forbids (NaN, Infinity, lone-surrogate escapes)."""

    def text(item: Any) -> str:
        if isinstance(item, Deep):
            return item.json()
        if isinstance(item, dict):
            return "{" + ",".join(f"{json.dumps(str(k))}:{text(v)}" for k, v in item.items()) + "}"
        if isinstance(item, list):
            return "[" + ",".join(text(v) for v in item) + "]"
        return json.dumps(item)

    return text(value).encode()


def _header(size: int, small: int, codes: bytes) -> bytes:
    if size < 16:
        return bytes([small | size])
    return codes[:1] + size.to_bytes(2, "big") if size < 1 << 16 else codes[1:] + size.to_bytes(4, "big")


def to_msgpack(value: Any) -> bytes:
    """msgpack, including lone surrogates (as the bytes they would be) and nesting past its limits."""
    if isinstance(value, Deep):
        return value.msgpack()
    if isinstance(value, dict):
        return _header(len(value), 0x80, b"\xde\xdf") + b"".join(
            to_msgpack(str(k)) + to_msgpack(v) for k, v in value.items())
    if isinstance(value, list):
        return _header(len(value), 0x90, b"\xdc\xdd") + b"".join(to_msgpack(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        value = float(value)  # msgpack has no wider integers
    return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")


# -- where they go ----------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """The type inside ``Annotated[...]`` and ``X | None``."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(options) == 1:
                annotation = options[0]
                continue
        return annotation


def field_paths(model: type[BaseModel], prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Where a value can go in a body of ``model``, and the type it should have there: each
    field, each item and key of list and dict fields, the fields of nested models, and a key
    the model does not know."""
    yield (*prefix, "unknown_field"), Any
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        annotation = _unwrap(info.annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        item = _model_of(_unwrap(args[0])) if origin is list and args else None
        if item is None:
            yield path, annotation
        if origin is list and args:
            yield (*path, 0), _unwrap(args[0])
            if item is not None:
                yield from field_paths(item, (*path, 0))
        elif origin is dict or annotation is dict:
            yield (*path, "k"), Any
            yield (*path, "k", "nested"), Any


def put(body: Any, path: tuple, value: Any) -> Any:
    """``body`` with ``value`` at ``path``, creating the containers on the way."""
    key, rest = path[0], path[1:]
    if isinstance(key, int):
        items = list(body) if isinstance(body, list) and body else [{}]
        items[0] = put(items[0], rest, value) if rest else value
        return items
    mapping = dict(body) if isinstance(body, dict) else {}
    mapping[key] = put(mapping.get(key), rest, value) if rest else value
    return mapping


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids) if value.startswith("{") else value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


def _encode_text(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


QUERY_TEXT = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-1", "0", "1e999", str(2**70), "9" * 5000, "true", "", "[]", '["x"]',
                     '[{"id": "name", "desc": NaN}]', '["metadata.x > 1e999"]', '["created < 99999999999999999d"]',
                     "[" * 1500, '{"a": 1}', "step", "time", "timestamp", "input"]),
    st.text(alphabet=st.one_of(st.characters(), SURROGATES), max_size=12),
    HOSTILE.map(lambda value: to_json(value).decode()[:3000]),
)


# A valid value for each query parameter, so that a hostile value in one is not refused for another.
VALID_QUERY = {
    "run": "{run_id}", "runs": '["{run_id}"]', "metrics": '["x"]', "names": "x", "xaxis": "time", "aggregate": "true",
    "max_points": "3", "filters": '["name == fuzzed"]', "sorting": '[{"id": "name", "desc": false}]', "start": "0",
    "offset": "1", "count": "5", "category": "output", "name": "target.txt", "deduplicate": "True",
    "recursive": "True", "runs_only": "False",
}


def test_every_query_parameter_has_a_valid_value():
    for route in ROUTES:
        for name in route.query:
            assert name in VALID_QUERY or name == "key", f"{route}: add a valid {name} to VALID_QUERY"


@dataclasses.dataclass
class Target:
    server: ServerProcess
    ids: dict[str, str]
    upload_key: str
    download_key: str

    def new_run(self) -> str:
        answer = self.server.api.post(f"{self.server.url}/api/runs", json={"folder": "/fuzz/deleted"})
        assert answer.status_code == 200, answer.text
        return answer.json()["id"]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    """One server for the whole module, with a run, folder, alert and uploaded artifact to aim at."""
    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # not .hypothesis/ in the working tree
        set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    with ServerProcess(tmp_path_factory.mktemp("fuzz") / "server") as server:
        api, url = server.api, server.url + "/api"
        run_id = api.post(f"{url}/runs", json={"folder": "/fuzz", "status": "running"}).json()["id"]
        folder_id = api.post(f"{url}/folders", json={"path": "/fuzz/target"}).json()["id"]
        alert_id = api.post(f"{url}/alerts", json={"name": "target", "source": "user"}).json()["id"]
        assert api.put(f"{url}/runs/{run_id}", json={"alerts": [alert_id]}).status_code == 200
        created = api.post(f"{url}/artifacts", json={
            "name": "target.txt", "checksum": hashlib.sha256(CONTENT).hexdigest(), "run": run_id}).json()
        upload_key = created["url"].split("key=")[1]
        assert requests.put(created["url"], data=CONTENT, timeout=30).status_code == 200
        download_key = api.get(f"{url}/artifacts/{created['id']}").json()["url"].split("key=")[1]
        api.post(f"{url}/metrics", json={"run": run_id, "metrics": [{"time": 0.0, "step": 0, "values": {"x": 1.0}}]})
        ids = {"run_id": run_id, "folder_id": folder_id, "alert_id": alert_id, "artifact_id": created["id"]}
        yield Target(server, ids, upload_key, download_key)


def request_for(route: Route, target: Target, data: st.DataObject) -> tuple[str, str, bytes | None, dict[str, str]]:
    """A request to ``route`` with hostile values in its body, query or path."""
    ids = dict(target.ids)
    if route.method == "DELETE":
        ids["run_id"] = target.new_run()  # the runs the other routes aim at stay
    path = route.path
    for name in route.path_params:
        value = ids[name]
        if data.draw(st.integers(0, 9), label=f"hostile {name}?") == 9:
            value = data.draw(st.text(alphabet=st.one_of(st.characters(), SURROGATES), min_size=1, max_size=30))
        path = path.replace("{" + name + "}", _encode_text(value))
    query = []
    for name in route.query:
        if name == "key":
            valid = target.upload_key if route.method == "PUT" else target.download_key
        else:
            valid = VALID_QUERY[name].replace("{run_id}", ids["run_id"])
        choice = data.draw(st.sampled_from(["valid", "absent", "hostile"]), label=f"{name}?")
        if choice != "absent":
            value = valid if choice == "valid" else data.draw(QUERY_TEXT, label=name)
            query.append(f"{name}={_encode_text(value)}")
    headers = {"Authorization": f"Bearer {target.server.token}"}
    body: bytes | None = None
    if str(route) in RAW_CONTENT_ROUTES:
        body = data.draw(st.sampled_from([CONTENT, b"", b"other bytes"]), label="content")
    elif route.body is not None:
        document: Any = _fill(VALID_BODIES[route.body.__name__], ids)
        places = list(field_paths(route.body))
        # "edge": odd values of each field's own type, which must be stored and read back (or
        # refused: an odd folder path is not a path).  "hostile": one value that must be
        # refused, alone in an otherwise valid body (anything else wrong would have the request
        # refused for the wrong field), put in a free-form field (``system``, ``visibility``,
        # an alert's extras) more often than not: there only the server's checks stand between
        # it and the database.
        mode = data.draw(st.sampled_from(["edge", "hostile"]), label="mode")
        if mode == "edge":
            for _ in range(data.draw(st.integers(1, 3), label="fields")):
                where, annotation = data.draw(st.sampled_from(places), label="field")
                document = put(document, where, data.draw(edge_values(annotation), label=str(where)))
        else:
            free_form = [place for place in places if place[1] is Any]
            where, _ = data.draw(st.sampled_from(places + 3 * free_form), label="hostile field")
            document = put(document, where, data.draw(HOSTILE, label=f"hostile {where}"))
        if mode == "hostile" and data.draw(st.integers(0, 9), label="whole body hostile?") == 9:
            document = data.draw(HOSTILE, label="whole body")
        encoding = data.draw(st.sampled_from(["json", "msgpack"]), label="encoding")
        body = to_json(document) if encoding == "json" else to_msgpack(document)
        headers["Content-Type"] = "application/json" if encoding == "json" else "application/msgpack"
    if route.path in ("/api/metrics", "/api/events") and route.method == "POST":
        # visible ASCII: requests itself refuses to send a header value with edge whitespace
        headers["Idempotency-Key"] = data.draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                                       max_size=20), label="Idempotency-Key")
    url = target.server.url + path + ("?" + "&".join(query) if query else "")
    return route.method, url, body, headers


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_no_route_answers_5xx_and_nothing_it_stores_breaks_a_read(route: Route, target: Target):
    session = requests.Session()

    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=DEADLINE, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def examples(data: st.DataObject) -> None:
        method, url, body, headers = request_for(route, target, data)
        try:
            answer = session.request(method, url, data=body, headers=headers, timeout=30)
        except requests.RequestException as exc:
            session.close()  # a fresh connection for the next example
            raise AssertionError(f"{method} {url[:300]}: no answer ({exc}); body {(body or b'')[:300]!r}") from exc
        assert answer.status_code < 500, f"{method} {url[:300]} -> {answer.status_code}; body {(body or b'')[:300]!r}"
        if answer.status_code >= 400:
            detail = answer.json().get("detail")
            assert detail, f"{method} {url[:300]} -> {answer.status_code} without a detail: {answer.text[:300]}"

    try:
        examples()
    finally:
        session.close()
    if route.method != "GET":
        assert target.server.unreadable(target.ids["run_id"]) == {}, f"after {route}"


def test_everything_stored_by_the_fuzzing_reads_back_after_a_restart(target: Target):
    target.server.stop()
    target.server.start()
    assert target.server.unreadable(target.ids["run_id"]) == {}
