"""``simvue spill``: see and import the records processes could not deliver.

    simvue spill list                     the spill files in the store, with their run and size
    simvue spill import [FILE ...]        add their records to their runs (default: every file)

The aggregator's own spill (``*.store-batches``: batches the store refused, see
``aggregator.writer``) is imported batch by batch, each at most once.

A process's spill file (``transport/spill.py``) names its run and the process that wrote it.  Import
puts its records through the same merge as the live aggregator (``AggregatorState``), as
that process (``rank1/x``, ``[rank1] message``), one store transaction per spilled message,
and skips:

* messages the run already holds: those with a sequence number up to the one the
  aggregator committed for that process (``simvue.processes.<label>.last_seq``);
* messages already imported: each is applied at most once (the store's ``applied_keys``),
  so importing a file twice, or after a partial import, adds nothing twice.

Metrics that were reduced across ranks in the live run are imported under the process's
own name (``rank1/loss``): the reduced steps were already written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ..abort import AbortSignal
from ..aggregator.state import AggregatorState
from ..config import Settings
from ..store import SPILL_DIRECTORY, STORE_SPILL_SUFFIX, RunNotFound, Store
from ..store.sqlite import read_spilled_batches
from ..transport import spill
from ..transport.columns import record_count
from ..transport.protocol import MessageKind


@dataclasses.dataclass
class Imported:
    path: Path
    run: str
    label: str
    records: int = 0  # added to the run now
    messages: int = 0  # spilled messages added now
    already: int = 0  # spilled messages the run already held
    unreadable: int = 0  # entries written in a protocol version this simvue cannot read (a later one's)


def add_spill_commands(commands: argparse._SubParsersAction) -> None:
    spills = commands.add_parser("spill", help="list or import records processes could not deliver")
    actions = spills.add_subparsers(title="spill commands")
    listing = actions.add_parser("list", help="the spill files of the store")
    listing.set_defaults(handler=_list)
    importing = actions.add_parser("import", help="add spilled records to their runs, without duplicates")
    importing.add_argument("files", nargs="*", type=Path, help="spill files (default: every one in the store)")
    importing.add_argument("--run", help="import into this run (name or id) instead of the one each file names")
    importing.add_argument("--remove", action="store_true", help="delete each file once it is imported")
    importing.set_defaults(handler=_import)


def spill_files(store: Store) -> list[Path]:
    """A process's spill files (``*.msgpack``) and the batches the store itself could not
    take (``*.store-batches``, ``aggregator.writer``)."""
    directory = store.directory / SPILL_DIRECTORY
    if not directory.is_dir():
        return []
    return sorted([*directory.glob("*.msgpack"), *directory.glob(f"*{STORE_SPILL_SUFFIX}")])


def import_store_batches(store: Store, path: Path, run_name: str | None = None) -> Imported:
    """Write the batches a run's writer spilled (the store refused them) into the store,
    each at most once."""
    result: Imported | None = None
    for index, (run_id, batch) in enumerate(read_spilled_batches(path)):
        run = store.run(run_name or run_id)
        result = result or Imported(path, run["name"], "the aggregator")
        if store.write(run["id"], batch, once_key=f"store-spill:{path.name}:{index}"):
            result.messages += 1
            result.records += batch.record_count
        else:
            result.already += 1
    if result is None:
        raise ValueError(f"{path} holds no spilled batch")
    return result


def header(path: Path) -> dict[str, Any]:
    """The body of a spill file's first entry (who wrote it, for which run)."""
    for kind, _, body in spill.read(path):
        if kind == MessageKind.HELLO and isinstance(body, dict):
            return body
        break
    raise ValueError(f"{path} is not a spill file (it does not start with its header)")


