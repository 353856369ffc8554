"""``simvue.Client`` reads back what runs recorded, from the local store and from a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import mpiexec, needs_server, run_script
from simvue.client import Client
from simvue.errors import SimvueRunError, SimvueValueError
from simvue.server.local import ServerProcess

SCRIPT = textwrap.dedent(
    """
    import sys
    from simvue import Run
    name, folder, tag = sys.argv[1:4]
    with Run() as run:
        run.init(name=name, folder=folder, tags=[tag], metadata={"size": len(name), "nested": {"k": "v"}})
        run.set_folder_details(description=f"folder of {name}")
        for step in range(50):
            run.log_metrics({"loss": 1.0 / (step + 1), "step2": 2.0 * step})
        run.log_event("started up")
        run.save({"name": name, "values": [1, 2, 3]}, "output", name="summary.json")
        run.log_event("something odd", log_level="warning")
    """
)


def make_runs(env: dict | None = None) -> None:
    for name, folder, tag in (("alpha", "/study/a", "one"), ("beta-run", "/study/b", "two")):
        result = run_script(SCRIPT, name, folder, tag, env=env)
        assert result.returncode == 0, result.stderr


def check_reads(client: Client) -> None:
    names = [run.name for _, run in client.get_runs()]
    assert names == ["alpha", "beta-run"]
    assert [run.name for _, run in client.get_runs(["has tag.two"])] == ["beta-run"]
    assert [run.name for _, run in client.get_runs(folder="/study")] == ["alpha", "beta-run"]
    assert [run.name for _, run in client.get_runs(["folder.path == /study/a", "status == completed"])] == ["alpha"]
    assert [run.name for _, run in client.get_runs(["metadata.size == 8"])] == ["beta-run"]
    assert [run.name for _, run in client.get_runs(["metadata.nested.k == v"], start_index=1)] == ["beta-run"]

    alpha = client.get_run(client.get_run_id_from_name("alpha"))
    assert (alpha.status, alpha.folder, alpha.tags, alpha.metadata["size"]) == ("completed", "/study/a", ["one"], 5)
    assert client.get_run_name_from_id(alpha.id) == "alpha"
    assert sorted(client.get_metrics_names(alpha.id)) == ["loss", "step2"]

    values = client.get_metric_values(["loss", "step2"], "step", run_ids=[alpha.id])
    assert values["loss"] == {(step, alpha.id): 1.0 / (step + 1) for step in range(50)}
    assert values["step2"][(49, alpha.id)] == 98.0
    by_name = client.get_metric_values(["loss"], "step", run_filters=["has tag.one"], use_run_names=True)
    assert set(by_name["loss"]) == {(step, "alpha") for step in range(50)}
    thinned = client.get_metric_values(["loss"], "step", run_ids=[alpha.id], max_points=10)
    assert len(thinned["loss"]) == 10
    series = client.get_metric_series(alpha.id, "loss")
    assert series["steps"] == list(range(50)) and series["values"][0] == 1.0

    events = client.get_events(alpha.id)
    assert [(e["message"], e["log_level"]) for e in events] == [("started up", "info"), ("something odd", "warning")]
    assert [e["message"] for e in client.get_events(alpha.id, message_contains="odd")] == ["something odd"]
    assert client.get_folder("/study/a")["description"] == "folder of alpha"
    assert [a["name"] for a in client.list_artifacts(alpha.id)] == ["summary.json"]
    assert client.get_artifact(alpha.id, "summary.json") == {"name": "alpha", "values": [1, 2, 3]}
    as_dict = client.get_runs(["name == alpha"], output_format="dict")
    assert as_dict[alpha.id]["tags"] == ["one"]


def test_client_reads_the_local_store(tmp_path):
    make_runs()
    with Client() as client:
        assert not client.online
        check_reads(client)
        with pytest.raises(SimvueRunError, match="no run"):
            client.get_run("missing")
        with pytest.raises(SimvueValueError, match="unsupported filter"):
            client.get_runs(["loss > 3"])
        with pytest.raises(SimvueValueError, match="xaxis"):
            client.get_metric_values(["loss"], "wallclock")
        with pytest.raises(SimvueRunError, match="needs a server"):
            client.abort_run("alpha", "why")
        with pytest.raises(SimvueRunError, match="no artifact named"):
            client.get_artifact("alpha", "missing")
        path = client.get_artifact_as_file("alpha", "summary.json", tmp_path / "out")
        assert json.loads(path.read_text()) == {"name": "alpha", "values": [1, 2, 3]}


@needs_server
def test_client_reads_a_server_the_same_way(tmp_path):
    with ServerProcess(tmp_path / "server") as server:
        make_runs(env=server.env)
        with Client(server_url=server.url, server_token=server.token) as remote:
            assert remote.online
            check_reads(remote)
        with Client(offline=True) as local:  # the same runs, also in the local store
            check_reads(local)


def test_client_reads_every_rank_of_an_mpi_run(tmp_path):
    code = tmp_path / "ranks.py"
    code.write_text(
        "import os\nfrom simvue import Run\nrank = int(os.environ['PMI_RANK'])\n"
        "with Run() as run:\n    run.init(name='ranks')\n"
        "    for step in range(20):\n        run.log_metrics({'x': float(rank * 100 + step)})\n"
    )
    result = mpiexec(2, sys.executable, str(code), timeout=120)
    assert result.returncode == 0, result.stderr
    with Client() as client:
        run_id = client.get_run_id_from_name("ranks")
        values = client.get_metric_values(["rank0/x", "rank1/x"], "step", run_ids=[run_id])
        for rank in range(2):
            assert values[f"rank{rank}/x"] == {(step, run_id): float(rank * 100 + step) for step in range(20)}


@needs_server
def test_client_abort_run_stops_a_live_job(tmp_path):
    code = textwrap.dedent(
        """
        import time
        from simvue import Run
        run = Run()
        run.config(abort_on_alert="ignore")
        run.init(name="to-abort")
        deadline = time.time() + 60
        while not run.aborted and time.time() < deadline:
            run.log_metrics({"x": 1.0})
            time.sleep(0.01)
        print("ABORTED" if run.aborted else "TIMEOUT", flush=True)
        run.close()
        """
    )
    with ServerProcess(tmp_path / "server") as server:
        env = {**os.environ, **server.env, "SIMVUE_ABORT_POLL_INTERVAL_S": "0.2"}
        job = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        with Client(server_url=server.url, server_token=server.token) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    run_id = client.get_run_id_from_name("to-abort")
                    break
                except SimvueRunError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert client.abort_run(run_id, "enough")
        out, _ = job.communicate(timeout=60)
        assert out.strip() == "ABORTED"
