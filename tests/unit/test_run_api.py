"""The Run API in one process: what a user of the Simvue client expects."""

from __future__ import annotations

import math
import re
import warnings

import pytest

import simvue
from simvue import Run, SimvueRunError, SimvueTypeError, SimvueValueError, SimvueWarning

from conftest import read_run, run_script


def test_context_manager_records_metrics_events_metadata_and_completes(store_dir):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="api-basic", metadata={"lr": 0.1}, tags=["a"], description="d", folder="/tests/api")
        for step in range(50):
            run.log_metrics({"loss": 1.0 / (step + 1), "averages.mean": step * 0.5})
        run.log_event("halfway")
        run.update_metadata({"nested": {"x": 1}})
        run.update_metadata({"nested": {"y": 2}})
        run.update_tags(["b", "a"])
    exported = read_run(store_dir, "api-basic")
    assert exported["status"] == "completed"
    assert exported["folder"] == "/tests/api"
    assert exported["description"] == "d"
    assert exported["tags"] == ["a", "b"]
    assert exported["metadata"]["lr"] == 0.1
    assert exported["metadata"]["nested"] == {"x": 1, "y": 2}
    assert [p[0] for p in exported["metrics"]["loss"]] == list(range(50))
    assert [p[2] for p in exported["metrics"]["loss"]] == [1.0 / (s + 1) for s in range(50)]
    assert exported["metrics"]["averages.mean"][-1][2] == 24.5
    assert [e["message"] for e in exported["events"]] == ["halfway"]


def test_a_single_process_run_keeps_plain_metric_names(store_dir):
    with Run() as run:
        run.init(name="plain")
        run.log_metrics({"x": 1})
    assert list(read_run(store_dir, "plain")["metrics"]) == ["x"]


def test_name_is_random_adjective_noun_when_not_given(store_dir):
    with Run() as run:
        run.init()
        name = run.name
    assert re.fullmatch(r"[a-z]+-[a-z]+", name)
    assert read_run(store_dir, name)["status"] == "completed"


def test_step_auto_increments_per_call_and_explicit_steps_do_not_reset_it(store_dir):
    with Run() as run:
        run.init(name="steps")
        run.log_metrics({"a": 0.0})
        run.log_metrics({"a": 1.0}, step=5)
        run.log_metrics({"a": 2.0})
    assert [p[0] for p in read_run(store_dir, "steps")["metrics"]["a"]] == [0, 5, 2]


def test_time_and_timestamp_arguments_are_stored(store_dir):
    with Run() as run:
        run.init(name="stamps")
        run.log_metrics({"a": 1.0}, time=12.5, timestamp="2024-01-02T03:04:05.123456Z")
        run.log_event("at a time", timestamp="2024-01-02T03:04:06.000001Z")
    exported = read_run(store_dir, "stamps")
    assert exported["metrics"]["a"][0][1] == 12.5
    assert exported["events"][0]["timestamp"] == "2024-01-02T03:04:06.000001"


def test_the_caller_may_reuse_its_metrics_dict(store_dir):
    values = {"a": 0.0}
    with Run() as run:
        run.init(name="reuse")
        for step in range(10):
            values["a"] = float(step)
            run.log_metrics(values)
    assert [p[2] for p in read_run(store_dir, "reuse")["metrics"]["a"]] == [float(s) for s in range(10)]


def test_exception_in_block_fails_the_run_with_the_traceback_as_event(store_dir):
    with pytest.raises(ZeroDivisionError):
        with Run() as run:
            run.init(name="crashes")
            run.log_metrics({"a": 1.0})
            1 / 0
    exported = read_run(store_dir, "crashes")
    assert exported["status"] == "failed"
    assert any("ZeroDivisionError" in e["message"] and "Traceback" in e["message"] for e in exported["events"])
    assert exported["metrics"]["a"] == [[0, exported["metrics"]["a"][0][1], 1.0]]


def test_keyboard_interrupt_terminates_the_run(store_dir):
    with pytest.raises(KeyboardInterrupt):
        with Run() as run:
            run.init(name="interrupted")
            raise KeyboardInterrupt
    assert read_run(store_dir, "interrupted")["status"] == "terminated"


def test_user_status_wins_over_the_automatic_one(store_dir):
    with Run() as run:
        run.init(name="user-status")
        run.set_status("terminated")
    assert read_run(store_dir, "user-status")["status"] == "terminated"


def test_close_is_idempotent(store_dir):
    run = Run()
    run.init(name="twice")
    run.log_metrics({"a": 1})
    assert run.close() is True
    assert run.close() is True
    assert read_run(store_dir, "twice")["status"] == "completed"


