"""Saving files and objects with a run: in one process, from pool workers and from MPI ranks,
into the local store's content-addressed blobs, read back through the store and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import requests

import simvue
from simvue.artifacts import deserialize, serialize
from simvue.cli import main as cli_main
from simvue.errors import SimvueValueError, SimvueWarning
from simvue.store import Store

from conftest import ROOT, mpiexec, needs_server, read_run, run_script


def _artifacts(store_dir: Path, run_name: str) -> dict[str, dict]:
    store = Store(store_dir)
    try:
        run_id = store.run(run_name)["id"]
        return {a["name"]: {**a, "bytes": store.artifact_bytes(run_id, a["name"])} for a in store.artifacts(run_id)}
    finally:
        store.close()


def _strict_run(name: str) -> simvue.Run:
    run = simvue.Run()
    run._errors.suppress_errors = False  # raise instead of warning, to see each error
    run.init(name=name)
    return run


def test_files_and_objects_round_trip_byte_identical_and_identical_content_is_stored_once(store_dir, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, not a multiple of the chunk size
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "copy.bin").write_bytes(data)
    (tmp_path / "script.py").write_text("print('hi')\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    obj = {"a": [1, 2.5, None], "b": {"c": "d"}}

    run = _strict_run("files")
    assert run.save_file(tmp_path / "big.bin", "input", metadata={"source": "random"})
    assert run.save(str(tmp_path / "copy.bin"), "output")
    assert run.save(str(tmp_path / "script.py"), "code", preserve_path=True)
    assert run.save_file(tmp_path / "empty.txt", "output", file_type="text/x-empty")
    assert run.save_object(obj, "output", name="params")
    assert run.save([1, 2, 3], "input", name="numbers")
    assert run.save_object(("a", 1), "output", name="pickled", allow_pickle=True)
    run.close()

    saved = _artifacts(store_dir, "files")
    script_name = os.path.normpath(str(tmp_path / "script.py"))
    assert set(saved) == {"big.bin", "copy.bin", script_name, "empty.txt", "params", "numbers", "pickled"}
    big = saved["big.bin"]
    assert big["bytes"] == data and big["size"] == len(data)
    assert big["checksum"] == hashlib.sha256(data).hexdigest()
    assert big["category"] == "input" and big["metadata"] == {"source": "random"}
    assert big["original_path"] == str(tmp_path / "big.bin")
    assert saved["copy.bin"]["checksum"] == big["checksum"]
    assert saved[script_name]["mime_type"] == "text/x-python"
    assert saved["empty.txt"]["bytes"] == b"" and saved["empty.txt"]["mime_type"] == "text/x-empty"
    assert saved["params"]["mime_type"] == "application/json"
    assert deserialize(saved["params"]["bytes"], saved["params"]["mime_type"]) == obj
    assert deserialize(saved["numbers"]["bytes"], "application/json") == [1, 2, 3]
    assert deserialize(saved["pickled"]["bytes"], "application/octet-stream", allow_pickle=True) == ("a", 1)
    assert deserialize(saved["pickled"]["bytes"], "application/octet-stream") == saved["pickled"]["bytes"]
    blobs = [p for p in (store_dir / "artifacts").iterdir() if not p.name.startswith(".")]
    assert len(blobs) == len({a["checksum"] for a in saved.values()}) == 6  # big.bin and copy.bin share one


def test_numpy_arrays_are_saved_as_npy_when_numpy_is_installed(store_dir):
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(12, dtype="float32").reshape(3, 4)
    run = _strict_run("arrays")
    assert run.save_object(array, "output", name="array")
    run.close()
    saved = _artifacts(store_dir, "arrays")["array"]
    assert saved["mime_type"] == "application/vnd.simvue.numpy.v1"
    assert (deserialize(saved["bytes"], saved["mime_type"]) == array).all()


def test_serialize_refuses_objects_without_a_safe_format_unless_pickle_is_allowed():
    with pytest.raises(SimvueValueError, match="allow_pickle"):
        serialize(object())
    with pytest.raises(SimvueValueError, match="JSON"):
        serialize({"f": object()})
    assert serialize({"k": 1}) == (b'{"k": 1}', "application/json")


def test_directories_and_lists_of_paths_are_saved_with_their_relative_names(store_dir, tmp_path):
    tree = tmp_path / "results"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.json").write_text("{}")
    (tmp_path / "loose.csv").write_text("x,y\n1,2\n")

    run = _strict_run("dirs")
    assert run.save_directory(tree, "output")
    assert run.save_all([str(tmp_path / "loose.csv"), str(tree / "sub")], "input")
    run.close()

    saved = _artifacts(store_dir, "dirs")
    assert set(saved) == {"results/a.txt", "results/sub/b.json", "loose.csv", "sub/b.json"}
    assert saved["results/sub/b.json"]["mime_type"] == "application/json"
    assert saved["loose.csv"]["mime_type"] == "text/csv" and saved["loose.csv"]["category"] == "input"
    assert saved["results/a.txt"]["bytes"] == b"a"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda run, tmp: run.save_file(tmp / "a.txt", "results"), "category must be one of code, input, output"),
        (lambda run, tmp: run.save_file(tmp / "missing.txt", "input"), "no such file"),
        (lambda run, tmp: run.save(str(tmp / "missing.txt"), "input"), "no such file"),
        (lambda run, tmp: run.save({"a": 1}, "output"), "needs a name"),
        (lambda run, tmp: run.save_object({"a": 1}, "output"), "needs a name"),
        (lambda run, tmp: run.save_object(lambda: 1, "output", name="f"), "allow_pickle"),
        (lambda run, tmp: run.save_object(lambda: 1, "output", name="f", allow_pickle=True), "could not pickle"),
        (lambda run, tmp: run.save_directory(tmp / "nope", "output"), "no such directory"),
        (lambda run, tmp: run.save_file(tmp, "input"), "not a regular file"),
    ],
)
def test_bad_arguments_are_clear_errors_and_save_nothing(store_dir, tmp_path, call, message):
    (tmp_path / "a.txt").write_text("a")
    run = _strict_run("bad")
    with pytest.raises(SimvueValueError, match=message):
        call(run, tmp_path)
    run.close()
    assert _artifacts(store_dir, "bad") == {}


def test_with_suppressed_errors_a_bad_save_warns_and_returns_false(store_dir, tmp_path):
    run = simvue.Run()
    run.init(name="quiet")
    with pytest.warns(SimvueWarning, match="no such file"):
        assert run.save_file(tmp_path / "missing", "input") is False
    run.close()


def test_a_pool_worker_saves_a_file_under_its_worker_prefix(store_dir, tmp_path):
    payload = os.urandom(2 * 1024 * 1024 + 5)
    (tmp_path / "worker.bin").write_bytes(payload)
    code = textwrap.dedent(
        """
        import multiprocessing as mp, sys, simvue

        def task(run):
            run.log_metrics({"x": 1.0})
            return run.save_file(sys.argv[1], "output")

        if __name__ == "__main__":
            run = simvue.Run()
            run.init(name="pool-artifacts")
            with mp.get_context("spawn").Pool(1) as pool:
                assert pool.apply(task, (run,))
            run.save_object({"done": True}, "output", name="summary")
            run.close()
        """
    )
    script = tmp_path / "pool_script.py"
    script.write_text(code)
    result = run_script(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", str(tmp_path / "worker.bin"), timeout=60)
    assert result.returncode == 0, result.stderr
    saved = _artifacts(store_dir, "pool-artifacts")
    assert set(saved) == {"worker0/worker.bin", "summary"}
    assert saved["worker0/worker.bin"]["bytes"] == payload
    assert saved["worker0/worker.bin"]["checksum"] == hashlib.sha256(payload).hexdigest()


MPI_SAVER = """
import os, sys, time, simvue
run = simvue.Run()
run.init(name="mpi-artifacts")
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
slowest = 0.0
if rank == 1:
    run.save_file(sys.argv[1], "output")
    for i in range({points}):
        t0 = time.perf_counter()
        run.log_metrics({{"loss": float(i)}})
        slowest = max(slowest, time.perf_counter() - t0)
        if i % 50 == 0:
            time.sleep(0.005)  # spread the points over the ~0.5 s the transfer takes
    run.update_metadata({{"slowest_log_metrics_s": slowest}})
