"""``Run.add_process`` and the other upstream 2.x calls of ``Run`` (set_pid, set_tags,
set_metric_units, add_alerts, the read-only properties), in one process with real children
and the real store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import psutil
import pytest

from simvue import Run, SimvueRunError, SimvueTypeError, SimvueValueError, SimvueWarning
from simvue.processes import CALLBACK_OUTPUT_MAX_BYTES, KILL_GRACE_S
from simvue.store import Store

from conftest import read_run

PY = sys.executable


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Output files land in the working directory: one per test."""
    monkeypatch.chdir(tmp_path)


def _artifacts(store_dir, name: str) -> dict[str, dict]:
    store = Store(store_dir)
    try:
        run_id = store.run(name)["id"]
        return {a["name"]: {**a, "bytes": store.artifact_bytes(run_id, a["name"])} for a in store.artifacts(run_id)}
    finally:
        store.close()


def _alerts(store_dir, name: str) -> dict[str, dict]:
    store = Store(store_dir)
    try:
        return {a["name"]: a for a in store.alerts(store.run(name)["id"])}
    finally:
        store.close()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- running processes ------------------------------------------------------------------


def test_a_process_output_is_saved_and_its_command_recorded(store_dir, tmp_path):
    with Run() as run:
        run.init(name="proc-basic")
        assert run.add_process("hello", "echo", "hello world") is None
        run.add_process("py", executable=PY, c="import sys; print('out'); print('err', file=sys.stderr)")
    exported = read_run(store_dir, "proc-basic")
    assert exported["status"] == "completed"
    assert exported["metadata"]["hello_command"] == "echo 'hello world'"
    assert exported["metadata"]["py_command"].startswith(f"{PY} -c ")
    saved = _artifacts(store_dir, "proc-basic")
    assert saved["proc-basic_hello.out"]["bytes"] == b"hello world\n"
    assert saved["proc-basic_hello.out"]["category"] == "output"
    assert "proc-basic_hello.err" not in saved  # empty: not saved, as upstream
    assert saved["proc-basic_py.err"]["bytes"] == b"err\n"
    assert (tmp_path / "proc-basic_hello.out").read_text() == "hello world\n"  # the files are kept
    messages = [e["message"] for e in exported["events"]]
    assert "process 'hello' ended with status 0" in messages
    assert _alerts(store_dir, "proc-basic")["hello_exit_status"]["status"] == "ok"


def test_the_command_is_assembled_as_upstream_and_script_and_input_are_saved(store_dir, tmp_path):
    script = tmp_path / "demo.py"
    script.write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('input_file')\n"
        "p.add_argument('--output-file')\np.add_argument('-v', action='store_true')\n"
        "p.add_argument('--dry-run', action='store_true')\na = p.parse_args()\n"
        "open(a.output_file, 'w').write(open(a.input_file).read() + f'v={a.v} dry={a.dry_run}')\n"
    )
    source = tmp_path / "input.txt"
    source.write_text("Flynn has entered the grid.\n")
    result = tmp_path / "output.txt"
    with Run() as run:
        run.init(name="proc-assembly")
        run.add_process("advanced", executable=PY, script=script, input_file=str(source), output_file=result,
                        v=True, dry_run=False, __private="skipped")
        assert run.executor.get_command("advanced") == f"{PY} {script} {source} --output-file {result} -v"
    assert result.read_text() == "Flynn has entered the grid.\nv=True dry=False"
    saved = _artifacts(store_dir, "proc-assembly")
    assert saved["demo.py"]["category"] == "code"
    assert saved["input.txt"]["category"] == "input"
    assert saved["input.txt"]["bytes"] == source.read_bytes()


def test_a_failing_process_marks_the_run_failed_without_ending_the_program(store_dir):
    run = Run()
    run.init(name="proc-fails")
    run.add_process("bad", PY, "-c", "import sys; print('some output'); sys.stderr.write('boom\\n'); sys.exit(3)")
    with pytest.warns(SimvueWarning, match=r"(?s)non-zero status 3.*bad:\nboom"):
        assert run.close() is True  # upstream calls sys.exit(3) here
    assert run.executor.exit_status == 3 and not run.executor.success
    assert run.executor.get_error_summary() == {"bad": "boom"}
    exported = read_run(store_dir, "proc-fails")
    assert exported["status"] == "failed"
    errors = [e["message"] for e in exported["events"] if e["level"] == "error"]
    assert errors[0] == "process 'bad' ended with status 3:\nboom"
    assert _alerts(store_dir, "proc-fails")["bad_exit_status"]["status"] == "critical"


