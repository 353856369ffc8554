"""Every public method of the upstream ``simvue.Client`` and ``simvue.Run`` (2.6.2), called
against the server named by ``SIMVUE_URL``/``SIMVUE_TOKEN``.

Run with the upstream client's interpreter (``tests/scenarios/test_server_upstream_api.py``
does), in an empty working directory.  Prints one JSON object on its last line:

* ``results``: one entry per call, ``{"ok": true, "value": ...}`` or ``{"ok": false, "error":
  "..."}``, keyed ``"Run.log_metrics"``, ``"Run.log_metrics (grid)"``, ...; and one per
  property of each object the client hands back, keyed ``"Client.get_run().runtime"``;
* ``public``: the public names of ``Client`` and ``Run`` in this version, so that the test can
  check that none was left out;
* ``ids``: what the test needs to look at the server's side of the calls.

A call that raises (even ``SystemExit``) is recorded and the driver goes on, so that one pass
reports every gap.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import json
import logging
import os
import pathlib
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from simvue.api.objects import Grid
from simvue.api.objects.grids import GridMetrics

from simvue import Client, Run

GRID_TICKS = [[0.0, 1.0, 2.0], [0.0, 1.0]]
GRID_VALUES = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]

results: dict[str, dict[str, Any]] = {}
ids: dict[str, Any] = {}


def jsonable(value: Any) -> Any:
    """A JSON-friendly summary of what a call returned (enough to assert on)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, time.struct_time):
        return time.strftime("%H:%M:%S", value)
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if type(value).__name__ == "DataFrame":
        return {"dataframe": [str(column) for column in value.columns], "rows": len(value)}
    return type(value).__name__


def check(label: str, call: Callable[[], Any]) -> Any:
    """Record whether ``call()`` worked and what it gave (generators are drained); its result."""
    try:
        value = call()
        if isinstance(value, types.GeneratorType):
            value = list(value)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a client call is a result too
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        results[label] = {"ok": False, "error": text[-1500:]}
        return None
    results[label] = {"ok": True, "value": jsonable(value)}
    return value


def read_properties(label: str, obj: Any) -> None:
    """Read every public property of an object the client handed back."""
    if obj is None:
        return
    for name, member in inspect.getmembers(type(obj)):
        if not name.startswith("_") and isinstance(member, property):
            check(f"{label}.{name}", lambda name=name: getattr(obj, name))


def public(cls: type) -> list[str]:
    return sorted(name for name in dir(cls) if not name.startswith("_"))


