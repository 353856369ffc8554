"""Runs sent to a real ``simvue server`` process over real HTTP: every point arrives, in
order, through outages, injected failures and pushes, from one process per job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, mpiexec, read_run, run_script
from simvue.server.local import ServerProcess
from simvue.store import Store, StoreBatch
from simvue.validation import format_timestamp, optional_timestamp

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')

FAST = {
    "SIMVUE_UPLOAD_INTERVAL_S": "0.2",
    "SIMVUE_ABORT_POLL_INTERVAL_S": "0.3",
    "SIMVUE_RETRY_MAX_INTERVAL_S": "1",
    "SIMVUE_CLOSE_TIMEOUT_S": "30",
}

LOGGING_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from simvue import Run
    name, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with Run() as run:
        run.init(name=name, folder="/online/tests", tags=["a"], metadata={"steps": steps})
        run.set_folder_details(metadata={"project": "x"}, description="online tests")
        for step in range(steps):
            run.log_metrics({"loss": 1.0 / (step + 1), "x": float(step)})
            if step % 100 == 0:
                run.log_event(f"step {step}")
            if pause:
                time.sleep(pause)
        run.update_tags(["b"])
        run.update_metadata({"done": True})
    print("PID", os.getpid())
    """
)


# The two ways metrics travel (docs/online.md#upload-formats): to ``simvue server`` as packed
# columns by default, in the Simvue server's own format with upload_format="upstream".  Each
# test that counts metric requests runs with both: (setting, route, prefix a fault rule needs).
FORMATS = {
    "columns": ("auto", "POST /api/runs/{run_id}/columns", "POST /api/runs/"),
    "upstream": ("upstream", "POST /api/metrics", "POST /api/metrics"),
}


@pytest.fixture(params=sorted(FORMATS))
def upload_format(request, monkeypatch):
    """``(route, fault prefix)`` of the format this test runs with; the setting is in the
    environment of every process the test starts."""
    setting, route, prefix = FORMATS[request.param]
    monkeypatch.setenv("SIMVUE_UPLOAD_FORMAT", setting)
    return route, prefix


@pytest.fixture
def server(tmp_path):
    process = ServerProcess(tmp_path / "server-data")
    try:
        yield process
    finally:
        process.stop()


def client_env(server: ServerProcess, **extra: str) -> dict[str, str]:
    return {**FAST, **server.env, **extra}


def assert_complete(server: ServerProcess, name: str, steps: int, status: str = "completed") -> dict:
    run = server.wait_for_status(name)
    assert run["status"] == status, run
    metrics = server.metrics(run["id"])
    assert metrics["loss"]["values"] == [1.0 / (step + 1) for step in range(steps)]
    assert metrics["x"]["values"] == [float(step) for step in range(steps)]
    assert metrics["x"]["steps"] == list(range(steps))
    events = [e["message"] for e in server.events(run["id"])]
    assert events == [f"step {step}" for step in range(0, steps, 100)]
    return run


def test_a_terminated_run_still_sends_everything_after_its_status(server, tmp_path):
    """Rank 0 is interrupted: the status ``terminated`` is stored (and sent) at once, while
    rank 1 goes on logging for a while; the upload goes on until the run's end is in the
    store, so rank 1's later points reach the server too."""
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(
        """
        import time
        from simvue import Run
        from simvue.topology import detect
        rank = detect().rank
        with Run() as run:
            run.init(name="interrupted")
            for step in range(300):
                run.log_metrics({"x": float(step)}, step=step)
                if rank == 0 and step == 50:
                    raise KeyboardInterrupt
                time.sleep(0.005)
        """
    ))
    result = mpiexec(2, sys.executable, str(script), env=client_env(server), timeout=120)
    assert result.returncode != 0, result.stderr
    run = server.wait_for_status("interrupted")
    assert run["status"] == "terminated", run
    metrics = server.metrics(run["id"])
    assert metrics["rank0/x"]["steps"] == list(range(51))
    assert metrics["rank1/x"]["steps"] == list(range(300))
    store = Store(Path(os.environ["SIMVUE_STORE"]))
    try:
        local = store.run("interrupted")
    finally:
        store.close()
    assert {p["state"] for p in local["metadata"]["simvue"]["processes"].values()} == {"done"}
    # the end time stored ahead of time (when rank 0 was interrupted) was replaced on the server too
    assert server.run_named("interrupted")["endtime"] == format_timestamp(local["ended"])