def test_completion_callback_and_trigger_get_the_status_and_undecodable_output():
    got: dict = {}
    done = threading.Event()

    def callback(*, status_code, std_out, std_err):
        got.update(status_code=status_code, std_out=std_out, std_err=std_err)

    with Run() as run:
        run.init(name="proc-callback")
        run.add_process(
            "bytes", PY, "-c", "import sys; sys.stdout.buffer.write(b'caf\\xe9 \\xff\\n'); sys.exit(2)",
            completion_callback=callback, completion_trigger=done,
        )
        assert done.wait(30)
        with pytest.warns(SimvueWarning):
            pass_through = run.close()
    assert pass_through is True
    assert got == {"status_code": 2, "std_out": "caf\ufffd \ufffd\n", "std_err": ""}


def test_a_callback_that_raises_gives_one_warning_and_the_run_completes(store_dir):
    def callback(**_):
        raise ZeroDivisionError("in the user's callback")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Run() as run:
            run.init(name="proc-callback-raises")
            run.add_process("ok", "true", completion_callback=callback)
    assert [str(w.message) for w in caught if issubclass(w.category, SimvueWarning)] == [
        "simvue: the completion callback of process 'ok' raised ZeroDivisionError(\"in the user's callback\")"
    ]
    assert read_run(store_dir, "proc-callback-raises")["status"] == "completed"


def test_close_waits_for_a_running_process_and_saves_what_it_wrote_last(store_dir):
    with Run() as run:
        run.init(name="proc-waits")
        run.add_process("slow", PY, "-c", "import time; time.sleep(1.5); print('finished')")
        started = time.monotonic()
    assert time.monotonic() - started >= 1.0
    assert _artifacts(store_dir, "proc-waits")["proc-waits_slow.out"]["bytes"] == b"finished\n"


def test_kill_process_stops_a_child_that_ignores_sigterm_and_its_descendants(store_dir):
    stubborn = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with Run() as run:
        run.init(name="proc-kill")
        run.add_process("stubborn", PY, "-c", stubborn)
        run.add_process("other", "sleep", "60")
        deadline = time.monotonic() + 20
        while not run.executor.std_out("stubborn") and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(run.executor.std_out("stubborn"))
        pid = run.executor.children["stubborn"].popen.pid
        assert {pid, grandchild} <= {p.pid for p in run.processes}
        started = time.monotonic()
        run.kill_process("stubborn")
        assert time.monotonic() - started < 2 * KILL_GRACE_S + 2
        assert _gone(pid) and _gone(grandchild)
        assert run.executor.children["stubborn"].popen.returncode == -signal.SIGKILL
        assert run.executor.children["other"].popen.poll() is None  # only that one
        run.kill_all_processes()
        assert run.executor.children["other"].popen.returncode == -signal.SIGTERM
        assert run.executor.success  # stopped by the run, not failed
    exported = read_run(store_dir, "proc-kill")
    assert exported["status"] == "completed"
    messages = [e["message"] for e in exported["events"]]
    assert "process 'stubborn' was stopped with status -9" in messages
    assert "process 'other' was stopped with status -15" in messages


def test_an_exception_in_the_with_block_stops_the_children_and_keeps_their_output(store_dir):
    with pytest.raises(RuntimeError):
        with Run() as run:
            run.init(name="proc-exception")
            run.add_process("long", PY, "-c", "import time; print('started', flush=True); time.sleep(60)")
            deadline = time.monotonic() + 20
            while not run.executor.std_out("long") and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = run.executor.children["long"].popen.pid
            started = time.monotonic()
            raise RuntimeError("the user's program failed")
    assert time.monotonic() - started < KILL_GRACE_S + 5
    assert _gone(pid)
    assert read_run(store_dir, "proc-exception")["status"] == "failed"
    assert _artifacts(store_dir, "proc-exception")["proc-exception_long.out"]["bytes"] == b"started\n"


def test_huge_output_is_saved_whole_and_the_callback_gets_its_end(store_dir):
    size = CALLBACK_OUTPUT_MAX_BYTES + (4 << 20)
    got: dict = {}
    with Run() as run:
        run.init(name="proc-huge")
        run.add_process(
            "huge", PY, "-c", f"import sys; sys.stdout.buffer.write(b'x' * {size - 3} + b'END')",
            completion_callback=lambda **kw: got.update(kw),
        )
    assert len(got["std_out"]) == CALLBACK_OUTPUT_MAX_BYTES and got["std_out"].endswith("END")
    assert _artifacts(store_dir, "proc-huge")["proc-huge_huge.out"]["size"] == size