def drive_run(workdir: pathlib.Path) -> None:
    """One run that calls every public method of ``simvue.Run``, then the ones that need
    another run: ``reconnect`` (a run created but not started) and killed processes."""
    input_file = workdir / "input.txt"
    input_file.write_text("input for the upstream run\n")
    outputs = workdir / "outputs"
    outputs.mkdir()
    (outputs / "a.txt").write_text("a\n")
    script = workdir / "job.sh"
    script.write_text("echo process-output\n")

    run = Run()
    check("Run.config", lambda: run.config(disable_resources_metrics=True, suppress_errors=False))
    check("Run.init", lambda: run.init(
        name="api-run", folder="/api/demo", tags=["t1"], metadata={"lr": 0.5}, description="every method",
    ))
    ids["run"] = run.id
    for name in ("id", "name", "status", "uid", "mode", "duration", "user_config", "dispatcher", "executor"):
        check(f"Run.{name}", lambda name=name: getattr(run, name))
    check("Run.set_pid", lambda: run.set_pid(os.getpid()))
    check("Run.processes", lambda: [process.pid for process in run.processes])
    check("Run.set_metric_units", lambda: run.set_metric_units("loss", units="m"))
    check("Run.log_metrics", lambda: run.log_metrics({"loss": 0.5, "acc": 0.25}))
    check("Run.log_metrics (again)", lambda: run.log_metrics({"loss": 0.25, "acc": 0.5}))
    check("Run.assign_metric_to_grid", lambda: run.assign_metric_to_grid(
        metric_name="field", grid_name="plane", axes_ticks=GRID_TICKS, axes_labels=["x", "y"],
    ))
    ids["grid"] = (run._grids.get("plane") or {}).get("id")
    check("Run.log_metrics (grid)", lambda: run.log_metrics({"field": np.array(GRID_VALUES)}, step=0))
    check("Run.log_event", lambda: run.log_event("hello from every method", log_level="warning"))
    check("Run.update_metadata", lambda: run.update_metadata({"extra": {"k": 1}}))
    check("Run.update_tags", lambda: run.update_tags(["t2"]))
    check("Run.set_tags", lambda: run.set_tags(["t1", "t2", "t3"]))
    check("Run.save_file", lambda: run.save_file(input_file, category="input"))
    check("Run.save_object", lambda: run.save_object({"a": 1}, category="output", name="obj"))
    check("Run.save_directory", lambda: run.save_directory(outputs, category="output"))
    check("Run.save_all", lambda: run.save_all([input_file], category="code"))
    check("Run.set_folder_details", lambda: run.set_folder_details(
        metadata={"owner": "me"}, tags=["ft"], description="the folder",
    ))
    threshold = check("Run.create_metric_threshold_alert", lambda: run.create_metric_threshold_alert(
        name="loss_high", metric="loss", threshold=10.0, rule="is above", frequency=1, window=1,
    ))
    check("Run.create_metric_range_alert", lambda: run.create_metric_range_alert(
        name="acc_range", metric="acc", range_low=0.0, range_high=1.0, rule="is outside range", frequency=1,
        window=1,
    ))
    check("Run.create_event_alert", lambda: run.create_event_alert(name="err_evt", pattern="ERROR", frequency=1))
    manual = check("Run.create_user_alert", lambda: run.create_user_alert(name="manual"))
    spare = check("Run.create_user_alert (not attached)", lambda: run.create_user_alert(
        name="spare", attach_to_run=False,
    ))
    other = check("Run.create_user_alert (to add by id)", lambda: run.create_user_alert(
        name="other", attach_to_run=False,
    ))
    ids["alerts"] = {"loss_high": threshold, "manual": manual, "spare": spare, "other": other}
    check("Run.add_alerts", lambda: run.add_alerts(names=["spare"]))
    check("Run.add_alerts (ids)", lambda: run.add_alerts(ids=[other]))
    check("Run.log_alert", lambda: run.log_alert(identifier=manual, state="critical"))
    check("Run.log_alert (by name)", lambda: run.log_alert(name="spare", state="ok"))
    finished = threading.Event()
    check("Run.add_process", lambda: run.add_process(
        "job", executable="bash", script=script, completion_trigger=finished,
    ))
    finished.wait(20)
    time.sleep(1.2)  # the dispatcher sends at most once a second
    check("Run.close", lambda: run.close())

    created = Run()
    check("Run.init (not running)", lambda: created.init(name="api-created", folder="/api/demo", running=False))
    ids["created_run"] = created.id
    reconnected = Run()
    check("Run.reconnect", lambda: reconnected.reconnect(created.id))
    check("Run.log_metrics (reconnected)", lambda: reconnected.log_metrics({"loss": 1.0}))
    time.sleep(1.2)
    check("Run.set_status", lambda: reconnected.set_status("terminated"))
    check("Run.close (reconnected)", lambda: reconnected.close())

    killed = Run()
    killed.config(disable_resources_metrics=True)
    killed.init(name="api-killed", folder="/api/demo")
    ids["killed_run"] = killed.id
    check("Run.add_process (to kill)", lambda: killed.add_process("sleeper", "sleep", "30"))
    check("Run.add_process (to kill too)", lambda: killed.add_process("sleeper2", "sleep", "30"))
    check("Run.kill_process", lambda: killed.kill_process("sleeper"))
    check("Run.kill_all_processes", lambda: killed.kill_all_processes())
    # The upstream client marks a run whose process failed as failed, then exits non-zero.
    check("Run.close (killed processes)", lambda: killed.close())