def import_file(store: Store, path: Path, run_name: str | None = None) -> Imported:
    """Add the records of spill file ``path`` to its run (or ``run_name``)."""
    head = header(path)
    run = store.run(run_name or head.get("run_id") or head.get("run_name") or "")
    hello: dict[str, Any] = head["hello"] if isinstance(head.get("hello"), dict) else {}
    label = head.get("label") or f"pid{hello.get('pid', 'unknown')}"
    sender = head.get("sender") or f"{path.name}"
    known = run["metadata"].get("simvue", {}).get("processes", {}).get(label, {})
    held = known.get("last_seq", 0) if known.get("sender") == head.get("sender") else 0
    state = AggregatorState(
        run={"name": run["name"], "id": run["id"], "started": run["started"] or run["created"]},
        settings=Settings(resources_interval_s=0),
        local=hello,
        local_label=label,
        expected_ranks=1,
        namespace_ranks=True,
        blobs=store.blobs,
        abort=AbortSignal(),
    )
    state.continue_resource_steps(_next_resource_steps(store, run["id"]))
    state.take_batch()  # its opening batch describes the process as live: not for a run that has ended
    result = Imported(path, run["name"], label)
    unreadable: Counter[Any] = Counter()
    for key, records in _messages(path, sender, held, unreadable):
        if key is None:
            result.already += 1
            continue
        state.local_records(records)
        batch = state.take_batch()
        batch.heartbeat = None  # an import is not a sign of life of the run
        if store.write(run["id"], batch, once_key=key):
            result.messages += 1
            result.records += record_count(records)
        else:
            result.already += 1
    result.unreadable = sum(unreadable.values())
    return result


def _messages(path: Path, sender: str, held: int, unreadable: Counter[Any]) -> Iterator[tuple[str | None, list]]:
    """Each spilled DATA message's records with its once-key; key None: the run holds it
    (its sequence number is at most ``held``, the last one the aggregator committed).
    Entries of a protocol version this simvue cannot read are counted in ``unreadable``."""
    never_sent = 0
    for kind, seq, body in spill.read(path, unreadable):
        if kind != MessageKind.DATA or not isinstance(body, list):
            continue
        if seq == 0:
            never_sent += 1
            yield f"spill:{sender}:unsent:{never_sent}", body
        elif seq <= held:
            yield None, body
        else:
            yield f"spill:{sender}:{seq}", body


def _next_resource_steps(store: Store, run_id: str) -> dict[str, int]:
    """For each host with resource series in the run, the step its next sample gets."""
    steps: dict[str, int] = {}
    for name in store.metric_names(run_id):
        parts = name.split("/")
        if len(parts) >= 4 and parts[0] == "resources" and parts[1] == "node":
            series = store.metric_series(run_id, name)["steps"]
            if series:
                steps[parts[2]] = max(steps.get(parts[2], 0), max(series) + 1)
    return steps


def _list(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    files = spill_files(store)
    if not files:
        out.write(f"no spill files in {store.directory / SPILL_DIRECTORY}\n")
        return 0
    for path in files:
        if path.name.endswith(STORE_SPILL_SUFFIX):
            batches = list(read_spilled_batches(path))
            out.write(f"{path.name}: {len(batches)} batches the store refused, "
                      f"{sum(b.record_count for _, b in batches)} records\n")
            continue
        try:
            head = header(path)
            records = sum(record_count(body) for kind, _, body in spill.read(path) if kind == MessageKind.DATA)
            out.write(f"{path.name}: run {head.get('run_name')!r}, {head.get('label')}, {records} records\n")
        except (OSError, ValueError) as exc:
            out.write(f"{path.name}: unreadable ({exc})\n")
    return 0


def _import(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    files = args.files or spill_files(store)
    failed = 0
    for path in files:
        try:
            importer = import_store_batches if path.name.endswith(STORE_SPILL_SUFFIX) else import_file
            result = importer(store, path, args.run)
        except (OSError, ValueError, RunNotFound) as exc:
            print(f"simvue: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        out.write(
            f"{path.name}: {result.records} records of {result.label} added to run {result.run!r}"
            f" ({result.messages} messages; {result.already} the run already held)\n"
        )
        if result.unreadable:
            print(
                f"simvue: {path}: {result.unreadable} entries were written by a later version of simvue (another"
                " message protocol) and were not imported; import the file with that version",
                file=sys.stderr,
            )
            failed += 1
            continue  # kept, even with --remove
        if args.remove:
            path.unlink()
    return 1 if failed else 0