def test_env_replaces_the_environment_and_cwd_is_the_childs_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    with Run() as run:
        run.init(name="proc-env")
        run.add_process("env", PY, "-c", "import os; print('PATH' in os.environ, os.environ['ONLY_THIS'], os.getcwd())",
                        env={"ONLY_THIS": "1"}, cwd=tmp_path / "sub")
    assert (tmp_path / "proc-env_env.out").read_text() == f"False 1 {tmp_path / 'sub'}\n"


def test_with_no_command_the_users_shell_runs_the_options(monkeypatch, tmp_path):
    monkeypatch.setenv("SHELL", "/bin/sh")
    trigger = threading.Event()
    with Run() as run:
        run.init(name="proc-shell")
        run.add_process("sh", c="echo from-the-shell", completion_trigger=trigger)
        assert run.executor.get_command("sh") == "/bin/sh -c 'echo from-the-shell'"
    assert trigger.is_set()
    assert (tmp_path / "proc-shell_sh.out").read_text() == "from-the-shell\n"


def test_a_disabled_run_still_runs_the_process(tmp_path):
    with Run(mode="disabled") as run:
        run.init(name="proc-disabled")
        run.add_process("work", "echo", "done")
    assert (tmp_path / "simvue_work.out").read_text() == "done\n"
    assert run.mode == "disabled" and run.status is None


# -- hostile input ------------------------------------------------------------------------


BAD_CALLS = [
    ("no such executable", dict(args=("job", "no-such-program-anywhere")), "does not exist"),
    ("no such executable=", dict(args=("job",), kwargs={"executable": "/no/such/bin"}), "does not exist"),
    ("identifier None", dict(args=(None, "true")), "identifier"),
    ("identifier empty", dict(args=("  ", "true")), "identifier"),
    ("identifier with a slash", dict(args=("a/b", "true")), "without '/'"),
    ("identifier not a str", dict(args=(5, "true")), "identifier"),
    ("env value not a str", dict(args=("job", "true"), kwargs={"env": {"N": 4}}), r"env\['N'\] is a int"),
    ("env not a dict", dict(args=("job", "true"), kwargs={"env": ["A=1"]}), "env must be a dict"),
    ("env name with =", dict(args=("job", "true"), kwargs={"env": {"A=B": "1"}}), "not a valid variable"),
    ("cwd missing", dict(args=("job", "true"), kwargs={"cwd": "/no/such/dir"}), "not a directory"),
    ("script missing", dict(args=("job",), kwargs={"executable": "true", "script": "missing.py"}), "not a file"),
    ("callback not callable", dict(args=("job", "true"), kwargs={"completion_callback": 3}), "callable"),
    ("trigger without set", dict(args=("job", "true"), kwargs={"completion_trigger": object()}), "Event"),
    ("argument of no known type", dict(args=("job", "echo", object())), "not a str, path or number"),
]


@pytest.mark.parametrize("call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_warns_once_and_starts_nothing(call):
    _, how, message = call
    with Run() as run:
        run.init(name="proc-bad")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run.add_process(*how["args"], **how.get("kwargs", {})) is None
        assert len(caught) == 1 and issubclass(caught[0].category, SimvueWarning)
        assert re.search(message, str(caught[0].message)), str(caught[0].message)
        assert run.executor.children == {}


@pytest.mark.parametrize("call", BAD_CALLS[:3] + BAD_CALLS[6:7], ids=[c[0] for c in BAD_CALLS[:3] + BAD_CALLS[6:7]])
def test_bad_input_raises_without_suppress_errors(call):
    _, how, message = call
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="proc-bad-strict")
        with pytest.raises((SimvueValueError, SimvueTypeError), match=message):
            run.add_process(*how["args"], **how.get("kwargs", {}))


def test_add_process_before_init_a_reused_identifier_and_an_unknown_kill_are_errors():
    run = Run()
    run.config(suppress_errors=False)
    with pytest.raises(SimvueRunError, match="before init"):
        run.add_process("job", "true")
    run.init(name="proc-misuse")
    run.add_process("job", "true")
    with pytest.raises(SimvueValueError, match="already added"):
        run.add_process("job", "true")
    with pytest.raises(SimvueValueError, match="no process 'nope'"):
        run.kill_process("nope")
    run.close()
    with pytest.raises(SimvueRunError, match="closed run"):
        run.add_process("later", "true")


# -- set_pid and processes ----------------------------------------------------------------


