"""When the aggregator is gone, a rank's undelivered records are spilled, reported, and can be
imported back into their run, once.  Ranks are real processes started with Slurm's variables;
rank 0, with the aggregator as its thread (``aggregate_in="thread"``), is SIGKILLed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import read_run

from simvue.cli import main as simvue_main
from simvue.cli.spill import import_file
from simvue.losses import LossCounter
from simvue.store import Store
from simvue.transport import protocol, spill
from simvue.transport.protocol import MessageKind, RecordKind
from simvue.transport.spill import SpillFile

CLOSE_TIMEOUT_S = 2.0

RANK0 = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from simvue import Run
    run = Run()
    run.init(name=sys.argv[1])
    for step in range(10):
        run.log_metrics({"x": float(step)}, step=step)
    run.flush(10)
    Path(sys.argv[2], "ready").write_text("")
    time.sleep(120)  # killed before this ends
    """
)

RANK1 = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from simvue import Run
    out = Path(sys.argv[2])
    run = Run()
    run.init(name=sys.argv[1])
    for step in range(100):
        run.log_metrics({"x": float(step)}, step=step)
    assert run.flush(10)
    (out / "flushed").write_text("")
    while not (out / "killed").exists():
        time.sleep(0.01)
    for step in range(100, 200):
        run.log_metrics({"x": float(step)}, step=step)
    run.log_event("after the aggregator died")
    started = time.monotonic()
    print(run.close(), round(time.monotonic() - started, 2))
    """
)


def slurm(rank: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env.update(SLURM_JOB_ID="5151", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
               SLURM_LOCALID=str(rank), SIMVUE_CLOSE_TIMEOUT_S=str(CLOSE_TIMEOUT_S), SIMVUE_RUN_HEARTBEAT_TIMEOUT_S="2",
               SIMVUE_AGGREGATE_IN="thread")
    return env


def wait_for(path: Path, job: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert job.poll() is None, job.stderr.read() if job.stderr else ""
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.02)


def test_a_rank_whose_aggregator_died_spills_everything_and_the_import_adds_it_once(store_dir, tmp_path, capsys):
    name = "aggregator-killed"
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0, name, str(tmp_path)], env=slurm(0),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = None
    try:
        wait_for(tmp_path / "ready", rank0)
        rank1 = subprocess.Popen([sys.executable, "-c", RANK1, name, str(tmp_path)], env=slurm(1),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(tmp_path / "flushed", rank1)
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(10)
        (tmp_path / "killed").write_text("")
        out, err = rank1.communicate(timeout=60)
    finally:
        for job in (rank0, rank1):
            if job is not None and job.poll() is None:
                job.kill()
    assert rank1.returncode == 0, err
    closed, took = out.split()
    assert closed == "False"  # not everything was delivered, and close() says so
    assert float(took) < CLOSE_TIMEOUT_S + 5
    spilled = list((store_dir / "spill").glob("*-rank1-*.msgpack"))
    assert len(spilled) == 1
    assert f"written to {spilled[0]}" in err and "simvue spill import" in err, err
    assert oct(spilled[0].stat().st_mode & 0o777) == "0o600"
    assert oct(spilled[0].parent.stat().st_mode & 0o777) == "0o700"

    before = read_run(store_dir, name)
    assert [p[0] for p in before["metrics"]["rank1/x"]] == list(range(100))
    assert simvue_main(["--store", str(store_dir), "spill", "import"]) == 0
    assert "101 records of rank1 added" in capsys.readouterr().out  # 100 points and the event
    after = read_run(store_dir, name)
    assert [p[0] for p in after["metrics"]["rank1/x"]] == list(range(200))
    assert [p[0] for p in after["metrics"]["rank0/x"]] == list(range(10))
    assert [e["message"] for e in after["events"]].count("[rank1] after the aggregator died") == 1
    assert simvue_main(["--store", str(store_dir), "spill", "import"]) == 0  # again: nothing twice
    assert "0 records of rank1 added" in capsys.readouterr().out
    assert read_run(store_dir, name)["metrics"]["rank1/x"] == after["metrics"]["rank1/x"]


def test_an_import_skips_what_the_aggregator_had_committed(store_dir, tmp_path):
    """Messages the aggregator processed but never acknowledged are in the spill file too:
    the run's ``last_seq`` for that sender says which, and they are not added twice."""
    store = Store(store_dir)
    run_id = store.create_run(name="partly", folder="/", description=None, metadata={}, tags=[], status="running",
                              system={}, heartbeat_timeout_s=30.0)
    sender = "ab" * 16
    from simvue.store import StoreBatch

    store.write(run_id, StoreBatch(metadata={"simvue": {"processes": {"rank1": {"sender": sender, "last_seq": 6}}}}))
    header = {"run_id": run_id, "run_name": "partly", "sender": sender, "label": "rank1",
              "hello": {"role": "rank", "rank": 1, "pid": 1, "host": "h"}}
    file = SpillFile(store_dir / "spill" / "partly-rank1-1.msgpack", LossCounter(), lambda: header)
    payloads = [
        protocol.encode(b"k" * 32, MessageKind.DATA, seq, [[RecordKind.METRICS, seq, 0.0, 0.0, {"x": float(seq)}]])[1]
        for seq in range(5, 9)
    ]
    file.write_payloads(payloads, 4)
    file.write_records([[RecordKind.METRICS, 9, 0.0, 0.0, {"x": 9.0}]])  # never sent
    result = import_file(store, file.path)
    assert (result.messages, result.records, result.already) == (3, 3, 2)
    assert [p[0] for p in read_run(store_dir, "partly")["metrics"]["rank1/x"]] == [7, 8, 9]
    assert import_file(store, file.path).messages == 0
    store.close()
    entries = list(spill.read(file.path))
    assert entries[0] == (MessageKind.HELLO, 0, header)


