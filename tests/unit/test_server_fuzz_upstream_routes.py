"""The routes added for the upstream ``simvue.Client`` and ``Run`` (tags, tensor-metric grids,
deleting folders and alerts) under the hostile input of ``test_server_fuzz.py``, whose
strategies this reuses: never a 5xx, and nothing they store breaks a later read.

The routes are read from the routers, as there; every ``DELETE`` aims at an object made for it,
so that the others keep theirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')
pytest.importorskip("hypothesis", reason='hypothesis is not installed: pip install -e ".[test]"')
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydantic import BaseModel
from test_server_fuzz import (
    DEADLINE,
    EXAMPLES_PER_ROUTE,
    HOSTILE,
    QUERY_TEXT,
    SURROGATES,
    Route,
    _encode_text,
    _fill,
    _flat,
    _model_of,
    edge_values,
    field_paths,
    put,
    to_json,
    to_msgpack,
)

from simvue.server.local import ServerProcess
from simvue.server.routes import alerts, folders, grids, tags

pytestmark = pytest.mark.timeout(120)

GRID = {"name": "target-grid", "grid": [[0.0, 1.0], [5.0]], "labels": ["x", "y"]}  # values are 2 x 1
# Bodies read by the handler itself: a list of these.
RAW_ITEM_MODELS: dict[str, type[BaseModel]] = {
    "POST /api/runs/{run_id}/metrics/": grids.GridPoint,
    "POST /api/runs/{run_id}/metrics": grids.GridPoint,
}
VALID_BODIES: dict[str, Any] = {
    "TagCreate": {"name": "fuzzed-tag"},
    "TagUpdate": {"description": "d"},
    "GridCreate": GRID,
    "GridAttach": {"metric": "field"},
    "GridPoint": [{"metric": "field", "grid": "{grid_id}", "step": 0, "time": 0.0, "array": [[1.0], [2.0]]}],
}
VALID_QUERY = {
    "start": "0", "offset": "1", "count": "5", "sorting": '[{"id": "name", "desc": false}]', "step": "0",
    "recursive": "True", "runs": "True", "runs_only": "False",
}


def added_routes() -> list[Route]:
    """The routes of the tags and grids routers, and the DELETE routes of folders and alerts."""
    found = []
    for module in (tags, grids, folders, alerts):
        for route in module.router.routes:
            for method in sorted(route.methods):  # type: ignore[attr-defined]
                name = f"{method} /api{route.path}"  # type: ignore[attr-defined]
                if module in (folders, alerts) and method != "DELETE":
                    continue  # fuzzed by test_server_fuzz.py
                field = route.body_field  # type: ignore[attr-defined]
                body = _model_of(field.field_info.annotation) if field is not None else RAW_ITEM_MODELS.get(name)
                found.append(Route(method, "/api" + route.path, tuple(_flat(route.dependant, "query_params")),  # type: ignore[attr-defined]
                                   tuple(_flat(route.dependant, "path_params")), body))  # type: ignore[attr-defined]
    return found


ROUTES = added_routes()


def test_every_added_route_is_fuzzed_with_valid_values_to_start_from():
    assert {"DELETE /api/folders/{folder_id}", "DELETE /api/alerts/{alert_id}", "GET /api/tags",
            "POST /api/runs/{run_id}/metrics/"} <= {str(route) for route in ROUTES}
    for route in ROUTES:
        if route.method in ("POST", "PUT"):
            assert route.body is not None and route.body.__name__ in VALID_BODIES, f"{route}: give a valid body"
        for name in route.query:
            assert name in VALID_QUERY, f"{route}: add a valid {name} to VALID_QUERY"


@dataclasses.dataclass
class Target:
    server: ServerProcess
    ids: dict[str, str]

    def post(self, path: str, body: Any) -> str:
        answer = self.server.api.post(f"{self.server.url}/api{path}", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()["id"]

    def doomed(self, name: str) -> str:
        """A fresh object for a DELETE of ``name`` to aim at."""
        unique = hashlib.sha256(os.urandom(8)).hexdigest()[:8]
        if name == "tag_id":
            return self.post("/tags", {"name": f"doomed-{unique}"})
        if name == "grid_id":
            return self.post("/grids", GRID)
        if name == "alert_id":
            return self.post("/alerts", {"name": f"doomed-{unique}", "source": "user"})
        if name == "folder_id":  # a folder with a subfolder holding a run
            path = f"/doomed/{unique}"
            self.post("/runs", {"folder": f"{path}/inner", "tags": ["doomed"]})
            return self.server.get("/folders", filters=f"path == {path}")["data"][0]["id"]
        return self.ids[name]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # not .hypothesis/ in the working tree
        set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    with ServerProcess(tmp_path_factory.mktemp("fuzz-upstream") / "server") as server:
        target = Target(server, {})
        run_id = target.post("/runs", {"folder": "/fuzz", "status": "running", "tags": ["target-tag"]})
        grid_id = target.post("/grids", GRID)
        assert server.api.put(f"{server.url}/api/runs/{run_id}/grids/{grid_id}", json={"metric": "field"}).ok
        tag_id = server.get("/tags")["data"][0]["id"]
        target.ids.update(run_id=run_id, grid_id=grid_id, tag_id=tag_id, metric="field")
        yield target


def request_for(route: Route, target: Target, data: st.DataObject) -> tuple[str, str, bytes | None, dict[str, str]]:
    ids = {name: target.doomed(name) if route.method == "DELETE" else target.ids.get(name, "")
           for name in route.path_params}
    path = route.path.replace("{metric:path}", "{metric}")
    for name in route.path_params:
        value = ids[name]
        if data.draw(st.integers(0, 9), label=f"hostile {name}?") == 9:
            value = data.draw(st.text(alphabet=st.one_of(st.characters(), SURROGATES), min_size=1, max_size=30))
        path = path.replace("{" + name + "}", _encode_text(value))
    query = []
    for name in route.query:
        choice = data.draw(st.sampled_from(["valid", "absent", "hostile"]), label=f"{name}?")
        if choice != "absent":
            value = VALID_QUERY[name] if choice == "valid" else data.draw(QUERY_TEXT, label=name)
            query.append(f"{name}={_encode_text(value)}")
    headers = {"Authorization": f"Bearer {target.server.token}"}
    body: bytes | None = None
    if route.body is not None:
        document: Any = _fill(VALID_BODIES[route.body.__name__], target.ids)
        prefix = (0,) if isinstance(document, list) else ()
        places = list(field_paths(route.body, prefix))
        if data.draw(st.sampled_from(["edge", "hostile"]), label="mode") == "edge":
            for _ in range(data.draw(st.integers(1, 3), label="fields")):
                where, annotation = data.draw(st.sampled_from(places), label="field")
                document = put(document, where, data.draw(edge_values(annotation), label=str(where)))
        else:
            where, _ = data.draw(st.sampled_from(places), label="hostile field")
            document = put(document, where, data.draw(HOSTILE, label=f"hostile {where}"))
            if data.draw(st.integers(0, 9), label="whole body hostile?") == 9:
                document = data.draw(HOSTILE, label="whole body")
        encoding = data.draw(st.sampled_from(["json", "msgpack"]), label="encoding")
        body = to_json(document) if encoding == "json" else to_msgpack(document)
        headers["Content-Type"] = "application/json" if encoding == "json" else "application/msgpack"
    url = target.server.url + path + ("?" + "&".join(query) if query else "")
    return route.method, url, body, headers


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_no_added_route_answers_5xx_and_nothing_it_stores_breaks_a_read(route: Route, target: Target):
    session = requests.Session()

    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=DEADLINE, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def examples(data: st.DataObject) -> None:
        method, url, body, headers = request_for(route, target, data)
        try:
            answer = session.request(method, url, data=body, headers=headers, timeout=30)
        except requests.RequestException as exc:
            session.close()
            raise AssertionError(f"{method} {url[:300]}: no answer ({exc}); body {(body or b'')[:300]!r}") from exc
        assert answer.status_code < 500, f"{method} {url[:300]} -> {answer.status_code}; body {(body or b'')[:300]!r}"
        if answer.status_code >= 400:
            assert answer.json().get("detail"), f"{method} {url[:300]} -> {answer.status_code}: {answer.text[:300]}"

    try:
        examples()
    finally:
        session.close()
    if route.method != "GET":
        assert target.server.unreadable(target.ids["run_id"]) == {}, f"after {route}"