def drive_client(workdir: pathlib.Path) -> None:
    """Every public method of ``simvue.Client``, on what ``drive_run`` left on the server."""
    client = Client()
    run_id = ids["run"]
    check("Client.get_run_id_from_name", lambda: client.get_run_id_from_name("api-run"))
    check("Client.get_run_name_from_id", lambda: client.get_run_name_from_id(run_id))
    read_properties("Client.get_run()", check("Client.get_run", lambda: client.get_run(run_id)))
    listed = check("Client.get_runs", lambda: client.get_runs(["name == api-run"]))
    for _, run in listed or []:
        read_properties("Client.get_runs()[0]", run)
    check("Client.get_runs (dict)", lambda: client.get_runs(
        ["folder.path == /api/demo"], output_format="dict", metadata=True, metrics=True, alerts=True,
        system_info=True, timing_info=True, sort_by_columns=[("created", False)],
    ))
    check("Client.get_runs (dataframe)", lambda: client.get_runs(None, output_format="dataframe", count_limit=10))
    check("Client.get_metrics_names", lambda: client.get_metrics_names(run_id))
    check("Client.get_metric_values", lambda: client.get_metric_values(["loss", "acc"], "step", run_ids=[run_id]))
    check("Client.get_metric_values (dataframe)", lambda: client.get_metric_values(
        ["loss"], "time", run_ids=[run_id], output_format="dataframe",
    ))
    check("Client.get_metric_values (filters, names)", lambda: client.get_metric_values(
        ["loss"], "step", run_filters=["name == api-run"], use_run_names=True,
    ))
    check("Client.get_metric_values (aggregate)", lambda: client.get_metric_values(
        ["loss"], "step", run_ids=[run_id], aggregate=True,
    ))
    check("Client.plot_metrics", lambda: client.plot_metrics([run_id], ["loss"], "step"))
    check("Client.get_events", lambda: client.get_events(run_id))
    check("Client.get_events (filtered)", lambda: client.get_events(
        run_id, message_contains="every", start_index=0, count_limit=5,
    ))
    check("Client.get_alerts", lambda: client.get_alerts(run_id=run_id))
    check("Client.get_alerts (all of the run)", lambda: client.get_alerts(run_id=run_id, critical_only=False))
    details = check("Client.get_alerts (details)", lambda: client.get_alerts(
        run_id=run_id, critical_only=False, names_only=False,
    ))
    for alert in details or []:
        read_properties(f"Client.get_alerts()[{alert.name}]", alert)
    check("Client.get_alerts (every alert)", lambda: client.get_alerts(
        critical_only=False, sort_by_columns=[("name", False)],
    ))
    artifacts = check("Client.list_artifacts", lambda: client.list_artifacts(run_id))
    for _, artifact in artifacts or []:
        read_properties(f"Client.list_artifacts()[{artifact.name}]", artifact)
    check("Client.get_artifact", lambda: client.get_artifact(run_id, "obj"))
    single = workdir / "single"
    single.mkdir()
    check("Client.get_artifact_as_file", lambda: client.get_artifact_as_file(run_id, "input.txt", output_dir=single))
    check("Client.get_artifact_as_file (content)", lambda: (single / "input.txt").read_text())
    every = workdir / "every"
    every.mkdir()
    check("Client.get_artifacts_as_files", lambda: client.get_artifacts_as_files(run_id, output_dir=every))
    check("Client.get_artifacts_as_files (files)", lambda: sorted(
        str(path.relative_to(every)) for path in every.rglob("*") if path.is_file()
    ))
    read_properties("Client.get_folder()", check("Client.get_folder", lambda: client.get_folder("/api/demo")))
    folders = check("Client.get_folders", lambda: client.get_folders(filters=["path == /api/demo"]))
    for _, folder in folders or []:
        read_properties("Client.get_folders()[0]", folder)
    tags = check("Client.get_tags", lambda: client.get_tags())
    tag_ids = {tag.name: tag_id for tag_id, tag in tags or []}
    for _, tag in tags or []:
        read_properties(f"Client.get_tags()[{tag.name}]", tag)
    ids["tags"] = tag_ids
    read_properties("Client.get_tag()", check("Client.get_tag", lambda: client.get_tag(tag_ids["t3"])))
    check("Client.delete_tag", lambda: client.delete_tag(tag_ids["t1"]))
    check("Client.abort_run", lambda: client.abort_run(ids["created_run"], reason="enough"))
    check("Client.delete_alert", lambda: client.delete_alert(ids["alerts"]["other"]))
    check("Client.delete_run", lambda: client.delete_run(ids["killed_run"]))

    for name, folder in (("doomed-1", "/api/doomed/inner"), ("doomed-2", "/api/doomed/inner"),
                         ("doomed-3", "/api/doomed/other")):
        doomed = Run()
        doomed.config(disable_resources_metrics=True)
        doomed.init(name=name, folder=folder)
        doomed.close()
        ids.setdefault("doomed", []).append(doomed.id)
    check("Client.delete_runs", lambda: client.delete_runs("/api/doomed/inner"))
    check("Client.delete_folder", lambda: client.delete_folder("/api/doomed", recursive=True, remove_runs=True))
    check("Client.get_folder (deleted)", lambda: client.get_folder("/api/doomed"))
    check("Client.delete_folder (missing)", lambda: client.delete_folder("/api/never", allow_missing=True))


def read_grid() -> None:
    """What the run's tensor metric looks like through the upstream grid objects."""
    if not ids.get("grid"):
        return
    grid = Grid(identifier=ids["grid"])
    check("Grid.grid", lambda: grid.grid)
    check("Grid.name", lambda: grid.name)
    check("Grid.get_run_metric_values", lambda: grid.get_run_metric_values(
        run_id=ids["run"], metric_name="field", step=0,
    ))
    check("Grid.get_run_metric_span", lambda: grid.get_run_metric_span(run_id=ids["run"], metric_name="field"))
    check("GridMetrics.get", lambda: GridMetrics.get(runs=[ids["run"]], metrics=["field"], step=0))


def main() -> None:
    workdir = pathlib.Path.cwd()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    drive_run(workdir)
    read_grid()
    drive_client(workdir)
    print(json.dumps({
        "version": importlib.metadata.version("simvue"),
        "public": {"Client": public(Client), "Run": public(Run)},
        "results": results,
        "ids": ids,
    }))


if __name__ == "__main__":
    main()
