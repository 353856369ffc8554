"""Scripts written for the older ``Simvue()`` client, Simtrack and OpsML's RunCard, and
``simvue.Handler``: run unchanged (where they need no server, artifacts or alerts), read back
from the store.  See docs/compat.md."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import pickle
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import simvue
from simvue import Handler, Run, Simvue, SimvueRunError, SimvueTypeError, SimvueValueError, SimvueWarning

from simvue.store import Store
from conftest import ROOT, mpiexec, read_run, run_script

LEVELS = ["debug", "info", "warning", "error", "critical"]


def _script(code: str) -> str:
    return textwrap.dedent(code)


def _values(exported: dict, metric: str) -> list[tuple[int, float]]:
    return [(point[0], point[2]) for point in exported["metrics"][metric]]


# -- the older Simvue() client: Simvue(), log, event, folder_details ----------------------------


def test_simvue_is_the_run_class():
    assert Simvue is Run
    assert {"Simvue", "Handler"} <= set(simvue.__all__)


def test_seed_001_simvue_client_example_runs_unchanged(store_dir):
    result = run_script(_script("""
        from simvue import Simvue

        run = Simvue()
        run.config(suppress_errors=False)
        run.init(name='my-first-run',
                 metadata={'environment': 'test'},
                 tags=['test'],
                 description='This is a test',
                 folder='/tests')
        run.log({'parameter1': 1.2, 'parameter2': 3.5})
        run.log({'parameter1': 1.3, 'parameter2': 3.6})
        run.log({'parameter1': 9.0}, step=10, time=2.5, timestamp='2024-01-02T03:04:05.000001Z')
        run.folder_details('/tests',
                           metadata={'environment': 'testing'},
                           tags=['test'],
                           description='My first tests')
        try:
            raise ValueError('solver diverged')
        except Exception as exc:
            run.event(exc)
        run.event('plain text', timestamp='2024-01-02T03:04:06.000001Z')
        assert run.close() is True
    """))
    assert result.returncode == 0, result.stderr
    exported = read_run(store_dir, "my-first-run")
    assert exported["status"] == "completed"
    assert exported["folder"] == "/tests"
    assert exported["description"] == "This is a test"
    assert exported["tags"] == ["test"]
    assert exported["metadata"]["environment"] == "test"
    assert _values(exported, "parameter1") == [(0, 1.2), (1, 1.3), (10, 9.0)]
    assert _values(exported, "parameter2") == [(0, 3.5), (1, 3.6)]
    assert exported["metrics"]["parameter1"][2][1] == 2.5
    assert exported["folder_details"] == {
        "path": "/tests", "description": "My first tests", "metadata": {"environment": "testing"}, "tags": ["test"],
    }
    assert [(e["message"], e["level"]) for e in exported["events"]] == [
        ("ValueError: solver diverged", "info"), ("plain text", "info"),
    ]
    assert exported["events"][1]["timestamp"] == "2024-01-02T03:04:06.000001"


def test_seed_001_context_manager_form_completes(store_dir):
    result = run_script(_script("""
        from simvue import Simvue
        with Simvue() as run:
            run.init(name='seed-001-with')
            for i in range(5):
                run.log({'quality': i / 10})
    """))
    assert result.returncode == 0, result.stderr
    exported = read_run(store_dir, "seed-001-with")
    assert exported["status"] == "completed"
    assert _values(exported, "quality") == [(i, i / 10) for i in range(5)]


# -- Simtrack: simtrack.ini, SIMTRACK_* and its client names -------------------------------------


def test_seed_002_simtrack_example_with_positional_init_runs_unchanged(store_dir):
    # The seed's ``save`` and ``add_alert`` calls are left out (artifacts and alerts have
    # their own tests); ``Simtrack`` is imported under its simvue name.
    result = run_script(_script("""
        from simvue import Simvue as Simtrack

        with Simtrack() as run:
            run.config(suppress_errors=False)
            run.init('example-run-name',
                     {'learning_rate': 0.001, 'training_steps': 2000, 'batch_size': 32},
                     ['tensorflow'],
                     'This is a test.',
                     '/Project-A/part1')
            run.set_folder_details('/Project-A/part1',
                                   metadata={},
                                   tags=['tensorflow'],
                                   description='This is part 1 of a test')
            loss = 10.0
            while loss > 0.5:
                run.log({'loss': loss, 'density': 34.4})
                loss /= 2
    """))
    assert result.returncode == 0, result.stderr
    exported = read_run(store_dir, "example-run-name")
    assert exported["status"] == "completed"
    assert exported["folder"] == "/Project-A/part1"
    assert exported["description"] == "This is a test."
    assert exported["tags"] == ["tensorflow"]
    assert {k: exported["metadata"][k] for k in ("learning_rate", "training_steps", "batch_size")} == {
        "learning_rate": 0.001, "training_steps": 2000, "batch_size": 32,
    }
    assert _values(exported, "loss") == [(0, 10.0), (1, 5.0), (2, 2.5), (3, 1.25), (4, 0.625)]
    assert _values(exported, "density") == [(step, 34.4) for step in range(5)]
    assert exported["folder_details"] == {
        "path": "/Project-A/part1", "description": "This is part 1 of a test", "metadata": {}, "tags": ["tensorflow"],
    }


# -- OpsML RunCard verbs: log_parameter(s), add_tag(s) ------------------------------------------


def test_seed_003_runcard_verbs_record_metrics_parameters_and_tags(store_dir):
    # The seed's card registration and ``log_artifact_from_file`` are OpsML-only / tested below.
    result = run_script(_script("""
        import json
        import time
        from simvue import Run

        with Run() as run:
            run.config(suppress_errors=False, log_hardware=True, hardware_interval=10)
            run.init(name='opsml-project')
            time.sleep(0.5)  # longer than the sampler's start delay: a run that short has no samples
            assert run.log_metric("test_metric", 10) is True
            assert run.log_metrics({"test_metric2": 20}) is True
            assert run.log_metric("test_metric", 11, step=7) is True
            assert run.log_metric("test_metric", 12) is True
            assert run.log_parameter("test_parameter", 10) is True
            assert run.log_parameters({"lr": 0.01, "optimizer": "adam", "layers": [64, 32]}) is True
            assert run.log_parameter("lr", 0.02) is True
            assert run.add_tag("team", "cfd") is True
            assert run.add_tags({"stage": "train", "version": 2}) is True
            print(json.dumps({"interval": run._settings.resources_interval_s}))
    """))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"interval": 10.0}
    exported = read_run(store_dir, "opsml-project")
    # Hardware logging on: the process is sampled, under the plain names (this run is shorter
    # than the interval: its first sample and its last).
    assert len(exported["metrics"]["resources/cpu.usage.percentage"]) >= 1
    assert exported["status"] == "completed"
    # log_metric uses the same per-process automatic step as log_metrics.
    assert _values(exported, "test_metric") == [(0, 10), (7, 11), (3, 12)]
    assert _values(exported, "test_metric2") == [(1, 20)]
    metadata = {k: v for k, v in exported["metadata"].items() if k != "simvue"}
    assert metadata == {"test_parameter": 10, "lr": 0.02, "optimizer": "adam", "layers": [64, 32]}
    assert exported["tags"] == ["team=cfd", "stage=train", "version=2"]


def test_log_artifact_from_file_stores_an_output_artifact(store_dir, tmp_path):
    path = tmp_path / "artifact.txt"
    path.write_text("This is a test")
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="artifact-mapping")
        assert run.log_artifact_from_file("artifact", path) is True
    exported = read_run(store_dir, "artifact-mapping")
    [artifact] = exported["artifacts"]
    assert (artifact["name"], artifact["category"], artifact["size"]) == ("artifact", "output", 14)
    store = Store(store_dir)
    try:
        assert store.artifact_bytes(exported["id"], "artifact") == b"This is a test"
    finally:
        store.close()


# -- bad input: the same error policy as every Run call ----------------------------------------


BAD_CALLS = [
    (lambda run: run.log("not a dict"), SimvueTypeError),
    (lambda run: run.log({"a": math.nan}), SimvueValueError),
    (lambda run: run.log({"a": 1.0}, step=-1), SimvueValueError),
    (lambda run: run.event(42), SimvueTypeError),
    (lambda run: run.event("x", timestamp="yesterday"), SimvueValueError),
    (lambda run: run.folder_details("relative/path"), SimvueValueError),
    (lambda run: run.folder_details("/f", tags="one-string"), SimvueTypeError),
    (lambda run: run.log_metric(["a"], 1.0), SimvueTypeError),
    (lambda run: run.log_metric("bad name!", 1.0), SimvueValueError),
    (lambda run: run.log_metric("a", "high"), SimvueTypeError),
    (lambda run: run.log_metric("a", math.inf), SimvueValueError),
    (lambda run: run.log_metric("a", 1.0, step=1.5), SimvueTypeError),
    (lambda run: run.log_parameter("", 1), SimvueValueError),
    (lambda run: run.log_parameter(3, 1), SimvueValueError),
    (lambda run: run.log_parameter("p", object()), SimvueValueError),
    (lambda run: run.log_parameter("p", math.nan), SimvueValueError),
    (lambda run: run.log_parameters(["p", 1]), SimvueTypeError),
    (lambda run: run.add_tag("k", None), SimvueTypeError),
    (lambda run: run.add_tag("", "v"), SimvueValueError),
    (lambda run: run.add_tag("a=b", "v"), SimvueValueError),
    (lambda run: run.add_tag(1, "v"), SimvueTypeError),
    (lambda run: run.add_tags(["k"]), SimvueTypeError),
    (lambda run: run.add_tags({"k": ["v"]}), SimvueTypeError),
    (lambda run: run.log_artifact_from_file("", "file.txt"), SimvueValueError),
    (lambda run: run.log_artifact_from_file("a", 42), SimvueTypeError),
]


@pytest.mark.parametrize(("call", "error"), BAD_CALLS)
def test_bad_compat_calls_raise_a_clear_error_and_nothing_else_is_lost(store_dir, call, error):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="compat-strict")
        run.log({"a": 1.0})
        with pytest.raises(error):
            call(run)
        run.log({"a": 2.0})
    exported = read_run(store_dir, "compat-strict")
    assert exported["status"] == "completed"
    assert [p[2] for p in exported["metrics"]["a"]] == [1.0, 2.0]
    assert exported["tags"] == []
    assert [k for k in exported["metadata"] if k != "simvue"] == []


def test_bad_compat_calls_warn_once_per_kind_when_errors_are_suppressed(store_dir):
    with Run() as run:
        run.init(name="compat-lenient")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run.add_tag("k", None) is False
            assert run.add_tag("k", object()) is False
            assert run.log_parameter("p", object()) is False
            assert run.add_tag("k", "v") is True
        assert len([w for w in caught if issubclass(w.category, SimvueWarning)]) == 2
    exported = read_run(store_dir, "compat-lenient")
    assert exported["tags"] == ["k=v"]
    assert exported["metadata"]["simvue"]["dropped_calls"]["main"] == {"add_tag": 2, "log_parameter": 1}


def test_compat_calls_before_init_are_errors():
    run = Simvue()
    run.config(suppress_errors=False)
    for call in (lambda: run.log({"a": 1}), lambda: run.event("x"), lambda: run.log_metric("a", 1),
                 lambda: run.log_parameter("p", 1), lambda: run.add_tag("k", "v")):
        with pytest.raises(SimvueRunError, match="before init"):
            call()


def test_log_hardware_and_hardware_interval_are_accepted_by_config():
    run = Run()
    assert run.config(log_hardware=False, hardware_interval=30) is True
    assert run._settings.resources_interval_s == 0
    run.config(suppress_errors=False)
    with pytest.raises(SimvueValueError):
        run.config(log_hardwre=True)


# -- simvue.Handler --------------------------------------------------------------------------------


def _logger(name: str, run: Run) -> tuple[logging.Logger, Handler]:
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = Handler(run)
    logger.addHandler(handler)
    return logger, handler


def _log_every_level(logger: logging.Logger, who: str) -> None:
    logger.debug("%s debug", who)
    logger.info("%s info", who)
    logger.warning("%s warning", who)
    logger.error("%s error", who)
    logger.critical("%s critical", who)


def _log_from_worker(run: Run, task: int) -> int:
    """A pool task that was handed the run: a handler of its own on a logger of its own."""
    logger, handler = _logger(f"compat.worker.{task}", run)
    try:
        _log_every_level(logger, f"task{task}")
    finally:
        logger.removeHandler(handler)
    return os.getpid()


def _log_with_handed_handler(handler: Handler, task: int) -> int:
    """A pool task that was handed a handler (pickled with its run)."""
    logger = logging.getLogger(f"compat.spawned.{task}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        _log_every_level(logger, f"spawned{task}")
    finally:
        logger.removeHandler(handler)
    return os.getpid()


def _events_by_message(exported: dict) -> dict[str, str]:
    # Events from pool workers may carry a process prefix such as ``[worker1] ``.
    return {e["message"].rpartition("] ")[2]: e["level"] for e in exported["events"]}


def test_handler_maps_levels_and_records_from_main_process_and_fork_pool_workers(store_dir):
    run = Run()
    run.config(suppress_errors=False)
    run.init(name="handler-pool")
    logger, handler = _logger("compat.main", run)
    try:
        _log_every_level(logger, "main")
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pids = pool.starmap_async(_log_from_worker, [(run, task) for task in range(3)], chunksize=1).get(60)
        logger.info("main after the pool")
    finally:
        logger.removeHandler(handler)
    assert run.close() is True
    assert all(pid != os.getpid() for pid in pids)
    events = _events_by_message(read_run(store_dir, "handler-pool"))
    expected = {f"{who} {level}": level for who in ["main", "task0", "task1", "task2"] for level in LEVELS}
    expected["main after the pool"] = "info"
    assert events == expected


def test_a_handler_can_be_pickled_to_spawn_workers_with_its_run(store_dir):
    run = Run()
    run.init(name="handler-spawn")
    handler = Handler(run, level=logging.INFO)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    copy = pickle.loads(pickle.dumps(handler))
    assert (copy.level, copy.formatter._fmt, copy.run.name) == (logging.INFO, "%(name)s: %(message)s", "handler-spawn")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.starmap_async(_log_with_handed_handler, [(handler, 0)]).get(60)
    assert run.close() is True
    events = _events_by_message(read_run(store_dir, "handler-spawn"))
    assert events == {f"compat.spawned.0: spawned0 {level}": level for level in LEVELS[1:]}


def test_handler_formats_exceptions_and_custom_levels(store_dir):
    with Run() as run:
        run.init(name="handler-format")
        logger, handler = _logger("compat.format", run)
        logger.setLevel(1)
        try:
            try:
                1 / 0
            except ZeroDivisionError:
                logger.exception("step failed")
            logger.log(25, "between info and warning")
            logger.log(5, "below debug")
        finally:
            logger.removeHandler(handler)
    events = read_run(store_dir, "handler-format")["events"]
    assert events[0]["level"] == "error"
    assert events[0]["message"].startswith("step failed\nTraceback")
    assert "ZeroDivisionError" in events[0]["message"]
    assert [(e["message"], e["level"]) for e in events[1:]] == [("between info and warning", "info"),
                                                                ("below debug", "debug")]


def test_handler_never_raises_into_the_logging_call(store_dir, capsys):
    run = Run()
    run.config(suppress_errors=False)
    run.init(name="handler-closed")
    logger, handler = _logger("compat.closed", run)
    run.close()
    try:
        logger.error("after close")  # the run raises SimvueRunError; logging reports it instead
    finally:
        logger.removeHandler(handler)
    assert "SimvueRunError" in capsys.readouterr().err


def test_handler_skips_simvues_own_loggers(store_dir):
    with Run() as run:
        run.init(name="handler-own")
        logger, handler = _logger("simvue.transport", run)
        other, other_handler = _logger("simvuex", run)
        try:
            logger.warning("internal")
            other.warning("a user's logger")
        finally:
            logger.removeHandler(handler)
            other.removeHandler(other_handler)
    assert [e["message"] for e in read_run(store_dir, "handler-own")["events"]] == ["a user's logger"]


# -- MPI: every rank uses the older API ------------------------------------------------------------

@pytest.mark.mpi_skip
@pytest.mark.skipif(not (Path(sys.executable).parent / "mpiexec").exists(), reason="no mpiexec in the venv")
def test_every_rank_using_the_older_api_joins_one_run(store_dir, tmp_path):
    script = tmp_path / "old_api.py"
    script.write_text(_script("""
        import logging, os
        from simvue import Handler, Simvue

        rank = int(os.environ.get("PMI_RANK", "0"))
        with Simvue() as run:
            run.config(suppress_errors=False)
            run.init('compat-mpi', {'ranks': 2}, ['mpi'], 'older API on every rank', '/compat/mpi')
            logger = logging.getLogger('solver')
            logger.setLevel(logging.INFO)
            logger.addHandler(Handler(run))
            for i in range(20):
                run.log({'loss': rank * 100 + i})
            run.log_metric('single', float(rank), step=0)
            run.log_parameter(f'rank{rank}_pid', os.getpid())
            run.add_tag(f'rank{rank}', 'ok')
            run.event(f'rank {rank} finished')
            logger.warning('rank %d warns', rank)
            run.folder_details('/compat/mpi', description='two ranks')
        if rank == 0:
            print(run.name)
    """))
    job = mpiexec(2, sys.executable, str(script), cwd=ROOT, timeout=90)
    assert job.returncode == 0, job.stderr
    assert job.stdout.strip() == "compat-mpi"
    exported = read_run(store_dir, "compat-mpi")
    assert exported["status"] == "completed"
    assert exported["folder"] == "/compat/mpi"
    assert exported["folder_details"]["description"] == "two ranks"
    for rank in range(2):
        assert _values(exported, f"rank{rank}/loss") == [(i, rank * 100 + i) for i in range(20)]
        assert _values(exported, f"rank{rank}/single") == [(0, float(rank))]
        assert isinstance(exported["metadata"][f"rank{rank}_pid"], int)
    assert exported["metadata"]["ranks"] == 2
    assert sorted(exported["tags"]) == ["mpi", "rank0=ok", "rank1=ok"]
    messages = sorted((e["message"], e["level"]) for e in exported["events"])
    assert messages == sorted(
        [(f"[rank{k}] rank {k} finished", "info") for k in range(2)]
        + [(f"[rank{k}] rank {k} warns", "warning") for k in range(2)]
    )