def test_set_folder_details_and_created_status(store_dir):
    with Run() as run:
        run.init(name="folder", folder="/proj/part1")
        run.set_folder_details("/proj/part1", metadata={"env": "test"}, tags=["t"], description="part 1")
    details = read_run(store_dir, "folder")["folder_details"]
    assert details == {"path": "/proj/part1", "description": "part 1", "metadata": {"env": "test"}, "tags": ["t"]}


@pytest.mark.parametrize(
    ("metrics", "error"),
    [
        ({"loss": "high"}, SimvueTypeError),
        ({"loss": math.nan}, SimvueValueError),
        ({"loss": math.inf}, SimvueValueError),
        ({"loss": True}, SimvueTypeError),
        ({"bad name!": 1.0}, SimvueValueError),
        ({3: 1.0}, SimvueTypeError),
        ({}, SimvueValueError),
        ([1, 2], SimvueTypeError),
    ],
)
def test_bad_metrics_raise_a_clear_error_when_errors_are_not_suppressed(store_dir, metrics, error):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="strict")
        run.log_metrics({"ok": 1.0})
        with pytest.raises(error):
            run.log_metrics(metrics)
        run.log_metrics({"ok": 2.0})
    assert [p[2] for p in read_run(store_dir, "strict")["metrics"]["ok"]] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda run: run.log_metrics({"a": 1}, step=-1), SimvueValueError),
        (lambda run: run.log_metrics({"a": 1}, step=1.5), SimvueTypeError),
        (lambda run: run.log_metrics({"a": 1}, time="soon"), SimvueTypeError),
        (lambda run: run.log_metrics({"a": 1}, timestamp="yesterday"), SimvueValueError),
        (lambda run: run.log_event(42), SimvueTypeError),
        (lambda run: run.update_metadata(["not", "a", "dict"]), SimvueTypeError),
        (lambda run: run.update_metadata({"x": object()}), SimvueValueError),
        (lambda run: run.update_tags("single-string"), SimvueTypeError),
        (lambda run: run.set_status("exploded"), SimvueValueError),
        (lambda run: run.set_folder_details("no-leading-slash"), SimvueValueError),
        (lambda run: run.config(flush_interval_s=-1), SimvueValueError),
        (lambda run: run.config(no_such_option=1), SimvueValueError),
    ],
)
def test_bad_arguments_raise_and_nothing_logged_is_lost(store_dir, call, error):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="bad-args")
        run.log_metrics({"a": 1.0})
        with pytest.raises(error):
            call(run)
        run.log_metrics({"a": 2.0})
    exported = read_run(store_dir, "bad-args")
    assert [p[2] for p in exported["metrics"]["a"]] == [1.0, 2.0]
    assert exported["status"] == "completed"


def test_bad_init_arguments_raise(store_dir):
    for kwargs in ({"name": ""}, {"name": "   "}, {"name": "tab\there"}, {"name": "x" * 257}, {"name": "bad\ud800"},
                   {"name": 5}, {"description": "bad\udc80"}, {"tags": ["ok", "\ud800"]}, {"folder": "relative"}, {"tags": "x"}, {"metadata": 3},
                   {"status": "completed"}, {"notification": "sms"}, {"retention_period": "1 parsec"},
                   {"retention_period": 30}, {"retention_period": "0 s"}, {"retention_period": "nan days"},
                   {"visibility": "everyone"}, {"visibility": ["ok", ""]}, {"visibility": 5},
                   {"no_color": "yes"}, {"record_shell_vars": "PATH"}, {"record_shell_vars": [None]}):
        run = Run()
        run.config(suppress_errors=False)
        with pytest.raises((SimvueValueError, SimvueTypeError)):
            run.init(**kwargs)


def test_with_suppressed_errors_a_bad_call_warns_once_and_is_dropped(store_dir):
    with Run() as run:
        run.init(name="lenient")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run.log_metrics({"a": math.nan}) is False
            assert run.log_metrics({"a": "x"}) is False
            assert run.log_metrics({"a": 3.0}) is True
        assert len([w for w in caught if issubclass(w.category, SimvueWarning)]) == 1
    exported = read_run(store_dir, "lenient")
    assert [p[2] for p in exported["metrics"]["a"]] == [3.0]
    assert exported["metadata"]["simvue"]["dropped_calls"]["main"]["log_metrics"] == 2