def _spill_file(store_dir, name):
    store = Store(store_dir)
    run_id = store.create_run(name=name, folder="/", description=None, metadata={}, tags=[], status="running",
                              system={}, heartbeat_timeout_s=30.0)
    store.close()
    header = {"run_id": run_id, "run_name": name, "sender": "cd" * 16, "label": "rank1",
              "hello": {"role": "rank", "rank": 1, "pid": 1, "host": "h"}}
    return store_dir / "spill" / f"{name}-rank1-1.msgpack", header


def test_a_spill_file_from_before_metric_columns_still_imports(store_dir, capsys):
    """A spill file written by the previous protocol version (1: every metric point in a
    METRICS record) imports as it did, beside one holding METRIC_COLUMNS records as a sender
    spills them now; the CLI counts every point."""
    import msgpack

    from simvue.transport.columns import to_columns

    path, header = _spill_file(store_dir, "old-spill")
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [(1, MessageKind.HELLO, 0, header)] + [
        (1, MessageKind.DATA, seq, [[RecordKind.METRICS, seq, 0.0, 1e9, {"x": float(seq), "y": 1.0}],
                                    [RecordKind.EVENT, 1e9, f"old {seq}", "info"]])
        for seq in range(1, 4)
    ]
    path.write_bytes(b"".join(msgpack.packb(entry) for entry in entries))
    new_path, new_header = _spill_file(store_dir, "new-spill")
    file = SpillFile(new_path, LossCounter(), lambda: new_header)
    records = [(RecordKind.METRICS, step, 0.0, 1e9, {"x": float(step), "y": 2.0}) for step in range(50)]
    body = to_columns(records)
    assert [record[0] for record in body] == [RecordKind.METRIC_COLUMNS]
    file.write_payloads([protocol.encode(b"k" * 32, MessageKind.DATA, 2, body)[1]], 50)
    assert simvue_main(["--store", str(store_dir), "spill", "list"]) == 0
    listed = capsys.readouterr().out
    assert "old-spill-rank1-1.msgpack: run 'old-spill', rank1, 6 records" in listed
    assert "new-spill-rank1-1.msgpack: run 'new-spill', rank1, 50 records" in listed
    assert simvue_main(["--store", str(store_dir), "spill", "import", "--remove"]) == 0
    out = capsys.readouterr().out
    assert "6 records of rank1 added to run 'old-spill'" in out and "50 records of rank1 added to run 'new-spill'" in out
    old = read_run(store_dir, "old-spill")
    assert [(p[0], p[2]) for p in old["metrics"]["rank1/x"]] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [e["message"] for e in old["events"]] == ["[rank1] old 1", "[rank1] old 2", "[rank1] old 3"]
    new = read_run(store_dir, "new-spill")
    assert [p[0] for p in new["metrics"]["rank1/x"]] == list(range(50))
    assert [p[2] for p in new["metrics"]["rank1/y"]] == [2.0] * 50
    assert not path.exists() and not new_path.exists()


def test_spill_entries_of_a_later_protocol_version_are_counted_and_their_file_kept(store_dir, capsys):
    import msgpack

    path, header = _spill_file(store_dir, "later-spill")
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [
        (protocol.PROTOCOL_VERSION, MessageKind.HELLO, 0, header),
        (protocol.PROTOCOL_VERSION, MessageKind.DATA, 1, [[RecordKind.METRICS, 0, 0.0, 1e9, {"x": 1.0}]]),
        (protocol.PROTOCOL_VERSION + 1, MessageKind.DATA, 2, [[99, "something new"]]),
    ]
    path.write_bytes(b"".join(msgpack.packb(entry) for entry in entries))
    assert simvue_main(["--store", str(store_dir), "spill", "import", "--remove"]) == 1
    captured = capsys.readouterr()
    assert "1 records of rank1 added" in captured.out
    assert "1 entries were written by a later version of simvue" in captured.err
    assert path.exists()  # kept for the simvue that can read it
    assert [p[2] for p in read_run(store_dir, "later-spill")["metrics"]["rank1/x"]] == [1.0]
