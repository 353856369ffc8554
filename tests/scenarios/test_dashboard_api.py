"""The dashboard's data endpoints (simvue/server/routes/dashboard.py) on a real ``mpiexec -n 4``
run sent to a real ``simvue server``: grouped metrics, M4 lines that keep a one-step spike,
the rank × step heat map with its margins, the band with the outlying rank, and bad input."""

from __future__ import annotations

import sys
import textwrap

import pytest
import requests

from conftest import mpiexec

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')
pytest.importorskip("numpy", reason='the server extra is not installed: pip install "simvue[server]"')

from simvue.server.local import ServerProcess  # noqa: E402

STEPS = 2000
SCRIPT = textwrap.dedent(
    f"""
    import time
    from simvue import Run
    with Run() as run:
        run.config(resources_metrics_interval=1)
        run.init(name="dash", reduce={{"loss": ["mean", "min", "max", "namespace"]}})
        run.create_user_alert("halfway reached")
        for step in range({STEPS}):
            value = run.rank + step / {STEPS}
            if run.rank == 2 and step == 1234:
                value = 100.0   # one spike, one step long
            if run.rank == 3:
                value += 10.0   # a rank that runs hot all along
            run.log_metrics({{"loss": value, "plain": float(step % 7)}}, step=step)
            if run.rank == 0 and step == 1000:
                run.log_event("halfway", log_level="warning")
                run.log_alert("halfway reached", "critical")
        run.log_event("done")
        time.sleep(0.5)  # a run of some length: every rank outlives the resource sampler's start
    """
)


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    """A server holding one finished 4-rank run, and that run's id."""
    tmp = tmp_path_factory.mktemp("dash")
    server = ServerProcess(tmp / "server-data")
    try:
        script = tmp / "dash.py"
        script.write_text(SCRIPT)
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("SIMVUE_AGGREGATOR", raising=False)
            env = {**server.env, "SIMVUE_STORE": str(tmp / "store"), "SIMVUE_RENDEZVOUS_DIR": str(tmp / "rendezvous"),
                   "SIMVUE_UPLOAD_INTERVAL_S": "0.2"}
            result = mpiexec(4, sys.executable, str(script), env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        run = server.wait_for_status("dash")
        assert run["status"] == "completed", run
        yield server, run["id"]
    finally:
        server.stop()


def _get(server: ServerProcess, path: str, **params) -> requests.Response:
    return requests.get(f"{server.url}/api{path}", params=params, timeout=30,
                        headers={"Authorization": f"Bearer {server.token}"})


def test_the_overview_groups_per_rank_reduced_and_plain_metrics(dash):
    server, run_id = dash
    answer = _get(server, f"/dashboard/runs/{run_id}")
    assert answer.status_code == 200, answer.text
    view = answer.json()
    groups = view["groups"]
    assert groups["per_process"]["loss"] == ["rank0", "rank1", "rank2", "rank3"]
    assert groups["per_process"]["plain"] == ["rank0", "rank1", "rank2", "rank3"]
    assert groups["reduced"]["loss"] == ["mean", "min", "max", "count"]
    assert "cpu.usage.percentage" in groups["process_resources"]
    assert groups["process_resources"]["cpu.usage.percentage"] == ["rank0", "rank1", "rank2", "rank3"]
    assert list(groups["node_resources"]["memory.usage"]) == view["nodes"]
    assert view["points"]["rank2/loss"] == STEPS
    assert view["events"] >= 4
    assert view["run"]["status"] == "completed" and view["duration_s"] > 0
    assert sorted(view["processes"]) == ["rank0", "rank1", "rank2", "rank3"]


def test_lines_are_bounded_by_the_width_and_keep_the_spike(dash):
    server, run_id = dash
    answer = _get(server, f"/dashboard/runs/{run_id}/lines", name=["rank2/loss", "loss.max", "nope"], width=50)
    assert answer.status_code == 200, answer.text
    lines = answer.json()
    assert sorted(lines) == ["loss.max", "rank2/loss"]  # a name the run lacks is left out
    for drawn in lines.values():
        assert drawn["points"] == STEPS and drawn["range"] == [0, STEPS - 1]
        assert len(drawn["x"]) <= 4 * 50 + 2 and len(drawn["x"]) == len(drawn["y"])
        assert drawn["x"] == sorted(drawn["x"]) and drawn["x"][0] == 0 and drawn["x"][-1] == STEPS - 1
    assert 100.0 in lines["rank2/loss"]["y"] and 1234 in lines["rank2/loss"]["x"]
    assert 100.0 in lines["loss.max"]["y"]
    # a zoom: only that range, one point beyond each edge, every point when few enough
    zoom = _get(server, f"/dashboard/runs/{run_id}/lines", name="rank2/loss", width=200, lo=1200, hi=1300).json()
    assert zoom["rank2/loss"]["x"] == list(range(1199, 1302))
    timed = _get(server, f"/dashboard/runs/{run_id}/lines", name="rank2/loss", width=50, x="time").json()
    assert timed["rank2/loss"]["x"] == sorted(timed["rank2/loss"]["x"]) and 100.0 in timed["rank2/loss"]["y"]


def test_the_heat_map_has_a_row_per_rank_margins_and_the_hot_rank_as_worst(dash):
    server, run_id = dash
    answer = _get(server, f"/dashboard/runs/{run_id}/heatmap", metric="loss", width=40)
    assert answer.status_code == 200, answer.text
    heat = answer.json()
    assert heat["labels"] == ["rank0", "rank1", "rank2", "rank3"]
    assert len(heat["cells"]) == 4 and all(len(row) == 40 for row in heat["cells"])
    assert len(heat["edges"]) == 41 and heat["edges"][0] == 0 and heat["edges"][-1] == STEPS - 1
    rows = {row["label"]: row for row in heat["rows"]}
    assert rows["rank2"]["max"] == 100.0 and rows["rank0"]["min"] == 0.0
    assert all(row["points"] == STEPS for row in rows.values())
    assert rows["rank3"]["mean"] == pytest.approx(13 + (STEPS - 1) / STEPS / 2, rel=1e-6)
    assert heat["columns"]["max"][int(1234 / (STEPS - 1) * 40)] == 100.0  # the spike is in the top margin
    assert set(heat["worst"]) <= {"rank3", "rank2"} and heat["worst"].count("rank3") >= 39
    assert all(value > 1 for value in heat["imbalance"])
    resources = _get(server, f"/dashboard/runs/{run_id}/heatmap", metric="memory.usage", kind="resource", width=10)
    assert resources.status_code == 200 and resources.json()["labels"] == ["rank0", "rank1", "rank2", "rank3"]


def test_the_band_spans_every_rank_and_names_the_outliers(dash):
    server, run_id = dash
    view = _get(server, f"/dashboard/runs/{run_id}/band", metric="loss", width=20, outliers=1).json()
    assert list(view["outliers"]) == ["rank3"]
    assert len(view["columns"]["min"]) == 20
    assert min(v for v in view["columns"]["min"] if v is not None) == 0.0
    assert max(v for v in view["columns"]["max"] if v is not None) == 100.0
    assert len(view["outliers"]["rank3"]["x"]) <= 82


def test_markers_place_warnings_on_the_step_and_time_axes(dash):
    server, run_id = dash
    on_steps = _get(server, f"/dashboard/runs/{run_id}/markers").json()
    halfway = [m for m in on_steps["markers"] if m["text"].endswith("halfway")]
    assert len(halfway) == 1 and halfway[0]["level"] == "warning" and halfway[0]["kind"] == "event"
    # Where the ranks were when rank 0 logged it: about step 1000, but the ranks start and run
    # at their own pace (far apart on a loaded machine), so anywhere well inside the run.
    assert 100 <= halfway[0]["x"] <= STEPS - 100, halfway
    assert not any(m["text"].endswith("done") for m in on_steps["markers"])  # info is not asked for
    with_info = _get(server, f"/dashboard/runs/{run_id}/markers", x="time", levels="info,warning").json()
    done = [m for m in with_info["markers"] if m["text"].endswith("done")]
    assert len(done) == 4 and all(m["x"] >= 0 for m in done)
    assert with_info["left_out"] == 0
    fired = [m for m in on_steps["markers"] if m["kind"] == "alert"]
    assert [m["text"] for m in fired] == ["alert halfway reached fired"] and fired[0]["level"] == "critical"
    assert abs(fired[0]["x"] - halfway[0]["x"]) < 300  # fired where the warning was logged


@pytest.mark.parametrize("path, params, status", [
    ("/dashboard/runs/{id}/lines", {"name": "loss.mean", "width": 0}, 422),
    ("/dashboard/runs/{id}/lines", {"name": "loss.mean", "width": 10**6}, 422),
    ("/dashboard/runs/{id}/lines", {"name": "loss.mean", "lo": "nan"}, 400),
    ("/dashboard/runs/{id}/lines", {"name": "loss.mean", "hi": "inf"}, 400),
    ("/dashboard/runs/{id}/lines", {"name": "loss.mean", "x": "wall"}, 422),
    ("/dashboard/runs/{id}/lines", {"name": ["x"] * 65}, 400),
    ("/dashboard/runs/{id}/heatmap", {"metric": "nope"}, 400),
    ("/dashboard/runs/{id}/heatmap", {"metric": b"\xff\xfe"}, 400),  # not UTF-8
    ("/dashboard/runs/{id}/band", {"metric": "loss", "outliers": 10**9}, 422),
    ("/dashboard/runs/nope", {}, 404),
    ("/dashboard/runs/nope/heatmap", {"metric": "loss"}, 404),
])
def test_bad_requests_get_clear_errors(dash, path, params, status):
    server, run_id = dash
    answer = _get(server, path.replace("{id}", run_id), **params)
    assert answer.status_code == status, answer.text
    assert "detail" in answer.json()


def test_the_endpoints_need_the_token(dash):
    server, run_id = dash
    answer = requests.get(f"{server.url}/api/dashboard/runs/{run_id}", timeout=30)
    assert answer.status_code == 401


def test_simvue_ui_says_what_is_wrong_without_a_store_or_a_free_port(tmp_path):
    import socket
    import subprocess

    missing = subprocess.run([sys.executable, "-m", "simvue.cli", "ui", "--store", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"simvue ui: no store at {tmp_path / 'nothing'} (run something first, or pass --store DIR)"
    assert not (tmp_path / "nothing").exists()  # nothing created
    store = tmp_path / "store"
    from simvue.store import Store

    Store(store).close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "simvue.cli", "ui", "--store", str(store), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "--port 0 picks a free one" in busy.stderr
    assert "Traceback" not in busy.stderr