else:
    for i in range(10):
        run.log_metrics({{"loss": float(i)}})
run.close()
"""


def test_an_mpi_rank_streams_a_large_file_while_every_metric_point_still_arrives(store_dir, tmp_path):
    if not (Path(sys.executable).parent / "mpiexec").exists():
        pytest.skip("no mpiexec in the virtual environment")
    data = os.urandom(50 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    points = 5000
    script = tmp_path / "mpi_saver.py"
    script.write_text(MPI_SAVER.format(points=points))
    result = mpiexec(2, sys.executable, str(script), str(big), timeout=60)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "mpi-artifacts")
    assert run["status"] == "completed"
    assert len(run["metrics"]["rank1/loss"]) == points
    assert [p[2] for p in run["metrics"]["rank1/loss"]] == [float(i) for i in range(points)]
    assert run["metadata"]["slowest_log_metrics_s"] < 0.1  # never held up by the transfer (typically < 10 ms)
    assert "losses" not in run["metadata"].get("simvue", {})
    assert [(a["name"], a["size"]) for a in run["artifacts"]] == [("rank1/big.bin", len(data))]
    saved = _artifacts(store_dir, "mpi-artifacts")["rank1/big.bin"]
    assert saved["checksum"] == hashlib.sha256(data).hexdigest()
    assert saved["bytes"] == data


def test_the_cli_lists_and_downloads_artifacts_and_export_includes_them(store_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("input data\n")
    run = _strict_run("cli-artifacts")
    run.save_file(tmp_path / "in.txt", "input")
    run.save_object({"k": "v"}, "output", name="obj.json")
    run.close()

    assert cli_main(["--store", str(store_dir), "artifacts", "cli-artifacts"]) == 0
    listing = capsys.readouterr().out
    assert "in.txt" in listing and "obj.json" in listing and "input" in listing

    target = tmp_path / "out.txt"
    assert cli_main(["--store", str(store_dir), "artifacts", "cli-artifacts", "--get", "in.txt", "-o", str(target)]) == 0
    assert target.read_text() == "input data\n"
    assert cli_main(["--store", str(store_dir), "artifacts", "cli-artifacts", "--get", "nope", "-o", str(target)]) == 1

    assert cli_main(["--store", str(store_dir), "export", "cli-artifacts"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert {a["name"]: a["category"] for a in exported["artifacts"]} == {"in.txt": "input", "obj.json": "output"}
    assert set(exported["artifacts"][0]) == {"name", "category", "size", "checksum", "mime_type"}


ONLINE_SAVER = """
import sys, simvue
with simvue.Run() as run:
    run.init(name=sys.argv[1])
    run.save_file(sys.argv[2], "input")
    run.save_object({"k": [1, 2]}, "output", name="params")
    run.save_file(sys.argv[2], "output", name="again.bin")
    run.log_metrics({"x": 1.0})