def test_calls_before_init_and_after_close_are_errors(store_dir):
    run = Run()
    run.config(suppress_errors=False)
    with pytest.raises(SimvueRunError, match="before init"):
        run.log_metrics({"a": 1})
    run.init(name="closed")
    run.close()
    with pytest.raises(SimvueRunError, match="closed"):
        run.log_metrics({"a": 1})
    with pytest.raises(SimvueRunError, match="closed"):
        run.log_event("late")
    with pytest.raises(SimvueRunError, match="already"):
        run.init(name="again")


def test_numpy_like_scalars_are_accepted(store_dir):
    fractions = pytest.importorskip("fractions")
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="scalars")
        run.log_metrics({"f": fractions.Fraction(1, 4)})
    assert read_run(store_dir, "scalars")["metrics"]["f"][0][2] == 0.25


def test_disabled_mode_records_nothing(store_dir):
    with Run(mode="disabled") as run:
        assert run.init(name="nothing")
        assert run.log_metrics({"a": 1.0})
    assert not (store_dir / "simvue.db").exists()


def test_flush_commits_without_closing(store_dir):
    run = Run()
    run.init(name="flushed")
    run.log_metrics({"a": 1.0})
    assert run.flush(10)
    assert read_run(store_dir, "flushed")["metrics"]["a"][0][2] == 1.0
    assert read_run(store_dir, "flushed")["status"] == "running"
    run.close()


def test_everything_logged_right_before_close_is_stored(store_dir):
    """``close()`` wakes the aggregator at once rather than waiting for its next commit or
    poll: what was logged an instant before it is in the store when it returns."""
    for attempt in range(3):
        run = Run()
        run.config(suppress_errors=False)
        run.init(name=f"last-moment-{attempt}")
        for step in range(20_000):
            run.log_metrics({"x": float(step)})
        run.log_event("the last event")
        run.update_metadata({"last": attempt})
        assert run.close() is True
        exported = read_run(store_dir, f"last-moment-{attempt}")
        assert exported["status"] == "completed"
        assert [p[2] for p in exported["metrics"]["x"]] == [float(s) for s in range(20_000)]
        assert [e["message"] for e in exported["events"]] == ["the last event"]
        assert exported["metadata"]["last"] == attempt


def test_a_flush_right_after_logging_commits_it(store_dir):
    """``flush()`` wakes the aggregator too: each flush makes what was logged just before
    it readable from the store, run after run of flushes."""
    run = Run()
    run.config(suppress_errors=False)
    run.init(name="flushes")
    for round_ in range(5):
        run.log_metrics({"x": float(round_)})
        assert run.flush() is True
        assert [p[2] for p in read_run(store_dir, "flushes")["metrics"]["x"]] == [float(r) for r in range(round_ + 1)]
    assert run.close() is True


def test_public_names():
    assert {"Run", "SimvueError", "__version__"} <= set(simvue.__all__)


def test_server_options_and_shell_variables_are_kept_with_the_run(store_dir, monkeypatch):
    """``notification``, ``retention_period``, ``visibility`` and ``storage_id`` are kept in
    the store in the server's form (and sent with the run, tests/scenarios/test_online.py);
    ``record_shell_vars`` copies matching environment variables into the metadata."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_RAW", b"caf\xe9".decode("utf-8", "surrogateescape"))  # not UTF-8 in the environment
    monkeypatch.setenv("OTHER", "x")
    with Run() as run:
        run.config(suppress_errors=False, storage_id="fast-disk")
        run.init(name="options", notification="lost", retention_period="1h30m", visibility=["alice", "bob"],
                 no_color=True, record_shell_vars=["SLURM_*", "NOT_SET"], metadata={"a": 1})
    exported = read_run(store_dir, "options")
    assert exported["options"] == {
        "ttl": 5400,
        "visibility": {"tenant": False, "public": False, "users": ["alice", "bob"]},
        "notifications": {"state": "lost"},
        "storage_id": "fast-disk",
    }
    assert exported["metadata"]["shell"] == {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_RAW": "caf\udce9"}
    assert exported["metadata"]["a"] == 1
    with Run() as run:
        run.init(name="defaults", visibility="tenant")
    assert read_run(store_dir, "defaults")["options"] == {
        "ttl": None, "visibility": {"tenant": True, "public": False, "users": []}, "notifications": {"state": "none"}
    }
    assert "shell" not in read_run(store_dir, "defaults")["metadata"]


@pytest.mark.parametrize("text, seconds", [("30 days", 2592000), ("1h30m", 5400), ("2 weeks", 1209600), ("90", 90),
                                           ("1.5 hours", 5400), ("1 hour, 30 minutes", 5400), (" 10 S ", 10)])
def test_retention_periods_read_as_people_write_them(text, seconds):
    from simvue.validation import retention_period

    assert retention_period(text) == seconds


def test_compatibility_options_are_checked_and_take_effect(store_dir):
    run = Run()
    run.config(suppress_errors=False)
    for options in ({"abort_on_alert": "explode"}, {"queue_blocking": "yes"}, {"storage_id": 5},
                    {"enable_emission_metrics": 1}, {"enable_emission_metrics": True, "resources_interval_s": 0},
                    {"cpu_watts_per_core": -1}, {"co2_grams_per_kwh": math.inf}):
        with pytest.raises((SimvueValueError, SimvueTypeError)):
            run.config(**options)
    run.config(abort_on_alert=True, queue_blocking=True)
    assert run._settings.abort_on_alert == "terminate" and run._settings.queue_blocking
    run.config(abort_on_alert=False)
    assert run._abort_action() == "ignore"


def test_debug_writes_what_simvue_does_to_stderr(store_dir):
    code = """
