"""The ``simvue`` command on a real store."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time

from simvue import Run

from conftest import run_script


def simvue_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvue.cli", *args], capture_output=True, text=True, timeout=60)


def make_run(name: str, folder: str = "/cli") -> None:
    with Run() as run:
        run.init(name=name, folder=folder, tags=["t1"], metadata={"k": "v"})
        for step in range(5):
            run.log_metrics({"loss": step / 10, "acc": 1 - step / 10})
        run.log_event("something happened")


def test_runs_list_show_and_export(store_dir):
    make_run("cli-one")
    make_run("cli-two", folder="/other")
    listing = simvue_cli("runs", "list")
    assert listing.returncode == 0
    assert "cli-one" in listing.stdout and "cli-two" in listing.stdout and "completed" in listing.stdout
    filtered = json.loads(simvue_cli("runs", "list", "--folder", "/other", "--json").stdout)
    assert [r["name"] for r in filtered] == ["cli-two"]

    show = simvue_cli("runs", "show", "cli-one")
    assert show.returncode == 0
    assert "status:      completed" in show.stdout
    assert "loss: 5 points" in show.stdout and "something happened" in show.stdout

    exported = json.loads(simvue_cli("export", "cli-one", "--format", "json").stdout)
    assert {"name", "status", "metadata", "tags", "folder", "events", "metrics"} <= exported.keys()
    assert exported["metrics"]["loss"][4][0] == 4 and exported["metrics"]["loss"][4][2] == 0.4
    assert exported["events"][0]["message"] == "something happened"
    assert exported["tags"] == ["t1"] and exported["metadata"]["k"] == "v"

    rows = list(csv.DictReader(io.StringIO(simvue_cli("export", "cli-one", "--format", "csv").stdout)))
    assert len(rows) == 10
    assert {r["metric"] for r in rows} == {"loss", "acc"}
    assert float(next(r for r in rows if r["metric"] == "acc" and r["step"] == "2")["value"]) == 0.8


def test_export_to_a_file_and_by_id(store_dir, tmp_path):
    make_run("cli-file")
    run_id = json.loads(simvue_cli("runs", "list", "--json").stdout)[0]["id"]
    target = tmp_path / "out.json"
    assert simvue_cli("export", run_id, "--output", str(target)).returncode == 0
    assert json.loads(target.read_text())["name"] == "cli-file"


def test_unknown_run_and_missing_store_are_clear_errors(store_dir, tmp_path):
    make_run("exists")
    missing = simvue_cli("runs", "show", "does-not-exist")
    assert missing.returncode == 1 and "no run named 'does-not-exist'" in missing.stderr
    nostore = simvue_cli("--store", str(tmp_path / "empty"), "runs", "list")
    assert nostore.returncode == 1 and "no store" in nostore.stderr


def test_a_killed_process_leaves_its_committed_data_and_reads_as_lost(store_dir):
    code = """
import os, signal
from simvue import Run
run = Run()
run.init(name="killed")
for step in range(100):
    run.log_metrics({"x": float(step)})
assert run.flush(10)
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = run_script(code, env={"SIMVUE_RUN_HEARTBEAT_TIMEOUT_S": "1"})
    assert result.returncode == -9
    time.sleep(1.5)
    exported = json.loads(simvue_cli("export", "killed").stdout)
    assert exported["status"] == "lost"
    assert [p[0] for p in exported["metrics"]["x"]] == list(range(100))
    assert "lost" in simvue_cli("runs", "list").stdout