"""


@needs_server
def test_artifacts_reach_a_server_once_and_the_cli_reads_them_back_from_it(tmp_path, store_dir, monkeypatch):
    from simvue.server.local import ServerProcess

    payload = os.urandom(1_500_000)
    (tmp_path / "data.bin").write_bytes(payload)
    server = ServerProcess(tmp_path / "server-data")
    try:
        env = {**server.env, "SIMVUE_UPLOAD_INTERVAL_S": "0.2", "SIMVUE_CLOSE_TIMEOUT_S": "30"}
        result = run_script(ONLINE_SAVER, "online-artifacts", str(tmp_path / "data.bin"), env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        run = server.wait_for_status("online-artifacts")
        listed = server.get("/artifacts", runs=json.dumps([run["id"]]))["data"]
        by_name = {a["name"]: a for a in listed}
        assert set(by_name) == {"data.bin", "params", "again.bin"}
        assert by_name["data.bin"]["runs"] == {run["id"]: "input"}
        assert by_name["data.bin"]["checksum"] == hashlib.sha256(payload).hexdigest()
        content = requests.get(by_name["data.bin"]["url"], timeout=30).content
        assert content == payload

        # Nothing is sent twice by a later push.
        store = Store(store_dir)
        try:
            local_id = store.run("online-artifacts")["id"]
            assert set(store.artifact_uploads(local_id, server.url)) == {"data.bin", "params", "again.bin"}
        finally:
            store.close()

        # The CLI reads them through the server.
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        target = tmp_path / "from-server.bin"
        assert cli_main(["artifacts", "online-artifacts", "--get", "data.bin", "-o", str(target)]) == 0
        assert target.read_bytes() == payload

        # A run recorded offline gets its artifacts with simvue push.
        monkeypatch.setenv("SIMVUE_MODE", "offline")
        offline = _strict_run("pushed-artifacts")
        offline.save_file(tmp_path / "data.bin", "code")
        offline.close()
        monkeypatch.delenv("SIMVUE_MODE")
        assert cli_main(["--store", str(store_dir), "push", "pushed-artifacts"]) == 0
        pushed = server.wait_for_status("pushed-artifacts")
        listed = server.get("/artifacts", runs=json.dumps([pushed["id"]]))["data"]
        assert [(a["name"], a["runs"]) for a in listed] == [("data.bin", {pushed["id"]: "code"})]
    finally:
        server.stop()


def test_the_aggregator_stores_streamed_content_only_when_it_arrived_whole(store_dir):
    """Chunks out of order, a short transfer, a wrong checksum or a sender's read error
    store nothing and are counted; a whole transfer is stored under the sender's prefix."""
    import time

    from simvue.abort import AbortSignal
    from simvue.aggregator.state import AggregatorState
    from simvue.config import Settings
    from simvue.store import Store
    from simvue.transport.protocol import Message, MessageKind, RecordKind

    store = Store(store_dir)
    now = time.time()
    run_id = store.create_run(name="integrity", folder="/", description=None, metadata={}, tags=[],
                              status="running", system={}, heartbeat_timeout_s=60.0, now=now)
    state = AggregatorState(
        run={"name": "integrity", "id": run_id, "started": now},
        settings=Settings(),
        local={"role": "process", "rank": 0, "size": 1, "pid": os.getpid()},
        expected_ranks=1,
        namespace_ranks=False,
        blobs=store.blobs,
        abort=AbortSignal(),
    )
    state.receive(b"w1", Message(MessageKind.HELLO, 1, {"role": "worker", "pid": 1}))
    content = b"x" * 1000 + b"y" * 1000
    digest = hashlib.sha256(content).hexdigest()

    def info(name, transfer, size=len(content), checksum=digest, **extra):
        return (RecordKind.ARTIFACT, {"name": name, "category": "output", "mime_type": "application/octet-stream",
                                    "original_path": None, "metadata": {}, "created": now, "size": size,
                                    "checksum": checksum, "transfer": transfer, **extra})

    chunk = lambda transfer, offset: (RecordKind.ARTIFACT_CHUNK, transfer, offset, content[offset:offset + 1000])
    state.receive(b"w1", Message(MessageKind.DATA, 2, [
        chunk(1, 0), chunk(1, 1000), info("whole", 1),
        chunk(2, 1000), chunk(2, 0), info("reordered", 2),
        chunk(3, 0), info("short", 3),
        chunk(4, 0), chunk(4, 1000), info("tampered", 4, checksum="0" * 64),
        chunk(5, 0), info("unreadable", 5, error="could not read it"),
        info("empty", 6, size=0, checksum=hashlib.sha256(b"").hexdigest()),
        chunk(7, 0),  # never finished
    ]))
    store.write(run_id, state.finish())
    store.close()

    saved = _artifacts(store_dir, "integrity")
    assert set(saved) == {"worker0/whole", "worker0/empty"}
    assert saved["worker0/whole"]["bytes"] == content and saved["worker0/empty"]["bytes"] == b""
    run = read_run(store_dir, "integrity")
    assert run["metadata"]["simvue"]["losses"] == {"artifact_failed": 5}
    assert sum("was not saved" in e["message"] for e in run["events"]) == 4
    assert not [p for p in (store_dir / "artifacts").iterdir() if p.name.startswith(".incoming")]
