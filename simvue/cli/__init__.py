"""The ``simvue`` command: browse, export and send runs; run a server.

    simvue --version
    simvue runs list [--status S] [--folder F] [--json]
    simvue runs show NAME
    simvue export NAME [--format json|csv] [--what metrics|events|metadata] [--output FILE]
    simvue artifacts NAME [--get ARTIFACT --output FILE]
    simvue push [RUN ...]
    simvue spill list / simvue spill import [FILE ...]
    simvue server [...] / simvue server token [...]

``runs``, ``export`` and ``artifacts`` read from the configured server (``SIMVUE_URL``/
``SIMVUE_TOKEN`` or a config file) when there is one, else, or with ``--offline``, from the
local store: ``--store DIR`` (or ``$SIMVUE_STORE``), default ``./.simvue``.  ``--store`` and
``--offline`` go before or after the command.  NAME is a run's name (the newest run of that
name, said on standard error when others share it) or its id.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from .._util import nested
from .._version import __version__
from ..api import config as api_config
from ..api.connection import Connection, ServerError
from ..api.remote import RemoteStore
from ..client import alert_summary
from ..config import Settings
from ..errors import SimvueError
from ..server.cli import add_server_commands
from ..store import RunNotFound, Store
from ..store.sqlite import DATABASE_FILE
from ..validation import format_timestamp, optional_timestamp
from .progress import Progress, printable
from .push import add_push_command
from .spill import add_spill_commands

SHOWN_EVENTS = 10  # the last events runs show lists
NAMED_OTHERS = 3  # the other runs of a shared name the warning gives by id
LABEL_WIDTH = 13  # "description: "
CSV_TABLES = ("metrics", "events", "metadata")  # what export --format csv --what can hold


class CommandError(Exception):
    """A failure the command reports as one line (``simvue: ...``) and exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    if getattr(args, "standalone", False):
        return args.handler(args)
    try:
        server = api_config.resolve("offline" if args.offline or not getattr(args, "reads", False) else None)
    except SimvueError as exc:
        print(f"simvue: {exc}", file=sys.stderr)
        return 1
    if server.online:
        store: Store | RemoteStore = RemoteStore(Connection(server))
    else:
        directory = Path(args.store) if args.store else Settings().store_path()
        if not (directory / DATABASE_FILE).exists():
            print(f"simvue: no store at {directory} (run something first, or pass --store DIR)", file=sys.stderr)
            return 1
        store = Store(directory)
    try:
        return args.handler(store, args, sys.stdout)
    except RunNotFound as exc:
        print(f"simvue: {exc.args[0]}", file=sys.stderr)
        return 1
    except CommandError as exc:
        print(f"simvue: {exc}", file=sys.stderr)
        return 1
    except ServerError as exc:
        hint = " (--offline reads the local store instead)" if server.online else ""
        print(f"simvue: {exc}{hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        store.close()


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already says it or there is
    none to give (an unset option, a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


STORE_HELP = "store directory (default: $SIMVUE_STORE or ./.simvue)"
OFFLINE_HELP = "read the local store even if a server is configured (push and spill always use it)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simvue", description="Browse and export tracked runs.", formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--store", metavar="DIR", help=STORE_HELP)
    parser.add_argument("--offline", action="store_true", help=OFFLINE_HELP)
    commands = parser.add_subparsers(title="commands")

    runs = commands.add_parser("runs", help="list and inspect runs").add_subparsers(title="runs commands")
    listing = runs.add_parser("list", help="list runs, oldest first")
    listing.add_argument("--status", help="only runs with this status (default: any)")
    listing.add_argument("--folder", help="only runs in this folder or below (default: every folder)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_runs_list, reads=True)
    show = runs.add_parser("show", help="show one run: a summary, then its details")
    show.add_argument("name", help="run name or id")
    show.set_defaults(handler=_runs_show, reads=True)

    export = commands.add_parser("export", help="export a run as JSON or CSV")
    export.add_argument("name", help="run name or id")
    export.add_argument("--format", choices=("json", "csv"), default="json", help="output format")
    export.add_argument(
        "--what", choices=CSV_TABLES,
        help="the table a CSV export holds: metrics (metric,step,time,timestamp,value), events"
        " (timestamp,level,message, in time order) or metadata (key,value; nested keys joined by dots)"
        " (default: metrics)",
    )
    export.add_argument(
        "--output", "-o", metavar="FILE",
        help="file to write, replaced only once the export is complete (default: standard output)",
    )
    export.set_defaults(handler=_export, reads=True)

    artifacts = commands.add_parser("artifacts", help="list or download a run's artifacts")
    artifacts.add_argument("name", help="run name or id")
    artifacts.add_argument("--get", metavar="ARTIFACT", help="download this artifact, by name (default: list them)")
    artifacts.add_argument(
        "--output", "-o", metavar="FILE", help="file to write the artifact to (default: standard output)"
    )
    artifacts.add_argument("--json", action="store_true", help="list as JSON")
    artifacts.set_defaults(handler=_artifacts, reads=True)

    add_push_command(commands)
    add_spill_commands(commands)
    add_server_commands(commands)
    for command in _subcommands(parser):
        _accept_global_options(command)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below ``parser`` (``runs``, ``runs list``, ``spill import``, ...), once."""
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if id(command) not in seen:
                    seen.add(id(command))
                    yield command
                    yield from _subcommands(command)


def _accept_global_options(command: argparse.ArgumentParser) -> None:
    """``--store`` and ``--offline`` after ``command`` too, overriding only when given there.
    ``simvue server`` keeps its own options: it does not read a store."""
    if command.get_default("standalone"):
        return
    command.formatter_class = _HelpFormatter
    command.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=STORE_HELP)
    command.add_argument("--offline", action="store_true", default=argparse.SUPPRESS, help=OFFLINE_HELP)


# -- output ---------------------------------------------------------------------------------------


def _line(out: TextIO, label: str, value: Any) -> None:
    out.write(f"{label + ':':<{LABEL_WIDTH}}{printable(value)}".rstrip() + "\n")


def _table(out: TextIO, table: Sequence[tuple[str, ...]]) -> None:
    rows = [tuple(printable(cell) for cell in row) for row in table]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


@contextlib.contextmanager
def _output(name: str | None, out: TextIO, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Where an export goes: standard output, or file ``name``, which is replaced only once
    everything is written (a temporary file beside it, renamed), so a failed export creates
    or truncates nothing.  A device or pipe (``/dev/stdout``) is written directly."""
    if name is None:
        if binary:
            out.flush()
            yield sys.stdout.buffer
            sys.stdout.buffer.flush()
        else:
            yield out
        return
    encoding: dict[str, Any] = {} if binary else {"encoding": "utf-8", "newline": ""}
    if os.path.isdir(name):
        raise CommandError(f"cannot write {name}: it is a directory")
    if os.path.exists(name) and not os.path.isfile(name):
        try:
            device = open(name, "wb" if binary else "w", **encoding)
        except OSError as exc:
            raise CommandError(f"cannot write {name}: {exc.strerror or exc}") from None
        try:
            with device:
                yield device
        except OSError as exc:
            if exc.filename is not None:
                raise  # not a write to the output (a file the export reads)
            raise CommandError(f"cannot write {name}: {exc.strerror or exc}") from None
        return
    target = Path(os.path.realpath(name))  # through a link, to the file it names
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _new_file_mode()
    try:
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as exc:
        raise CommandError(f"cannot write {name}: {exc.strerror or exc}") from None
    try:
        try:
            with os.fdopen(descriptor, "wb" if binary else "w", **encoding) as stream:
                yield stream
        except OSError as exc:
            if exc.filename is not None:
                raise  # not a write to the output (a file the export reads)
            raise CommandError(f"cannot write {name}: {exc.strerror or exc}") from None
        try:
            os.chmod(temporary, mode)
            os.replace(temporary, target)
        except OSError as exc:
            raise CommandError(f"cannot write {name}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _new_file_mode() -> int:
    """The mode a new file gets here (what ``open(name, "w")`` would give it)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def _export_progress(store: Store | RemoteStore, run: dict[str, Any], args: argparse.Namespace) -> Progress:
    """Progress of an export, on standard error when that is a terminal and the export does
    not go to the same terminal."""
    to_terminal = args.output is None and sys.stdout.isatty()
    total = 0 if to_terminal else sum(store.metric_counts(run["id"]).values())
    return Progress(run["name"], total, sys.stderr)


# -- picking a run --------------------------------------------------------------------------------


def pick_run(store: Store | RemoteStore, name: str) -> dict[str, Any]:
    """The run ``name`` names (an id, or the newest run of that name); when other runs share
    the name, says so on standard error, with their ids."""
    run = store.run(name)
    if run["id"] == name:
        return run
    others = [other for other in store.runs() if other["name"] == run["name"] and other["id"] != run["id"]]
    if others:
        newest_first = [other["id"] for other in reversed(others)]
        listed = ", ".join(newest_first[:NAMED_OTHERS])
        if len(others) > NAMED_OTHERS:
            listed += f" and {len(others) - NAMED_OTHERS} more (simvue runs list shows them)"
        print(
            f"simvue: {len(others) + 1} runs are named {run['name']!r}; this is the newest (id {run['id']});"
            f" give an id instead of the name to pick another: {listed}",
            file=sys.stderr,
        )
    return run


# -- runs list / show -----------------------------------------------------------------------------


def _runs_list(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    runs = store.runs(status=args.status, folder=args.folder)
    if args.json:
        json.dump([_run_summary(run) for run in runs], out, indent=2)
        out.write("\n")
        return 0
    rows = [("NAME", "STATUS", "FOLDER", "CREATED", "ID")]
    rows += [
        (r["name"], r["status"], r["folder"], (optional_timestamp(r["created"]) or "")[:19], r["id"]) for r in runs
    ]
    _table(out, rows)
    return 0


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": run["name"],
        "id": run["id"],
        "status": run["status"],
        "folder": run["folder"],
        "tags": run["tags"],
        "created": optional_timestamp(run["created"]),
    }


def _runs_show(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    run = pick_run(store, args.name)
    counts = store.metric_counts(run["id"])
    events = sorted(store.events(run["id"]), key=lambda event: event["timestamp"])
    alerts = store.alerts(run["id"])
    artifacts = store.artifacts(run["id"])
    simvue_metadata = run["metadata"].get("simvue") if isinstance(run["metadata"].get("simvue"), dict) else {}

    # The summary: one screen, before the details.
    _line(out, "name", run["name"])
    _line(out, "id", run["id"])
    _line(out, "status", run["status"])
    _line(out, "duration", _run_duration(run))
    _line(out, "processes", _processes(simvue_metadata))
    points = sum(counts.values())
    _line(out, "data", f"{_count(points, 'point')} in {_count(len(counts), 'series', 'series')},"
                       f" {_count(len(events), 'event')}, {_count(len(alerts), 'alert')},"
                       f" {_count(len(artifacts), 'artifact')}")
    _line(out, "losses", _losses(simvue_metadata))
    _line(out, "folder", run["folder"])
    _line(out, "tags", ", ".join(run["tags"]))
    _line(out, "description", run["description"] or "")
    _line(out, "created", optional_timestamp(run["created"]))
    _line(out, "ended", optional_timestamp(run["ended"]) or "")
    if isinstance(store, Store):
        for upload in store.uploads():
            if upload["run_id"] == run["id"]:
                state = {"sent": "sent", "rejected": f"rejected: {upload['error']}"}.get(upload["state"], "not fully sent")
                _line(out, "server", f"{upload['server']} ({state}; remote id {upload['remote_id'] or '-'})")

    # The details.
    out.write("metadata:\n")
    for line in json.dumps(run["metadata"], indent=2, sort_keys=True).splitlines():
        out.write(f"  {line}\n")
    out.write(f"metrics ({len(counts)} series, {points} points):\n")
    for name, count in counts.items():
        series = store.metric_series(run["id"], name)
        out.write(f"  {printable(name)}: {count} points, last step {series['steps'][-1]} = {series['values'][-1]:g}\n")
    if alerts:
        out.write(f"alerts ({len(alerts)}):\n")
        for alert in alerts:
            fired = f", fired {optional_timestamp(alert['fired_at'])}" if alert["fired_at"] else ""
            out.write(f"  {printable(alert['name'])}: {alert['status']}{fired}\n")
    if not events:
        out.write("events: none\n")
    elif len(events) > SHOWN_EVENTS:
        out.write(f"events ({len(events)}, the last {SHOWN_EVENTS} in time order):\n")
    else:
        out.write(f"events ({len(events)}, in time order):\n")
    for event in events[-SHOWN_EVENTS:]:
        first_line = event["message"].splitlines()[0] if event["message"] else ""
        out.write(f"  {optional_timestamp(event['timestamp'])}  {event['level']:<7} {printable(first_line)}\n")
    return 0


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number:,} {singular if number == 1 else plural or singular + 's'}"


def _run_duration(run: dict[str, Any]) -> str:
    start = run["started"] or run["created"]
    if start is None:
        return "unknown"
    if run["ended"] is not None:
        return _duration(run["ended"] - start)
    if run["status"] in ("running", "created"):
        return f"{_duration(time.time() - start)} so far"
    if run.get("heartbeat"):
        return f"at least {_duration(run['heartbeat'] - start)} (its end was never recorded)"
    return "unknown (its end was never recorded)"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    if days:
        return f"{days} d {hour:02d} h"
    if hours:
        return f"{hours} h {minute:02d} min"
    return f"{minutes} min {second:02d} s"


def _processes(simvue_metadata: dict[str, Any]) -> str:
    """``4 ranks, 2 workers on 2 nodes (n1, n2); 1 lost`` from ``simvue.processes`` and
    ``simvue.hosts``."""
    processes = simvue_metadata.get("processes")
    processes = {k: v for k, v in processes.items() if isinstance(v, dict)} if isinstance(processes, dict) else {}
    if not processes:
        return "not recorded"
    roles = {"rank": 0, "process": 0, "worker": 0}
    states: dict[str, int] = {}
    nodes: set[str] = set()
    for process in processes.values():
        role = process.get("role") if process.get("role") in roles else "process"
        roles[role] += 1
        state = process.get("state")
        if isinstance(state, str) and state != "done":
            states[state] = states.get(state, 0) + 1
        if isinstance(process.get("host"), str):
            nodes.add(process["host"])
    hosts = simvue_metadata.get("hosts")
    if isinstance(hosts, dict):
        for node, facts in hosts.items():
            hostname = facts.get("hostname") if isinstance(facts, dict) else None
            nodes.add(hostname if isinstance(hostname, str) else str(node))
    kinds = ", ".join(
        _count(number, role, "processes" if role == "process" else None) for role, number in roles.items() if number
    )
    names = sorted(nodes)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    text = f"{kinds} on {_count(len(names), 'node')}" + (f" ({shown})" if names else "")
    if states:
        text += "; " + ", ".join(f"{number} {state}" for state, number in sorted(states.items()))
    return text


def _losses(simvue_metadata: dict[str, Any]) -> str:
    """What the run lost: records by reason (``simvue.losses``), processes declared lost
    (``simvue.lost``), calls ignored (``simvue.dropped_calls``); ``none``."""
    parts = []
    losses = simvue_metadata.get("losses")
    if isinstance(losses, dict):
        counted = {reason: n for reason, n in losses.items() if isinstance(n, int) and n > 0}
        if counted:
            reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(counted.items()))
            parts.append(f"{_count(sum(counted.values()), 'record')} ({reasons})")
    lost = simvue_metadata.get("lost")
    if isinstance(lost, dict):
        gone = [(label, reason) for label, reason in sorted(lost.items()) if reason is not None]
        if gone:
            listed = ", ".join(f"{label} ({reason})" for label, reason in gone[:4])
            more = f" and {len(gone) - 4} more" if len(gone) > 4 else ""
            parts.append(f"lost: {listed}{more}")
    dropped = simvue_metadata.get("dropped_calls")
    if isinstance(dropped, dict):
        calls = sum(
            n for counts in dropped.values() if isinstance(counts, dict)
            for n in counts.values() if isinstance(n, int)
        )
        if calls:
            parts.append(f"{_count(calls, 'bad call')} ignored")
    return "; ".join(parts) or "none"


# -- export ---------------------------------------------------------------------------------------


def export_run(
    store: Store | RemoteStore, name: str, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """One run as a JSON-ready document (the format of ``simvue export --format json``);
    ``progress`` is called with the points of each series read."""
    run = store.run(name)
    metrics = {}
    for metric in store.metric_names(run["id"]):
        series = store.metric_series(run["id"], metric)
        metrics[metric] = [list(point) for point in zip(series["steps"], series["times"], series["values"])]
        if progress:
            progress(len(series["values"]))
    grid_of = store.grid_metrics(run["id"])
    arrays = {}
    for metric, grid_id in grid_of.items():
        values = store.array_values(run["id"], metric)
        arrays[metric] = {
            "grid": grid_id,
            "values": [[v["step"], v["time"], nested(v["values"], v["shape"])] for v in values],
        }
    return {
        "name": run["name"],
        "id": run["id"],
        "status": run["status"],
        "folder": run["folder"],
        "description": run["description"],
        "tags": run["tags"],
        "metadata": run["metadata"],
        "system": run["system"],
        "options": run["options"],
        "created": optional_timestamp(run["created"]),
        "started": optional_timestamp(run["started"]),
        "ended": optional_timestamp(run["ended"]),
        "folder_details": store.folder(run["folder"]),
        "alerts": [alert_summary(alert) for alert in store.alerts(run["id"])],
        "events": [
            {"message": e["message"], "timestamp": optional_timestamp(e["timestamp"]), "level": e["level"]}
            for e in store.events(run["id"])
        ],
        "metrics": metrics,
        "grids": store.grids(run["id"]),
        "arrays": arrays,
        "artifacts": [
            {key: artifact[key] for key in ("name", "category", "size", "checksum", "mime_type")}
            for artifact in store.artifacts(run["id"])
        ],
    }


def _export(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.what is not None and args.format != "csv":
        print("simvue: --what chooses a CSV table; the JSON export holds the whole run", file=sys.stderr)
        return 2
    run = pick_run(store, args.name)
    with _output(args.output, out) as target:
        if args.format == "json":
            progress = _export_progress(store, run, args)
            json.dump(export_run(store, run["id"], progress.add), target, indent=1)
            target.write("\n")
            progress.done()
        elif args.what == "events":
            _events_csv(store, run, csv.writer(target))
        elif args.what == "metadata":
            _metadata_csv(run, csv.writer(target))
        else:
            _metrics_csv(store, run, csv.writer(target), _export_progress(store, run, args))
    return 0


def _metrics_csv(store: Store | RemoteStore, run: dict[str, Any], writer: Any, progress: Progress) -> None:
    writer.writerow(["metric", "step", "time", "timestamp", "value"])
    for metric in store.metric_names(run["id"]):
        series = store.metric_series(run["id"], metric)
        for step, t, ts, value in zip(series["steps"], series["times"], series["timestamps"], series["values"]):
            writer.writerow([metric, step, repr(t), format_timestamp(ts), repr(value)])
        progress.add(len(series["values"]))
    progress.done()


def _events_csv(store: Store | RemoteStore, run: dict[str, Any], writer: Any) -> None:
    writer.writerow(["timestamp", "level", "message"])
    for event in sorted(store.events(run["id"]), key=lambda event: event["timestamp"]):
        writer.writerow([format_timestamp(event["timestamp"]), event["level"], event["message"]])


def _metadata_csv(run: dict[str, Any], writer: Any) -> None:
    writer.writerow(["key", "value"])
    writer.writerows(_flattened(run["metadata"]))


def _flattened(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(key, value)`` rows of a metadata tree: nested keys joined by dots, text as it is,
    anything else as JSON."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _flattened(inner, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# -- artifacts ------------------------------------------------------------------------------------


def _artifacts(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    run = pick_run(store, args.name)
    if args.get is None:
        artifacts = store.artifacts(run["id"])
        if args.json:
            json.dump(artifacts, out, indent=1)
            out.write("\n")
            return 0
        rows = [("NAME", "CATEGORY", "SIZE", "MIME TYPE", "SHA256")]
        rows += [(a["name"], a["category"], str(a["size"]), a["mime_type"], a["checksum"][:16]) for a in artifacts]
        _table(out, rows)
        return 0
    try:
        content = store.artifact_bytes(run["id"], args.get)
    except KeyError:
        print(f"simvue: run {run['name']!r} has no artifact named {args.get!r}", file=sys.stderr)
        return 1
    with _output(args.output, out, binary=True) as target:
        target.write(content)
    return 0