def test_set_pid_adds_that_process_to_processes_and_checks_it_exists(store_dir):
    other = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        with Run() as run:
            assert os.getpid() in {p.pid for p in run.processes}
            with pytest.warns(SimvueWarning, match="before init"):
                run.set_pid(other.pid)
            run.init(name="proc-set-pid")
            assert run.set_pid(other.pid) is None
            assert other.pid in {p.pid for p in run.processes}
            run.config(suppress_errors=False)
            for bad in (0, -4, True, "12"):
                with pytest.raises(SimvueTypeError, match="positive int"):
                    run.set_pid(bad)
            with pytest.raises(SimvueValueError, match="no process with pid"):
                run.set_pid(2**22 + 12345)  # above Linux's pid_max
        exported = read_run(store_dir, "proc-set-pid")
        assert exported["metadata"]["simvue"]["processes"]["main"]["sampled_pid"] == other.pid
    finally:
        other.kill()
        other.wait()


# -- set_tags, set_metric_units, add_alerts -----------------------------------------------


def test_set_tags_replaces_the_tags_and_later_additions_are_kept(store_dir):
    with Run() as run:
        run.init(name="tags-set", tags=["a", "b"])
        run.update_tags(["c"])
        assert run.set_tags(["x", "y"]) is True
        run.update_tags(["z"])
    assert read_run(store_dir, "tags-set")["tags"] == ["x", "y", "z"]
    with Run() as run:
        run.init(name="tags-set-later", tags=["a"])
        run.flush()
        run.set_tags(["only"])
        with pytest.warns(SimvueWarning):
            assert run.set_tags("not-a-list-of-tags") is False
    assert read_run(store_dir, "tags-set-later")["tags"] == ["only"]


def test_set_metric_units_stores_them_under_simvue_metrics(store_dir):
    with Run() as run:
        run.init(name="units")
        run.set_metric_units("x", units="ft")
        run.set_metric_units("y", units="m")
        run.set_metric_units("z", units="Foobars", mks_conversion=3.542, mks_unit="m")
        run.set_metric_units({"t": "s", "w": "widgets"})
        with pytest.warns(SimvueWarning):
            assert run.set_metric_units("q", units=3) is False
        run.log_metrics({"x": 10, "y": 3, "z": 22})
    units = read_run(store_dir, "units")["metadata"]["simvue"]["metrics"]
    assert units == {
        "x": {"units": "ft", "mks_units": "m", "mks_conversion": 0.3048},
        "y": {"units": "m", "mks_units": "m", "mks_conversion": 1.0},
        "z": {"units": "Foobars", "mks_units": "m", "mks_conversion": 3.542},
        "t": {"units": "s", "mks_units": "s", "mks_conversion": 1.0},
        "w": {"units": "widgets", "mks_units": None, "mks_conversion": None},
    }


def test_add_alerts_attaches_alerts_defined_without_the_run(store_dir):
    with Run() as run:
        run.init(name="alerts-attach")
        run.create_metric_threshold_alert("high", "loss", 1.0, "is above", window=1, attach_to_run=False)
        spare = run.create_user_alert("spare", attach_to_run=False)
        run.create_user_alert("left-alone", attach_to_run=False)
        assert run.add_alerts(names=["high"]) is True
        assert run.add_alerts(ids=[spare, "defined-later"]) is True
        run.create_user_alert("defined-later", attach_to_run=False)
        with pytest.warns(SimvueWarning, match="needs alert ids or alert names"):
            assert run.add_alerts() is False
        assert run.add_alerts(names="high") is False  # a str, not a list: warned once per call already
        run.log_metrics({"loss": 5.0})
        run.log_alert("spare", "critical")
        run.log_alert("left-alone", "critical")
    alerts = _alerts(store_dir, "alerts-attach")
    assert {name: (a["attached"], a["status"]) for name, a in alerts.items()} == {
        "high": (True, "critical"),
        "spare": (True, "critical"),
        "left-alone": (False, "ok"),
        "defined-later": (True, "ok"),
    }


# -- properties ---------------------------------------------------------------------------


def test_the_read_only_properties():
    run = Run()
    uid = run.uid
    assert re.fullmatch(r"[0-9a-f]{32}", uid)
    assert run.status is None and run.mode == "offline" and run.dispatcher is None
    run.init(name="props", running=False)
    assert run.status == "created"
    run.set_status("running")
    assert run.status == "running"
    time.sleep(0.05)
    assert run.duration >= 0.05
    config = run.user_config
    assert config.run.mode == "offline" and config.server.url is None
    assert config.settings.close_timeout_s == run._settings.close_timeout_s
    run.close()
    assert run.status == "completed" and run.uid == uid