from simvue import Run
with Run(debug=True) as run:
    run.init(name="debugged")
    run.log_metrics({"x": 1.0})
"""
    result = run_script(code)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "DEBUG" in line]
    assert any("run 'debugged'" in line and "aggregates it at tcp://127.0.0.1:" in line for line in lines), lines
    assert any("run 'debugged' finished completed: main done; losses none" in line for line in lines), lines
    quiet = run_script(code.replace("debug=True", "debug=False"))
    assert quiet.returncode == 0 and "DEBUG" not in quiet.stderr
    wrong = run_script(code.replace("debug=True", "debug='yes'"))
    assert wrong.returncode == 0 and "debug must be True or False" in wrong.stderr


@pytest.mark.parametrize("name", ["résultat-1", "a/b", "Lauf 3 (ω=2)", "..", "x" * 256, "../../etc/passwd"])
def test_any_name_a_person_would_give_a_run_is_recorded(store_dir, name):
    with Run() as run:
        run.config(suppress_errors=False)
        assert run.init(name=name)
        run.log_metrics({"x": 1.0})
    exported = read_run(store_dir, name)
    assert exported["name"] == name and exported["metrics"]["x"][0][2] == 1.0


def test_names_become_distinct_safe_file_names():
    from simvue._util import safe_filename

    names = ["a/b", "a_b", "résumé", "r_sum_", "..", "../../etc/passwd", "", "x" * 300]
    files = [safe_filename(name, distinct=True) for name in names]
    assert len(set(files)) == len(files)
    for file in files:
        assert file and "/" not in file and file not in (".", "..") and len(file) <= 120 and file.isascii()
    assert safe_filename("plain-name_1.2", distinct=True) == "plain-name_1.2"


@pytest.mark.parametrize("values, stored", [({"x": 10**400}, None), ({"x": 2**64}, float(2**64)),
                                             ({"x": -(2**63) - 1}, float(-(2**63) - 1)), ({"x": 2**63 - 1}, float(2**63 - 1))])
def test_huge_ints_are_stored_as_floats_or_refused_with_a_warning_never_raised(store_dir, values, stored):
    with Run() as run:
        run.init(name="huge")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            accepted = run.log_metrics(values)
        assert accepted is (stored is not None)
        assert len(caught) == (0 if accepted else 1)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert run.log_metrics({"x": 1.0}, step=2**63) is False  # beyond int64: refused
    points = read_run(store_dir, "huge")["metrics"].get("x", [])
    assert [p[2] for p in points] == ([] if stored is None else [stored])


def test_deep_or_unportable_metadata_is_refused_with_a_warning_never_raised(store_dir):
    deep: dict = {}
    cursor = deep
    for _ in range(10_000):
        cursor["a"] = {}
        cursor = cursor["a"]
    with Run() as run:
        run.init(name="unportable")
        for bad in (deep, {"k": "\ud800"}, {"\udc80": 1}, {"n": 2**64}, {"l": [[[[[[[[1]]]]]]]] * 2, "big": "x" * (17 << 20)}):
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                assert run.update_metadata(bad) is False
        assert run.update_metadata({"fine": {"n": 2**63 - 1, "t": "ünïcode"}}) is True
    metadata = read_run(store_dir, "unportable")["metadata"]
    assert metadata["fine"] == {"n": 2**63 - 1, "t": "ünïcode"}
    assert metadata["simvue"]["dropped_calls"]["main"]["update_metadata"] == 5
