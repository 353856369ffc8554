"""The ``simvue`` command: browse, export and send runs; run a server.

    simvue runs list [--status S] [--folder F] [--json]
    simvue runs show NAME
    simvue export NAME [--format json|csv] [--output FILE]
    simvue artifacts NAME [--get ARTIFACT --output FILE]
    simvue push [RUN ...]
    simvue spill list / simvue spill import [FILE ...]
    simvue server [...] / simvue server token [...]

``runs`` and ``export`` read from the configured server (``SIMVUE_URL``/``SIMVUE_TOKEN`` or a
config file) when there is one, else, or with ``--offline``, from the local store:
``--store DIR`` (or ``$SIMVUE_STORE``), default ``./.simvue``.  NAME is a run's name (the
newest run of that name) or its id.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

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
from .push import add_push_command
from .spill import add_spill_commands


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
    except ServerError as exc:
        hint = " (--offline reads the local store instead)" if server.online else ""
        print(f"simvue: {exc}{hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        store.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simvue", description="Browse and export tracked runs.")
    parser.add_argument("--store", help="store directory (default: $SIMVUE_STORE or ./.simvue)")
    offline_help = "read the local store even if a server is configured"
    parser.add_argument("--offline", action="store_true", help=offline_help)
    # Accepted after the command too (simvue runs list --offline), without overriding the above.
    reads = argparse.ArgumentParser(add_help=False)
    reads.add_argument("--offline", action="store_true", default=argparse.SUPPRESS, help=offline_help)
    commands = parser.add_subparsers(title="commands")

    runs = commands.add_parser("runs", help="list and inspect runs").add_subparsers(title="runs commands")
    listing = runs.add_parser("list", help="list runs, oldest first", parents=[reads])
    listing.add_argument("--status", help="only runs with this status")
    listing.add_argument("--folder", help="only runs in this folder or below")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_runs_list, reads=True)
    show = runs.add_parser("show", help="show one run", parents=[reads])
    show.add_argument("name", help="run name or id")
    show.set_defaults(handler=_runs_show, reads=True)

    export = commands.add_parser("export", help="export a run as JSON or CSV", parents=[reads])
    export.add_argument("name", help="run name or id")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.set_defaults(handler=_export, reads=True)

    artifacts = commands.add_parser("artifacts", help="list or download a run's artifacts", parents=[reads])
    artifacts.add_argument("name", help="run name or id")
    artifacts.add_argument("--get", metavar="ARTIFACT", help="download this artifact (its name)")
    artifacts.add_argument("--output", "-o", help="file to write it to (default: standard output)")
    artifacts.add_argument("--json", action="store_true", help="list as JSON")
    artifacts.set_defaults(handler=_artifacts, reads=True)

    add_push_command(commands)
    add_spill_commands(commands)
    add_server_commands(commands)
    return parser


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
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
    run = store.run(args.name)
    counts = store.metric_counts(run["id"])
    events = store.events(run["id"])
    out.write(f"name:        {run['name']}\n")
    out.write(f"id:          {run['id']}\n")
    out.write(f"status:      {run['status']}\n")
    out.write(f"folder:      {run['folder']}\n")
    out.write(f"description: {run['description'] or ''}\n")
    out.write(f"tags:        {', '.join(run['tags'])}\n")
    out.write(f"created:     {optional_timestamp(run['created'])}\n")
    out.write(f"ended:       {optional_timestamp(run['ended']) or ''}\n")
    if isinstance(store, Store):
        for upload in store.uploads():
            if upload["run_id"] == run["id"]:
                state = {"sent": "sent", "rejected": f"rejected: {upload['error']}"}.get(upload["state"], "not fully sent")
                out.write(f"server:      {upload['server']} ({state}; remote id {upload['remote_id'] or '-'})\n")
    out.write("metadata:\n")
    for line in json.dumps(run["metadata"], indent=2, sort_keys=True).splitlines():
        out.write(f"  {line}\n")
    out.write(f"metrics ({len(counts)} series, {sum(counts.values())} points):\n")
    for name, count in counts.items():
        series = store.metric_series(run["id"], name)
        out.write(f"  {name}: {count} points, last step {series['steps'][-1]} = {series['values'][-1]:g}\n")
    alerts = store.alerts(run["id"])
    if alerts:
        out.write(f"alerts ({len(alerts)}):\n")
        for alert in alerts:
            fired = f", fired {optional_timestamp(alert['fired_at'])}" if alert["fired_at"] else ""
            out.write(f"  {alert['name']}: {alert['status']}{fired}\n")
    out.write(f"events ({len(events)}):\n")
    for event in events[-10:]:
        first_line = event["message"].splitlines()[0] if event["message"] else ""
        out.write(f"  {optional_timestamp(event['timestamp'])}  {event['level']:<7} {first_line}\n")
    return 0


def export_run(store: Store, name: str) -> dict[str, Any]:
    """One run as a JSON-ready document (the format of ``simvue export --format json``)."""
    run = store.run(name)
    metrics = {}
    for metric in store.metric_names(run["id"]):
        series = store.metric_series(run["id"], metric)
        metrics[metric] = [list(point) for point in zip(series["steps"], series["times"], series["values"])]
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
        "artifacts": [
            {key: artifact[key] for key in ("name", "category", "size", "checksum", "mime_type")}
            for artifact in store.artifacts(run["id"])
        ],
    }


def _artifacts(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    run = store.run(args.name)
    if args.get is None:
        artifacts = store.artifacts(run["id"])
        if args.json:
            json.dump(artifacts, out, indent=1)
            out.write("\n")
            return 0
        rows = [("NAME", "CATEGORY", "SIZE", "MIME TYPE", "SHA256")]
        rows += [(a["name"], a["category"], str(a["size"]), a["mime_type"], a["checksum"][:16]) for a in artifacts]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
        return 0
    try:
        content = store.artifact_bytes(run["id"], args.get)
    except KeyError:
        print(f"simvue: run {run['name']!r} has no artifact named {args.get!r}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_bytes(content)
    else:
        out.flush()
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
    return 0


def _export(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    target = open(args.output, "w", newline="") if args.output else out
    try:
        if args.format == "json":
            json.dump(export_run(store, args.name), target, indent=1)
            target.write("\n")
        else:
            run = store.run(args.name)
            writer = csv.writer(target)
            writer.writerow(["metric", "step", "time", "timestamp", "value"])
            for metric in store.metric_names(run["id"]):
                series = store.metric_series(run["id"], metric)
                for step, t, ts, value in zip(series["steps"], series["times"], series["timestamps"], series["values"]):
                    writer.writerow([metric, step, repr(t), format_timestamp(ts), repr(value)])
    finally:
        if args.output:
            target.close()
    return 0