def test_a_run_arrives_through_the_api_from_one_process(server):
    result = run_script(LOGGING_SCRIPT, "online-one", "3000", "0", env=client_env(server))
    assert result.returncode == 0, result.stderr
    run = assert_complete(server, "online-one", 3000)
    assert run["folder"] == "/online/tests"
    assert sorted(run["tags"]) == ["a", "b"]
    assert run["metadata"]["steps"] == 3000 and run["metadata"]["done"] is True
    folders = server.get("/folders", filters=json.dumps(["path == /online/tests"]))["data"]
    assert folders[0]["metadata"] == {"project": "x"} and folders[0]["description"] == "online tests"
    pid = result.stdout.split("PID")[1].strip()
    assert [client.split(":")[1] for client in server.stats()["clients"]] == [pid]
    # The local store holds the same run, marked as sent.
    store = Store(Path(os.environ["SIMVUE_STORE"]))
    try:
        local = store.run("online-one")
        assert store.upload(local["id"], server.url)["state"] == "sent"
    finally:
        store.close()


def test_mpi_job_sends_every_rank_through_one_process(server, tmp_path):
    example = ROOT / "examples" / "mpi_sim.py"
    env = client_env(server, MPI_SIM_NAME="online-mpi", MPI_SIM_STEPS="300")
    result = mpiexec(4, sys.executable, str(example), env=env, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    run = server.wait_for_status("online-mpi")
    assert run["status"] == "completed"
    metrics = server.metrics(run["id"])
    for rank in range(4):
        assert metrics[f"rank{rank}/loss"]["steps"] == list(range(300)), rank
    assert metrics["residual.count"]["values"] == [4.0] * 300
    messages = {e["message"] for e in server.events(run["id"])}
    assert {f"[rank{rank}] rank {rank} finished" for rank in range(1, 4)} <= messages
    clients = server.stats()["clients"]
    assert len(clients) == 1, clients
    # ... the aggregator's own process, started by rank 0 (no rank talks to the server)
    aggregator = run["metadata"]["simvue"]["aggregator"]
    assert aggregator["in"] == "process"
    assert clients[0].split(":")[1] == str(aggregator["pid"])
    ranks = {str(p["pid"]) for p in run["metadata"]["simvue"]["processes"].values()}
    assert str(aggregator["pid"]) not in ranks and len(ranks) == 4


def test_server_down_mid_run_loses_nothing_and_keeps_order(server):
    env = client_env(server)
    script = subprocess.Popen(
        [sys.executable, "-c", LOGGING_SCRIPT, "online-outage", "2500", "0.002"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(2.0)
    server.stop()
    time.sleep(4.0)
    server.start()
    out, err = script.communicate(timeout=120)
    assert script.returncode == 0, err
    assert "retrying" in err
    assert_complete(server, "online-outage", 2500)


def test_injected_500s_and_429s_are_retried(tmp_path, upload_format):
    route, prefix = upload_format
    server = ServerProcess(
        tmp_path / "server-data", f"{prefix}=500x3", "POST /api/events=429x2", "PUT /api/runs=503x2"
    )
    try:
        result = run_script(LOGGING_SCRIPT, "online-faults", "1500", "0.001", env=client_env(server))
        assert result.returncode == 0, result.stderr
        assert_complete(server, "online-faults", 1500)
        requests_seen = server.stats()["requests"]
        assert requests_seen.get(route, 0) >= 4
    finally:
        server.stop()


def push(server: ServerProcess, *names: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simvue.cli", "push", *names],
        env={**os.environ, **server.env}, capture_output=True, text=True, timeout=timeout,
    )


def test_bad_token_is_a_clear_error_and_the_run_can_be_pushed_later(server):
    bad = client_env(server, SIMVUE_TOKEN="not-a-token")
    strict = run_script(
        "from simvue import Run\nrun = Run()\nrun.config(suppress_errors=False)\nrun.init(name='bad-token')\n",
        env=bad,
    )
    assert strict.returncode != 0
    assert "SimvueRunError" in strict.stderr and "401" in strict.stderr, strict.stderr

    lenient = run_script(LOGGING_SCRIPT, "bad-token-kept", "500", "0", env=bad)
    assert lenient.returncode == 0, lenient.stderr
    assert lenient.stderr.count("401") == 1, lenient.stderr
    assert "simvue push" in lenient.stderr
    local = read_run(Path(os.environ["SIMVUE_STORE"]), "bad-token-kept")
    assert len(local["metrics"]["x"]) == 500 and local["status"] == "completed"

    pushed = push(server, "bad-token-kept")
    assert pushed.returncode == 0, pushed.stderr
    assert_complete(server, "bad-token-kept", 500)


def test_close_with_server_down_tells_how_to_push_and_push_is_idempotent(server, upload_format):
    route, _ = upload_format
    env = client_env(server, SIMVUE_CLOSE_TIMEOUT_S="2")
    server.stop()
    result = run_script(LOGGING_SCRIPT, "online-later", "800", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "Send it with: simvue push" in result.stderr and "online-later" in result.stderr
    server.start()
    first = push(server)
    assert first.returncode == 0, first.stderr
    assert "online-later: sent as" in first.stdout
    run = assert_complete(server, "online-later", 800)
    counts = server.stats()["requests"]
    for again in (push(server), push(server, "online-later")):
        assert again.returncode == 0, again.stderr
        assert "already sent" in again.stdout or "online-later" not in again.stdout
    assert counts.get(route) and server.stats()["requests"].get(route) == counts.get(route)
    assert len(server.metrics(run["id"])["x"]["values"]) == 800


def test_interrupted_push_resumes_without_duplicates(server, upload_format):
    route, _ = upload_format
    steps = 400_000
    offline = run_script(
        LOGGING_SCRIPT.replace("with Run() as run", "with Run(mode='offline') as run"),
        "big-push", str(steps), "0", env=client_env(server), timeout=300,
    )
    assert offline.returncode == 0, offline.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "simvue.cli", "push", "big-push"],
        env={**os.environ, **server.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while server.stats()["requests"].get(route, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    posted_before = server.stats()["requests"][route]
    finished = push(server, "big-push", timeout=300)
    assert finished.returncode == 0, finished.stderr
    run = server.wait_for_status("big-push")
    assert run["status"] == "completed"
    metrics = server.metrics(run["id"])
    assert metrics["x"]["values"] == [float(step) for step in range(steps)]
    assert metrics["x"]["steps"] == list(range(steps))
    # Two metrics per step, 100,000 (upstream) or 500,000 (columns) points per request: 8 or
    # 2 requests in all, none repeated more than the one in flight when the push was killed.
    total = server.stats()["requests"][route]
    assert posted_before >= 1 and total <= (8 if route == "POST /api/metrics" else 2) + 1


ABORT_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from simvue import Run

    def work(run):
        deadline = time.time() + 60
        while not run.aborted and time.time() < deadline:
            run.log_metrics({"w": 1.0})
            time.sleep(0.01)
        return run.aborted

    if __name__ == "__main__":
        seen = []
        run = Run(abort_callback=lambda r: seen.append(os.getpid()))
        run.config(abort_on_alert="run")
        run.init(name="abort-pool")
        print("READY", flush=True)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(work, [run, run])
        print("RESULTS", results, run.aborted, seen == [os.getpid()], flush=True)
        run.close()
    """
)


def request_abort_when_running(server: ServerProcess, name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            run = server.run_named(name)
            server.put(f"/runs/{run['id']}/abort", {"reason": "test"})
            return
        except AssertionError:
            time.sleep(0.1)
    raise AssertionError(f"run {name} never appeared")


def test_abort_reaches_the_parent_and_every_pool_worker(server):
    script = subprocess.Popen(
        [sys.executable, "-c", ABORT_SCRIPT], env={**os.environ, **client_env(server)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert script.stdout.readline().strip() == "READY"
    time.sleep(0.5)
    request_abort_when_running(server, "abort-pool")
    out, err = script.communicate(timeout=90)
    assert script.returncode == 0, err
    assert "RESULTS [True, True] True True" in out, out + err
    run = server.wait_for_status("abort-pool")
    assert run["status"] == "terminated"


def test_abort_terminates_a_single_process_cleanly(server):
    code = textwrap.dedent(
        """
        import time
        from simvue import Run
        with Run() as run:
            run.init(name="abort-one")
            for step in range(100_000):
                run.log_metrics({"x": float(step)})
                time.sleep(0.01)
        """
    )
    script = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, **client_env(server)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    request_abort_when_running(server, "abort-one")
    out, err = script.communicate(timeout=60)
    assert script.returncode == 1, err
    assert "an abort was requested" in err and "Traceback" not in err, err
    run = server.wait_for_status("abort-one")
    assert run["status"] == "terminated"
    steps = server.metrics(run["id"])["x"]["steps"]
    assert steps == list(range(len(steps))) and steps


def test_abort_stops_every_mpi_rank(server, tmp_path):
    code = tmp_path / "abort_mpi.py"
    code.write_text(
        textwrap.dedent(
            """
            import os, time
            from simvue import Run
            rank = os.environ["PMI_RANK"]
            with Run(abort_callback=lambda run: print(f"ABORTED {rank}", flush=True)) as run:
                run.init(name="abort-mpi")
                for step in range(100_000):
                    run.log_metrics({"x": float(step)})
                    time.sleep(0.01)
            """
        )
    )
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=mpiexec(4, sys.executable, str(code), env=client_env(server), timeout=120))
    )
    thread.start()
    time.sleep(2.0)
    request_abort_when_running(server, "abort-mpi")
    thread.join(150)
    result = outcome["result"]
    # Ranks print at the same moment: their lines may run together in mpiexec's output.
    assert sorted(re.findall(r"ABORTED (\d)", result.stdout)) == ["0", "1", "2", "3"], result.stdout + result.stderr
    run = server.wait_for_status("abort-mpi")
    assert run["status"] == "terminated"
    metrics = server.metrics(run["id"])
    assert sorted(metrics) == [f"rank{rank}/x" for rank in range(4)]


def test_cli_reads_runs_from_the_configured_server(server):
    result = run_script(LOGGING_SCRIPT, "online-cli", "300", "0", env=client_env(server))
    assert result.returncode == 0, result.stderr
    server.wait_for_status("online-cli")
    env = {**os.environ, **server.env}
    listing = subprocess.run(
        [sys.executable, "-m", "simvue.cli", "runs", "list", "--json"], env=env, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    assert [run["name"] for run in json.loads(listing.stdout)] == ["online-cli"]
    down = {**env, "SIMVUE_URL": "http://127.0.0.1:9"}
    local_listing = subprocess.run(
        [sys.executable, "-m", "simvue.cli", "runs", "list", "--offline", "--json"], env=down,
        capture_output=True, text=True,
    )
    assert [run["name"] for run in json.loads(local_listing.stdout)] == ["online-cli"], local_listing.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "simvue.cli", "runs", "list"], env=down, capture_output=True, text=True
    )
    assert unreachable.returncode == 1 and "--offline" in unreachable.stderr
    exports = [
        json.loads(
            subprocess.run(
                [sys.executable, "-m", "simvue.cli", *flags, "export", "online-cli"],
                env=env, capture_output=True, text=True, check=True,
            ).stdout
        )
        for flags in ([], ["--offline"])
    ]
    remote, local = exports
    assert remote["metrics"] == local["metrics"]
    assert [e["message"] for e in remote["events"]] == [e["message"] for e in local["events"]]
    assert (remote["status"], remote["tags"]) == (local["status"], local["tags"])
    assert remote["options"] == local["options"]  # sent with the run, read back the same


def test_a_rejected_batch_stops_the_upload_but_keeps_everything_for_push(tmp_path, upload_format):
    route, prefix = upload_format
    server = ServerProcess(tmp_path / "server-data", f"{prefix}=422x2")
    try:
        strict = run_script(
            "from simvue import Run\nrun = Run()\nrun.config(suppress_errors=False)\nrun.init(name='strict')\n"
            "run.log_metrics({'x': 1.0})\n"
            "try:\n    run.close()\nexcept Exception as exc:\n    print('RAISED', type(exc).__name__, exc)\n",
            env=client_env(server),
        )
        assert "RAISED SimvueRunError the run was not fully sent" in strict.stdout, strict.stdout + strict.stderr
        assert "422" in strict.stdout
        result = run_script(LOGGING_SCRIPT, "online-rejected", "600", "0", env=client_env(server))
        assert result.returncode == 0, result.stderr
        expected = "/metrics" if route == "POST /api/metrics" else r"/runs/\w+/columns"
        assert re.search(f"rejected POST {expected} with 422", result.stderr), result.stderr
        assert "Send it with: simvue push" in result.stderr
        local = read_run(Path(os.environ["SIMVUE_STORE"]), "online-rejected")
        assert local["status"] == "completed" and len(local["metrics"]["x"]) == 600
        pushed = push(server, "online-rejected")
        assert pushed.returncode == 0, pushed.stderr
        assert_complete(server, "online-rejected", 600)
    finally:
        server.stop()


def test_batches_cut_anywhere_keep_every_series_in_order(server, monkeypatch):
    """Batches of 25 points end in the middle of the store's chunks (about 10 points per
    metric each); each metric's points must still reach the server in logging order."""
    from simvue.api.config import ServerConfig
    from simvue.api.connection import Connection
    from simvue import upload

    result = run_script(
        LOGGING_SCRIPT.replace("with Run() as run", "with Run(mode='offline') as run"),
        "small-batches", "200", "0.02", env=client_env(server),
    )
    assert result.returncode == 0, result.stderr
    monkeypatch.setattr(upload, "MAX_POINTS_PER_REQUEST", 25)
    store = Store(Path(os.environ["SIMVUE_STORE"]))
    connection = Connection(ServerConfig(url=server.url, token=server.token, mode="online"))
    try:
        replicator = upload.Replicator(store, connection, store.run("small-batches")["id"])
        assert replicator.sync(60.0)
    finally:
        connection.close()
        store.close()
    assert_complete(server, "small-batches", 200)
    assert server.stats()["requests"]["POST /api/metrics"] >= 400 // 25


def _replicate(server: ServerProcess, run_name: str, fmt: str, state: dict | None = None,
               compress: bool | None = None) -> int:
    """Send the local run ``run_name`` as ``push`` would, in format ``fmt``, from ``state``;
    the bytes of the request bodies sent."""
    from simvue import upload
    from simvue.api.config import ServerConfig
    from simvue.api.connection import Connection

    store = Store(Path(os.environ["SIMVUE_STORE"]))
    connection = Connection(ServerConfig(url=server.url, token=server.token, mode="online"))
    sent = 0

    def count(response, *_, **__):
        nonlocal sent
        sent += len(response.request.body or b"")

    connection._session.hooks["response"].append(count)
    try:
        connection.check_version()
        connection.compress = compress
        replicator = upload.Replicator(store, connection, store.run(run_name)["id"],
                                       upload_format="auto" if fmt == "columns" else "upstream")
        if state:
            replicator.create(60.0)
            replicator._save(**state)
        assert replicator.sync(60.0, job_over=True)
    finally:
        connection.close()
        store.close()
    return sent


@pytest.mark.parametrize("fmt", ["columns", "upstream"])
def test_a_metric_logged_twice_with_the_same_stamps_is_sent_twice(server, fmt):
    """Chunks with the same steps, times and timestamps go as one group, unless they hold the
    same metric (a call repeated with explicit stamps, in two commits): both points arrive."""
    code = textwrap.dedent(
        """
        from simvue import Run
        with Run(mode="offline") as run:
            run.init(name="repeated")
            for _ in range(2):
                run.log_metrics({"a": 1.0, "b": 2.0}, step=7, time=1.0, timestamp="2026-01-01T00:00:00Z")
                run.flush()
        """
    )
    assert run_script(code).returncode == 0
    _replicate(server, "repeated", fmt)
    metrics = server.metrics(server.wait_for_status("repeated")["id"])
    assert metrics["a"]["steps"] == metrics["b"]["steps"] == [7, 7]


@pytest.mark.parametrize("fmt", ["columns", "upstream"])
def test_a_cursor_saved_inside_one_chunk_resumes_there(server, fmt):
    """An upload state saved before chunks were sent in groups (an offset into one chunk, no
    group size) resumes in that chunk alone: the rest of it, then everything after."""
    result = run_script(
        LOGGING_SCRIPT.replace("with Run() as run", "with Run(mode='offline') as run"),
        "legacy-cursor", "300", "0", env=client_env(server),
    )
    assert result.returncode == 0, result.stderr
    store = Store(Path(os.environ["SIMVUE_STORE"]))
    run_id = store.run("legacy-cursor")["id"]
    first_chunk = store.metric_chunks_from(run_id, 0, 1)[0]
    store.close()
    first_id, first_metric, count = first_chunk[0], first_chunk[1], len(first_chunk[5])
    _replicate(server, "legacy-cursor", fmt, state={"chunk_id": first_id, "chunk_offset": 100})
    metrics = server.metrics(server.wait_for_status("legacy-cursor")["id"])
    other = "x" if first_metric == "loss" else "loss"
    assert len(metrics[first_metric]["steps"]) == 300 - 100 and metrics[first_metric]["steps"][0] == 100
    assert metrics[other]["steps"] == list(range(300)) and count >= 100


@pytest.mark.parametrize("fmt", ["columns", "upstream"])
def test_compressed_uploads_arrive_whole_and_smaller(server, fmt):
    """To a server that takes gzip bodies (its /api/version says so), large bodies go
    compressed: by default only to another machine, here forced on for one on this machine."""
    result = run_script(
        LOGGING_SCRIPT.replace("with Run() as run", "with Run(mode='offline') as run"),
        "zipped", "50000", "0", env=client_env(server),
    )
    assert result.returncode == 0, result.stderr
    store = Path(os.environ["SIMVUE_STORE"])
    plain_copy = store.parent / "plain-store"
    import shutil

    shutil.copytree(store, plain_copy)
    compressed = _replicate(server, "zipped", fmt, compress=True)
    run = assert_complete(server, "zipped", 50000)
    # The same run sent again uncompressed, from a copy of the store made before: the server
    # takes it as the same run (the creation's and batches' idempotency keys) and stores nothing twice.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIMVUE_STORE", str(plain_copy))
        plain = _replicate(server, "zipped", fmt, compress=False)
    assert compressed < plain / 2, (compressed, plain)
    assert len(server.metrics(run["id"])["x"]["values"]) == 50000


def test_alerts_and_their_states_reach_the_server(server):
    code = textwrap.dedent(
        """
        import time
        from simvue import Run
        with Run() as run:
            run.init(name="online-alerts")
            run.create_metric_threshold_alert("hot", "x", 5, "is above", frequency=0.005, window=1)
            run.create_metric_range_alert("band", "x", -1, 100, "is outside range", frequency=0.005, window=1)
            run.create_event_alert("errors", "ERROR", frequency=0.005)
            run.create_user_alert("manual")
            run.create_metric_threshold_alert("shared", "x", 1, "is above", frequency=0.005, window=1,
                                              attach_to_run=False)
            for step in range(20):
                run.log_metrics({"x": float(step)})
                time.sleep(0.02)
            run.log_event("ERROR: boom")
            run.log_alert("manual", "critical")
        """
    )
    result = run_script(code, env=client_env(server))
    assert result.returncode == 0, result.stderr
    run = server.wait_for_status("online-alerts")
    states = {entry["alert"]["name"]: entry["status"] for entry in server.get(f"/runs/{run['id']}")["alerts"]}
    assert states == {"hot": "critical", "band": "ok", "errors": "critical", "manual": "critical"}
    hot = next(e["alert"] for e in server.get(f"/runs/{run['id']}")["alerts"] if e["alert"]["name"] == "hot")
    assert hot["source"] == "metrics" and hot["alert"]["threshold"] == 5 and hot["alert"]["rule"] == "is above"
    # attach_to_run=False: defined on the server, not attached to this run.
    assert "shared" in {alert["name"] for alert in server.get("/alerts")["data"]}
    # when each alert fired is the run's own time, on the server as in the local store, and
    # simvue's Client reads it back from the server
    store = Store(Path(os.environ["SIMVUE_STORE"]))
    try:
        local = {alert["name"]: alert["fired_at"] for alert in store.alerts(store.run("online-alerts")["id"])}
    finally:
        store.close()
    alerts = server.get(f"/runs/{run['id']}")["alerts"]
    fired = {entry["alert"]["name"]: entry["fired_at"] for entry in alerts}
    assert fired == {name: optional_timestamp(local[name]) for name in fired}
    assert fired["hot"] is not None and fired["band"] is None
    manual = next(entry["alert"]["id"] for entry in alerts if entry["alert"]["name"] == "manual")
    assert server.get(f"/alerts/{manual}/status/{run['id']}")["fired_at"] == fired["manual"]
    read = run_script(
        "import json\nfrom simvue import Client\n"
        "print(json.dumps({a['name']: a['fired_at'] for a in Client().get_alerts('online-alerts')}))\n",
        env=client_env(server),
    )
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == fired


def test_resource_series_reach_the_server_through_rank_0_only(server):
    env = client_env(server, MPI_SIM_NAME="online-resources", MPI_SIM_STEPS="1200", SIMVUE_RESOURCES_INTERVAL_S="1")
    example = ROOT / "examples" / "mpi_sim.py"
    result = mpiexec(4, sys.executable, str(example), env=env, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    run = server.wait_for_status("online-resources")
    assert run["status"] == "completed", run
    metrics = server.metrics(run["id"])
    for k in range(4):
        points = metrics.get(f"resources/rank{k}/memory.usage")
        assert points and all(value > 10 for value in points["values"]), f"rank{k}: {points}"
    node = [name for name in metrics if name.startswith("resources/node/") and name.endswith("/memory.available")]
    assert len(node) == 1 and len(metrics[node[0]]["values"]) >= 2
    assert run["metadata"]["simvue"]["hosts"]  # the host facts came with the metadata
    assert len(server.stats()["clients"]) == 1  # the sampler process never talks to the server


def test_pushed_runs_keep_their_own_times_and_are_listed_by_them(server):
    """Runs recorded offline and pushed a while later are dated by the runs, not by the upload:
    created, started and ended on the server are the local ones, to the microsecond, and the
    server lists runs newest first by when they were created, whatever the push order."""
    offline = LOGGING_SCRIPT.replace("with Run() as run", "with Run(mode='offline') as run")
    for name in ("first-recorded", "second-recorded"):
        result = run_script(offline, name, "50", "0.01", env=client_env(server))
        assert result.returncode == 0, result.stderr
    resumable = run_script(
        "from simvue import Run\nrun = Run(mode='offline')\nrun.init(name='started-later', running=False)\n",
        env=client_env(server),
    )
    assert resumable.returncode == 0, resumable.stderr
    time.sleep(1.5)  # the upload comes well after the runs
    for name in ("second-recorded", "first-recorded", "started-later"):
        pushed = push(server, name)
        assert pushed.returncode == 0, pushed.stderr
    time.sleep(1.0)
    resumed = run_script(
        "from simvue import Run\nwith Run(mode='offline') as run:\n    run.reconnect('started-later')\n"
        "    run.log_metrics({'x': 1.0})\n",
        env=client_env(server),
    )
    assert resumed.returncode == 0, resumed.stderr
    time.sleep(1.0)
    assert push(server, "started-later").returncode == 0

    store = Store(Path(os.environ["SIMVUE_STORE"]))
    try:
        for name in ("first-recorded", "second-recorded", "started-later"):
            local, remote = store.run(name), server.run_named(name)
            assert remote["status"] == "completed", remote
            assert remote["created"] == format_timestamp(local["created"]), (name, remote, local)
            assert remote["started"] == format_timestamp(local["started"]), (name, remote, local)
            assert remote["endtime"] == format_timestamp(local["ended"]), (name, remote, local)
            assert remote["created"] <= remote["started"] <= remote["endtime"]
    finally:
        store.close()
    listed = [run["name"] for run in server.get("/runs")["data"]]
    assert listed == ["started-later", "second-recorded", "first-recorded"]
