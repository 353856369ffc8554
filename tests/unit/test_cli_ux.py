"""The ``simvue`` command as a person meets it: ``--version``, options where they are typed,
help with defaults, exports that fail without damage, CSV tables, events in time order, runs
that share a name, the summary that opens ``runs show`` and progress on a terminal.

Every run here is written by a real ``Run`` into a real store, and the command runs as its
own process (or through ``simvue.cli.main``); progress is read from a real pseudo-terminal."""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import sys
import time


import simvue
from simvue import Run
from simvue._version import __version__
from simvue.cli import _parser, main

from conftest import needs_server


def simvue_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simvue.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def on_terminal(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> tuple[int, str]:
    """Run the command with its standard error on a pseudo-terminal (standard output to
    /dev/null); its exit status and everything it wrote to the terminal."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "simvue.cli", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=slave, env={**os.environ, **(env or {})},
        )
        os.close(slave)
        slave = -1
        seen = bytearray()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side is closed (the process is gone)
                    break
                if not data:
                    break
                seen += data
            elif process.poll() is not None:
                break
        else:
            process.kill()
        return process.wait(30), seen.decode("utf-8", "replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def make_run(name: str, folder: str = "/ux", points: int = 5, events: int = 1) -> str:
    with Run() as run:
        run.init(name=name, folder=folder, tags=["t1"], metadata={"k": "v", "n": 3})
        for step in range(points):
            run.log_metrics({"loss": step / 10, "acc": 1 - step / 10})
        for index in range(events):
            run.log_event(f"event {index}")
        return run.id


def summary_lines(stdout: str) -> list[str]:
    """The lines of ``runs show`` before its details (the one-screen summary)."""
    lines = stdout.splitlines()
    return lines[: lines.index("metadata:")]


# -- 1. --version -------------------------------------------------------------------------------


def test_version_prints_the_package_version():
    result = simvue_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"simvue {__version__}" == f"simvue {simvue.__version__}"


# -- 2. global options after the command ---------------------------------------------------------


def test_store_and_offline_are_accepted_after_every_command(store_dir, tmp_path, monkeypatch, capsys):
    make_run("anywhere")
    store = str(store_dir)
    monkeypatch.setenv("SIMVUE_STORE", str(tmp_path / "no-store-here"))  # only --store finds the run
    for command in (["runs", "list"], ["runs", "show", "anywhere"], ["export", "anywhere"],
                    ["artifacts", "anywhere"], ["spill", "list"], ["spill", "import"]):
        for flags in (["--store", store], ["--store", store, "--offline"], ["--offline", "--store", store]):
            assert main([*command, *flags]) == 0, (command, flags, capsys.readouterr().err)
            after = capsys.readouterr()
            assert main([*flags, *command]) == 0, (command, flags, capsys.readouterr().err)
            before = capsys.readouterr()
            assert after.out == before.out and after.err == before.err == "", (command, flags)
    # Between a command and its subcommand too; given twice, the one after the command wins.
    assert main(["runs", "--store", store, "list"]) == 0 and "anywhere" in capsys.readouterr().out
    assert main(["--store", str(tmp_path / "x"), "runs", "list", "--store", store]) == 0
    assert "anywhere" in capsys.readouterr().out
    # Without --store, the environment's store is used: there is none there.
    assert main(["runs", "list"]) == 1 and "no store at" in capsys.readouterr().err
    # As its own process; push parses them too (and then says, calmly, that no server is configured).
    elsewhere = {"SIMVUE_STORE": str(tmp_path / "no-store-here")}
    listed = simvue_cli("runs", "list", "--store", store, "--offline", env=elsewhere)
    assert listed.returncode == 0 and "anywhere" in listed.stdout
    push = simvue_cli("push", "--store", store, "--offline", "anywhere", env=elsewhere)
    assert push.returncode == 1 and push.stderr.startswith("simvue: no server configured"), push.stderr


# -- 3. a failed export leaves the output file alone ---------------------------------------------


def test_a_failed_export_creates_and_truncates_nothing(store_dir, tmp_path):
    make_run("real")
    out = tmp_path / "out"
    out.mkdir()
    missing = simvue_cli("export", "nope", "--format", "csv", "-o", str(out / "x.csv"))
    assert missing.returncode == 1 and "no run named 'nope'" in missing.stderr
    assert list(out.iterdir()) == []  # neither x.csv nor a temporary file
    precious = out / "precious.json"
    precious.write_text("keep me")
    assert simvue_cli("export", "nope", "-o", str(precious)).returncode == 1
    assert precious.read_text() == "keep me" and list(out.iterdir()) == [precious]
    # A successful export replaces it, with the mode the file had.
    precious.chmod(0o640)
    assert simvue_cli("export", "real", "-o", str(precious)).returncode == 0
    assert json.loads(precious.read_text())["name"] == "real"
    assert stat.S_IMODE(precious.stat().st_mode) == 0o640 and list(out.iterdir()) == [precious]
    # A new file gets the mode the umask gives any new file, as a shell redirection would.
    fresh = out / "fresh.csv"
    assert simvue_cli("export", "real", "--format", "csv", "-o", str(fresh)).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    assert len(list(csv.DictReader(fresh.open()))) == 10


def test_unwritable_outputs_are_one_calm_line(store_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("some data\n")
    with Run() as run:
        run.init(name="real")
        run.log_metrics({"x": 1.0})
        run.save_file(blocker, "input")
    for target, why in ((tmp_path / "no" / "such" / "dir" / "x.csv", "No such file or directory"),
                        (blocker / "x.csv", "Not a directory"), (tmp_path, "it is a directory")):
        for command in (["export", "real", "--format", "csv"], ["artifacts", "real", "--get", "a-file"]):
            result = simvue_cli(*command, "-o", str(target))
            assert result.returncode == 1, (command, target, result.stdout)
            assert result.stderr == f"simvue: cannot write {target}: {why}\n", result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # A device is written to directly (there is nothing to rename over it); a full one is one line too.
    assert simvue_cli("export", "real", "-o", os.devnull).returncode == 0
    if os.path.exists("/dev/full"):
        full = simvue_cli("export", "real", "-o", "/dev/full")
        assert full.returncode == 1 and full.stderr == "simvue: cannot write /dev/full: No space left on device\n"
    # Through a link, the file it names is replaced and the link is kept.
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "linked.csv")
    assert simvue_cli("export", "real", "--format", "csv", "-o", str(link)).returncode == 0
    assert link.is_symlink() and (tmp_path / "linked.csv").read_text().startswith("metric,step")


def test_artifact_download_replaces_the_file_only_when_it_succeeds(store_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("input data\n")
    run = Run()
    run.init(name="with-artifact")
    run.save_file(source, "input")
    run.close()
    target = tmp_path / "out.txt"
    target.write_text("old")
    missing = simvue_cli("artifacts", "with-artifact", "--get", "nope", "-o", str(target))
    assert missing.returncode == 1 and target.read_text() == "old"
    assert simvue_cli("artifacts", "with-artifact", "--get", "in.txt", "-o", str(target)).returncode == 0
    assert target.read_text() == "input data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


# -- 4. help with defaults -----------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, path: str = "simvue") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_option_has_help_and_its_default():
    checked = 0
    for path, parser in _parsers(_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert text and action.help != argparse.SUPPRESS, f"{path} {action.option_strings[0]} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in text, f"{path} {action.option_strings[0]}: {text!r} does not give its default"
            checked += 1
    assert checked > 20
    shown = " ".join(simvue_cli("export", "--help").stdout.split())
    assert "--format {json,csv} output format (default: json)" in shown
    assert "--store DIR" in shown and "$SIMVUE_STORE" in shown


# -- 5. CSV tables -------------------------------------------------------------------------------


def test_csv_export_of_events_and_metadata(store_dir):
    with Run() as run:
        run.init(name="tables", metadata={"k": "v", "nested": {"a": 1, "b": [1, 2]}, "flag": True})
        run.log_metrics({"x": 1.0})
        run.log_event("later, with a comma, and\na second line", timestamp="2024-01-01T00:00:02")
        run.log_event("earlier", timestamp="2024-01-01T00:00:01", log_level="warning")
    metrics = list(csv.reader(io.StringIO(simvue_cli("export", "tables", "--format", "csv").stdout)))
    assert metrics[0] == ["metric", "step", "time", "timestamp", "value"] and len(metrics) == 2
    same = simvue_cli("export", "tables", "--format", "csv", "--what", "metrics").stdout
    assert list(csv.reader(io.StringIO(same))) == metrics

    events = list(csv.reader(io.StringIO(simvue_cli("export", "tables", "--format", "csv", "--what", "events").stdout)))
    assert events == [
        ["timestamp", "level", "message"],
        ["2024-01-01T00:00:01.000000", "warning", "earlier"],
        ["2024-01-01T00:00:02.000000", "info", "later, with a comma, and\na second line"],
    ]

    result = simvue_cli("export", "tables", "--format", "csv", "--what", "metadata")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["key", "value"]
    values = dict(rows[1:])
    assert values["k"] == "v" and values["nested.a"] == "1" and values["nested.b"] == "[1, 2]"
    assert values["flag"] == "true"
    assert values["simvue.processes.main.role"] == "process"

    wrong = simvue_cli("export", "tables", "--format", "json", "--what", "events")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr == "simvue: --what chooses a CSV table; the JSON export holds the whole run\n"


# -- 6. events in time order ---------------------------------------------------------------------


def test_runs_show_lists_events_in_time_order(store_dir):
    with Run() as run:
        run.init(name="out-of-order")
        run.log_event("third", timestamp="2024-01-01T00:00:03")
        run.log_event("first", timestamp="2024-01-01T00:00:01")
        run.log_event("second", timestamp="2024-01-01T00:00:02")
    shown = simvue_cli("runs", "show", "out-of-order").stdout.splitlines()
    heading = next(index for index, line in enumerate(shown) if line.startswith("events ("))
    assert [line.split()[-1] for line in shown[heading + 1:]] == ["first", "second", "third"]
    assert shown[heading] == "events (3, in time order):"


# -- 7. runs that share a name -------------------------------------------------------------------


def test_a_shared_name_says_which_run_it_picked_and_how_to_pick_another(store_dir, tmp_path):
    name = "répétition-运行"
    older = make_run(name, points=1)
    time.sleep(0.01)
    newer = make_run(name, points=2)
    for command in (["runs", "show", name], ["export", name], ["artifacts", name]):
        result = simvue_cli(*command)
        assert result.returncode == 0, result.stderr
        assert result.stderr == (
            f"simvue: 2 runs are named {name!r}; this is the newest (id {newer}); give an id instead of the name"
            f" to pick another: {older}\n"
        )
    shown = simvue_cli("runs", "show", name).stdout
    assert f"id:          {newer}" in shown
    by_id = simvue_cli("runs", "show", older)
    assert by_id.stderr == "" and f"id:          {older}" in by_id.stdout
    assert [point[0] for point in json.loads(simvue_cli("export", older).stdout)["metrics"]["loss"]] == [0]
    unique = make_run("unique")
    assert unique and simvue_cli("runs", "show", "unique").stderr == ""


def test_hostile_names_are_escaped_in_one_line(store_dir):
    with Run() as run:
        run.init(name="plain")
        run.log_event("\x1b[2Jcleared the screen\x07 and rang")
    shown = simvue_cli("runs", "show", "plain").stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b[2Jcleared the screen\\x07 and rang" in shown
    for name in ("bad\x1b[2Jname", "two\nlines", "nul\x7fdel", "ünïcødé-运行"):
        result = simvue_cli("runs", "show", name)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr and "\x7f" not in result.stderr
        assert result.stderr.startswith(f"simvue: no run named {name!r}")


# -- 8. the summary and progress -----------------------------------------------------------------


def test_runs_show_opens_with_a_one_screen_summary(store_dir):
    make_run("summed", points=5, events=3)
    result = simvue_cli("runs", "show", "summed")
    assert result.returncode == 0, result.stderr
    summary = summary_lines(result.stdout)
    assert len(summary) <= 20
    assert "status:      completed" in summary
    assert f"processes:   1 process on 1 node ({socket.gethostname()})" in summary
    assert "data:        10 points in 2 series, 3 events, 0 alerts, 0 artifacts" in summary
    assert "losses:      none" in summary
    duration = next(line for line in summary if line.startswith("duration:"))
    assert duration.endswith(" s") and 0 <= float(duration.split()[1]) < 60


def test_the_summary_of_a_run_still_going(store_dir):
    run = Run()
    run.init(name="going")
    run.log_metrics({"x": 1.0})
    assert run.flush(10)
    try:
        summary = summary_lines(simvue_cli("runs", "show", "going").stdout)
    finally:
        run.close()
    assert "status:      running" in summary
    assert f"processes:   1 process on 1 node ({socket.gethostname()}); 1 live" in summary
    assert next(line for line in summary if line.startswith("duration:")).endswith(" s so far")
    summary = summary_lines(simvue_cli("runs", "show", "going").stdout)
    assert "status:      completed" in summary and "processes:   1 process on 1 node" in " ".join(summary)


def _log_then_sigkill(run: Run) -> None:
    for i in range(20):
        run.log_metrics({"v": float(i)}, step=i)
    if not run.flush(10):
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_summary_counts_workers_and_names_what_was_lost(store_dir):
    run = Run()
    run.init(name="with-a-lost-worker")
    victim = multiprocessing.get_context("fork").Process(target=_log_then_sigkill, args=(run,))
    victim.start()
    victim.join(60)
    assert victim.exitcode == -signal.SIGKILL
    run.close()
    summary = summary_lines(simvue_cli("runs", "show", "with-a-lost-worker").stdout)
    assert "status:      failed" in summary
    assert f"processes:   1 process, 1 worker on 1 node ({socket.gethostname()}); 1 lost" in summary
    losses = next(line for line in summary if line.startswith("losses:"))
    assert "lost: worker0 (its process ended without closing its part of the run)" in losses


def test_export_shows_progress_on_a_terminal_only(store_dir, tmp_path):
    with Run() as run:
        run.init(name="big")
        for step in range(3000):
            run.log_metrics({"a": float(step), "b": float(step), "c": float(step)})
    target = tmp_path / "big.csv"
    status, terminal = on_terminal("export", "big", "--format", "csv", "-o", str(target))
    assert status == 0, terminal
    assert "big [" in terminal and "9,000/9,000 points" in terminal and terminal.endswith("\n")
    assert len(target.read_text().splitlines()) == 9001
    status, terminal = on_terminal("export", "big", "-o", str(tmp_path / "big.json"))
    assert status == 0 and "9,000/9,000 points" in terminal
    # Not on a terminal: nothing but the data.
    plain = simvue_cli("export", "big", "--format", "csv", "-o", str(target))
    assert plain.returncode == 0 and plain.stderr == ""


@needs_server
def test_push_shows_progress_on_a_terminal(store_dir, tmp_path):
    from simvue.server.local import ServerProcess

    with Run() as run:
        run.init(name="to-push")
        for step in range(2000):
            run.log_metrics({"x": float(step)})
    with ServerProcess(tmp_path / "server") as server:
        status, terminal = on_terminal("push", "to-push", env=server.env)
        assert status == 0, terminal
        assert "to-push [" in terminal and "/2,000 points" in terminal and terminal.endswith("\n")
        assert server.metrics(server.run_named("to-push")["id"])["x"]["steps"] == list(range(2000))


@needs_server
def test_push_shows_the_progress_of_artifact_uploads(store_dir, tmp_path):
    from simvue.server.local import ServerProcess

    big = tmp_path / "field.bin"
    big.write_bytes(os.urandom(3 << 20))
    with Run() as run:
        run.init(name="with-files")
        run.log_metrics({"x": 1.0})
        run.save_file(str(big), "output")
    with ServerProcess(tmp_path / "server") as server:
        status, terminal = on_terminal("push", "with-files", env=server.env)
        assert status == 0, terminal
        lines = [line.rsplit("\r", 1)[-1] for line in terminal.splitlines()]
        assert lines[-1].startswith("with-files files [##############################]"), terminal
        assert lines[-1].endswith(f"{3 << 20:,}/{3 << 20:,} bytes"), terminal
        assert "with-files [" in terminal and "1/1 points" in terminal
        names = [a["name"] for a in server.get(f"/runs/{server.run_named('with-files')['id']}/artifacts")]
        assert names == ["field.bin"]


def test_push_progress_ends_at_the_total():
    from simvue.cli.progress import Progress

    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as terminal:
            progress = Progress("run", 100, terminal)
            progress.add(60)
            progress.add(40)  # within the redraw interval: not drawn now
            progress.done()
        drawn = os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert drawn.rstrip().endswith("100/100 points"), drawn

