"""The aggregator's own costs at thousands of ranks, without the ranks: its state machine
driven by simulated senders on simulated nodes, in this one process.

    python bench/many_senders.py                     # 1,000 and 10,000 senders on 100 nodes
    python bench/many_senders.py --senders 2000 --seconds 5

Each simulated sender says HELLO (with its own host name, ``--nodes`` of them), then for
``--seconds`` of simulated time sends what a rank logging 1,000 points a second sends: one
DATA message a second holding 250 ``log_metrics`` calls of 4 values (packed into columns, as
a sender's thread packs them), or a HEARTBEAT when idle.  Messages are encoded, signed and decoded as on the wire (``protocol.encode`` on the
sender's side, not timed; ``protocol.decode`` and ``AggregatorState.receive`` timed), and the
state is ticked and its batches taken as the aggregator's thread would.  The clock is
simulated, so the numbers are CPU time per unit of work:

* memory per sender (the state's Python objects, ``tracemalloc``);
* a heartbeat's cost, and the heartbeats a second that take a whole core;
* decode + ingest per point, namespaced (``rank<k>/...``) and reduced (``reduce="*": mean``,
  one reduced step over every sender);
* rank 0's inbound bandwidth at 1,000 points a second per rank.

Sockets are not part of it: with today's one connection per rank, rank 0 also holds one TCP
connection (one file) per rank (docs/mpi.md, "Large jobs").
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tempfile  # noqa: E402

from simvue.abort import AbortSignal  # noqa: E402
from simvue.aggregator.state import AggregatorState  # noqa: E402
from simvue.config import Settings  # noqa: E402
from simvue.store.blobs import BlobStore  # noqa: E402
from simvue.transport import protocol  # noqa: E402
from simvue.transport.columns import to_columns  # noqa: E402
from simvue.transport.protocol import MessageKind, RecordKind  # noqa: E402

KEY = b"k" * 32
CALLS_PER_SECOND = 250  # x 4 values: 1,000 points a second per rank
WALL0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return WALL0 + self.t


def new_state(senders: int, reduce: dict, blobs: Path, clock: Clock) -> AggregatorState:
    settings = Settings(sender_timeout_s=120.0, resources_interval_s=0.0, reduce_wait_s=10.0).replace(reduce=reduce)
    return AggregatorState(
        run={"name": "many", "id": "run-id", "started": WALL0}, settings=settings,
        local={"role": "rank", "rank": 0, "pid": 1, "host": "node0"}, expected_ranks=senders + 1,
        namespace_ranks=True, blobs=BlobStore(blobs), abort=AbortSignal(), clock=clock,
    )


def frames(kind: MessageKind, seq: int, body) -> list[bytes]:
    return protocol.encode(KEY, kind, seq, body)


def deliver(state: AggregatorState, sender: bytes, message_frames: list[bytes]) -> None:
    state.receive(sender, protocol.decode(KEY, message_frames))


def hello_all(state: AggregatorState, ids: list[bytes], nodes: int) -> None:
    for rank, sender in enumerate(ids, start=1):
        hello = {"role": "rank", "rank": rank, "size": len(ids) + 1, "pid": 10_000 + rank,
                 "host": f"node{rank % nodes}", "created": 1.0, "pid_namespace": f"boot{rank % nodes}/1"}
        deliver(state, sender, frames(MessageKind.HELLO, 1, hello))


def one_second(ids: list[bytes], clock: Clock, second: int, step: int) -> list[list[bytes]]:
    """What every sender sends in simulated second ``second``: one DATA message each, its
    records packed into columns as a sender's thread packs them."""
    return [
        frames(MessageKind.DATA, 1 + second, to_columns([
            (RecordKind.METRICS, step + i, clock.t, clock.time(),
             {"loss": 1.0 / (k + 1), "energy": float(i), "dt": 1e-3, "residual": 1e-6})
            for i in range(CALLS_PER_SECOND)
        ]))
        for k in range(len(ids))
    ]


def memory_per_sender(senders: int, nodes: int, reduce: dict) -> float:
    """The state's memory per sender once every sender has joined and logged for a second
    (its batch taken, as after a commit)."""
    clock = Clock()
    ids = [f"s{k:06d}".encode() for k in range(senders)]
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        state = new_state(senders, reduce, Path(tmp), clock)
        hello_all(state, ids, nodes)
        clock.t = 1.0
        for sender, message in zip(ids, one_second(ids, clock, 1, 0)):
            deliver(state, sender, message)
        state.tick()
        state.take_batch()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        del state
    return used / senders


def run(senders: int, nodes: int, seconds: int, reduce: dict) -> dict:
    clock = Clock()
    ids = [f"s{k:06d}".encode() for k in range(senders)]
    with tempfile.TemporaryDirectory() as tmp:
        state = new_state(senders, reduce, Path(tmp), clock)
        hello_all(state, ids, nodes)
        state.take_batch()
        heartbeat = [frames(MessageKind.HEARTBEAT, 1, None) for _ in ids]
        started = time.process_time()
        for sender, message in zip(ids, heartbeat):
            deliver(state, sender, message)
        heartbeat_ns = (time.process_time() - started) / senders * 1e9
        data_cpu = 0.0
        points = wire_bytes = 0
        for second in range(1, seconds + 1):
            clock.t = float(second)
            encoded = one_second(ids, clock, second, (second - 1) * CALLS_PER_SECOND)
            wire_bytes += sum(len(f) for message in encoded for f in message)
            started = time.process_time()
            for sender, message in zip(ids, encoded):
                deliver(state, sender, message)
            state.tick()
            state.take_batch()
            data_cpu += time.process_time() - started
            points += senders * CALLS_PER_SECOND * 4
        return {"heartbeat_ns": heartbeat_ns, "ns_per_point": data_cpu / points * 1e9, "bytes_per_point": wire_bytes / points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", default="1000,10000")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=3, help="simulated seconds of logging")
    args = parser.parse_args()
    print(f"simulated senders on {args.nodes} nodes, each logging {CALLS_PER_SECOND * 4:,} points/s "
          f"({CALLS_PER_SECOND} calls of 4 values), {args.seconds} simulated s\n")
    print("| senders | state memory per sender | heartbeat, CPU | heartbeats/s a core takes | decode + ingest, namespaced |"
          " decode + ingest, reduced (mean) | aggregator CPU at 1 k points/s per rank | inbound bytes/s at 1 k points/s per rank |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for senders in (int(n) for n in args.senders.split(",")):
        plain = run(senders, args.nodes, args.seconds, {})
        memory = memory_per_sender(senders, args.nodes, {})
        reduced = run(senders, args.nodes, args.seconds, {"*": ("mean",)})
        load = plain["ns_per_point"] * 1e-9 * senders * 1000
        print(f"| {senders:,} | {memory / 1024:.1f} KiB | {plain['heartbeat_ns'] / 1e3:.1f} µs |"
              f" {1e9 / plain['heartbeat_ns']:,.0f} | {plain['ns_per_point']:.0f} ns/point |"
              f" {reduced['ns_per_point']:.0f} ns/point | {load:.1f} cores |"
              f" {plain['bytes_per_point'] * senders * 1000 / 1e6:.0f} MB/s |")


if __name__ == "__main__":
    main()
