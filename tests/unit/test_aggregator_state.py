"""The aggregator's state machine over simulated hours: an injected clock, messages as a
sender would send them, and the store batches it hands out, with no socket, thread or
sleep.  A 10-hour, 64-rank run takes well under a second here."""

from __future__ import annotations

import math
import sys
from collections import Counter

import pytest

from simvue.abort import AbortSignal
from simvue.aggregator.instructions import Reply, SampleHere
from simvue.aggregator.senders import GONE_GRACE_S, LIVE
from simvue.aggregator.state import RUN_HEARTBEAT_INTERVAL_S, AggregatorState
from simvue.config import Settings
from simvue.store.blobs import BlobStore
from simvue.transport.protocol import MAX_COLUMN_ROWS, Message, MessageKind, RecordKind

HOUR = 3600.0
TIMEOUT_S = 120.0
WALL0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return WALL0 + self.t


class Sim:
    """A run's aggregator state and what it wrote, driven by hand."""

    def __init__(self, tmp_path, *, ranks: int = 64, hosted: bool = False, **settings) -> None:
        self.clock = FakeClock()
        self.abort = AbortSignal()
        self.settings = Settings(sender_timeout_s=TIMEOUT_S, resources_interval_s=0.0).replace(**settings)
        self.state = AggregatorState(
            run={"name": "sim", "id": "run-id", "started": WALL0},
            settings=self.settings,
            # hosted: the aggregator runs in a process of its own, and rank 0 is a sender
            local={"role": "host" if hosted else "rank", "rank": 0, "pid": 1000, "host": "node0",
                   "pid_namespace": "boot0/1"},
            expected_ranks=ranks,
            namespace_ranks=ranks > 1,
            blobs=BlobStore(tmp_path / "blobs"),
            abort=self.abort,
            clock=self.clock,
        )
        self.seq: Counter[bytes] = Counter()
        self.points: Counter[str] = Counter()
        self.events: list[tuple[float, str, str]] = []
        self.metadata: dict = {}
        self.statuses: list[str] = []
        self.heartbeats: list[float] = []
        self.replies: list = []

    # -- what senders do ------------------------------------------------------------------

    def send(self, sender: bytes, kind: MessageKind, body=None, *, new_seq: bool = True):
        if new_seq:
            self.seq[sender] += 1
        out = self.state.receive(sender, Message(kind, self.seq[sender], body))
        self.replies.extend(out)
        return out

    def hello(self, rank: int | None, host: str = "node0", role: str = "rank", **extra) -> bytes:
        sender = f"rank{rank}".encode() if rank is not None else f"w{len(self.seq)}".encode()
        self.send(sender, MessageKind.HELLO, {"role": role, "rank": rank, "pid": 2000 + len(self.seq), "host": host,
                                              "created": 1.0, "pid_namespace": f"boot{host[-1]}/1", **extra})
        return sender

    def log(self, sender: bytes, step: int, values: dict) -> None:
        record = [RecordKind.METRICS, step, self.clock.t, self.clock.time(), values]
        self.send(sender, MessageKind.DATA, [record])

    def heartbeat(self, sender: bytes) -> None:
        self.send(sender, MessageKind.HEARTBEAT, new_seq=False)

    def bye(self, sender: bytes, status=None) -> None:
        self.send(sender, MessageKind.BYE, {"status": status, "dropped": {}})

    # -- what the shell does --------------------------------------------------------------

    def advance(self, seconds: float, tick_every_s: float = 5.0, *, alive: tuple[bytes, ...] = ()) -> None:
        """Let time pass, ticking and committing as the shell would (coarser ticks); the
        ``alive`` senders send a heartbeat every 30 s, as an idle sender does."""
        start, ticks = self.clock.t, max(1, round(seconds / tick_every_s))
        for k in range(1, ticks + 1):
            self.clock.t = start + k * tick_every_s  # no drift from adding up steps
            if alive and int((self.clock.t - tick_every_s) // 30) != int(self.clock.t // 30):
                for sender in alive:
                    self.heartbeat(sender)
            self.replies.extend(self.state.tick())
            self.commit()

    def commit(self, batch=None) -> None:
        batch = batch or self.state.take_batch()
        for name, chunk in batch.metrics.items():
            self.points[name] += len(chunk)
        self.events.extend(batch.events)
        if batch.metadata:
            from simvue._util import merge_dicts

            merge_dicts(self.metadata, batch.metadata)
        if batch.status:
            self.statuses.append(batch.status)
        if batch.heartbeat:
            self.heartbeats.append(batch.heartbeat)

    def finish(self) -> str:
        self.replies.extend(self.state.close_local(None))
        self.commit(self.state.finish())
        return self.state.final_status

    def lost_events(self) -> list[str]:
        return [message for _, message, _ in self.events if " lost: " in message]


def test_a_ten_hour_run_of_64_ranks_that_log_in_bursts_and_idle_ends_completed(tmp_path):
    """Every hour each rank logs a burst of 100 steps in a minute, then idles, sending only
    heartbeats every 30 s (a quarter of the timeout).  Rank 0 (the aggregator's own process)
    logs with its burst and is otherwise silent for hours: it is not a sender, it cannot
    go silent."""
    sim = Sim(tmp_path)
    senders = [sim.hello(rank) for rank in range(1, 64)]
    step = 0
    for hour in range(10):
        for _ in range(100):
            sim.clock.t += 0.6
            for sender in senders:
                sim.log(sender, step, {"loss": 1.0 / (step + 1), "energy": float(step)})
            sim.state.local_records([(RecordKind.METRICS, step, sim.clock.t, sim.clock.time(), {"loss": 0.5})])
            sim.commit()
            step += 1
        sim.advance((hour + 1) * HOUR - sim.clock.t, alive=tuple(senders))
    assert sim.clock.t == pytest.approx(10 * HOUR)
    assert sim.lost_events() == []
    assert all(state.presence == LIVE for state in sim.state.table.by_id.values())
    assert sim.state.table.local.presence == LIVE
    for sender in senders:
        sim.bye(sender, "completed")
    assert sim.finish() == "completed"
    assert sim.statuses[-1] == "completed"
    assert sim.points["rank0/loss"] == 1000
    for rank in range(1, 64):
        assert sim.points[f"rank{rank}/loss"] == 1000 and sim.points[f"rank{rank}/energy"] == 1000
    assert sum(sim.points.values()) == 1000 + 63 * 2000
    processes = sim.metadata["simvue"]["processes"]
    assert len(processes) == 64 and {p["state"] for p in processes.values()} == {"done"}
    assert "losses" not in sim.metadata["simvue"] and "lost" not in sim.metadata["simvue"]
    # The run's heartbeat in the store was refreshed all along (at most one interval apart
    # between the shell's commits, here one every 5 simulated seconds).
    gaps = [b - a for a, b in zip(sim.heartbeats, sim.heartbeats[1:])]
    assert len(sim.heartbeats) > 7000 and max(gaps) <= 5.0 + RUN_HEARTBEAT_INTERVAL_S


def test_a_rank_that_goes_silent_is_lost_at_its_timeout_and_no_sooner(tmp_path):
    sim = Sim(tmp_path, ranks=4)
    senders = {rank: sim.hello(rank) for rank in (1, 2, 3)}
    sim.advance(2 * HOUR, alive=tuple(senders.values()))  # two hours, every rank alive
    silent_since = sim.clock.t
    sim.heartbeat(senders[2])  # its last word
    sim.advance(TIMEOUT_S, tick_every_s=0.125, alive=(senders[1], senders[3]))
    assert sim.clock.t == silent_since + TIMEOUT_S
    assert sim.lost_events() == []  # exactly at the timeout: not yet lost
    sim.advance(0.125, tick_every_s=0.125)
    assert len(sim.lost_events()) == 1 and "rank2" in sim.lost_events()[0]
    assert "silent for more than 120 s" in sim.lost_events()[0]
    for rank in (1, 3):
        sim.bye(senders[rank])
    assert sim.state.can_finish() is False  # the local producer has not closed yet
    assert sim.finish() == "failed"
    assert sim.metadata["simvue"]["lost"] == {"rank2": "silent for more than 120 s"}
    assert sim.metadata["simvue"]["processes"]["rank2"]["state"] == "lost"


def test_a_lost_rank_that_speaks_again_is_still_recorded(tmp_path):
    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1)
    sim.advance(TIMEOUT_S + 5)
    assert sim.lost_events()
    sim.log(sender, 0, {"x": 1.0})  # its data still counts
    sim.bye(sender)
    sim.finish()
    assert sim.points["rank1/x"] == 1


def test_a_late_joiner_at_hour_three_and_a_rank_given_up_that_comes_after_all(tmp_path):
    sim = Sim(tmp_path, ranks=4)
    one, two = sim.hello(1), sim.hello(2)
    sim.advance(TIMEOUT_S + 5, alive=(one, two))
    assert any("rank3 never joined" in message for _, message, _ in sim.events)
    assert sim.state.table.missing_ranks_count() == 0
    sim.advance(3 * HOUR - sim.clock.t, alive=(one, two))
    worker = sim.hello(None, role="worker")  # a helper process started at hour 3
    three = sim.hello(3)  # and the rank that was given up on
    sim.commit()
    assert any("rank3 joined the run after all, 3.0" in message for _, message, _ in sim.events)
    for step in range(10):
        for sender in (one, two, three, worker):
            sim.log(sender, step, {"x": float(step)})
    sim.advance(60.0, alive=(one, two, three, worker))
    for sender in (one, two, three, worker):
        sim.bye(sender)
    assert sim.finish() == "completed"
    assert sim.points["rank3/x"] == sim.points["worker0/x"] == 10
    assert sim.metadata["simvue"]["lost"] == {"rank3": None}
    assert sim.lost_events() == []


def test_a_process_on_this_node_that_ends_is_lost_within_the_grace_remote_ones_by_timeout(tmp_path):
    sim = Sim(tmp_path, ranks=3)
    here = sim.hello(1, host="node0")
    there = sim.hello(2, host="node1")
    assert [s.sender_id for s in sim.state.senders_to_probe()] == [here]
    sim.advance(HOUR, alive=(here, there))  # quiet but alive: heartbeats
    sim.state.process_gone(here)
    sim.advance(GONE_GRACE_S / 2, tick_every_s=0.1)
    assert sim.lost_events() == []
    sim.advance(GONE_GRACE_S / 2 + 0.1, tick_every_s=0.1)
    assert len(sim.lost_events()) == 1 and "rank1" in sim.lost_events()[0]
    assert "ended without closing" in sim.lost_events()[0]
    sim.bye(there)
    assert sim.finish() == "failed"


def test_the_aggregating_process_alone_never_times_out(tmp_path):
    sim = Sim(tmp_path, ranks=1)
    sim.advance(24 * HOUR, tick_every_s=60.0)
    sim.state.local_records([(RecordKind.METRICS, 0, sim.clock.t, sim.clock.time(), {"x": 1.0})])
    assert sim.finish() == "completed"
    assert sim.lost_events() == [] and sim.points["x"] == 1


@pytest.mark.parametrize(
    "kind, body",
    [
        (MessageKind.DATA, 7),
        (MessageKind.DATA, {"not": "a list"}),
        (MessageKind.HELLO, [1, 2]),
        (MessageKind.ACK, None),  # senders never send this
        (MessageKind.DATA, [None, 5, "x", [], [99], [RecordKind.METRICS], [RecordKind.EVENT, "t", 5, "info"],
                            [RecordKind.METRICS, "s", 0.0, 0.0, {"y": 1.0}], [RecordKind.METRICS, 0, 0.0, 0.0, {7: 1.0}],
                            [RecordKind.METRICS, 2**64, 0.0, 0.0, {"y": 1.0}], [RecordKind.METRICS, 0, 0.0, 0.0, {"y": "z"}],
                            [RecordKind.METRICS, 0, 0.0, 0.0, {"y": 10**400}], [RecordKind.TAGS, "abc"],
                            [RecordKind.STATUS, "exploded"], [RecordKind.METADATA, [1]],
                            [RecordKind.FOLDER, "/f", 3, None, None], [RecordKind.ALERT, {"name": 5}],
                            [RecordKind.RESOURCES, "h", 0.0, 0.0, {"resources/x": "NaN?"}]]),
    ],
)
def test_a_signed_but_malformed_message_is_dropped_and_counted_and_the_run_goes_on(tmp_path, kind, body):
    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1)
    assert all(reply.kind == MessageKind.ACK for reply in sim.send(sender, kind, body))
    sim.log(sender, 0, {"good": 2.0})
    sim.bye(sender)
    assert sim.finish() == "completed"
    losses = sim.metadata["simvue"]["losses"]
    assert losses.get("bad_message", 0) + losses.get("bad_record", 0) >= 1
    assert sim.points["rank1/good"] == 1
    assert "rank1/y" not in sim.points or sim.points["rank1/y"] == 0
    assert "abc" not in sim.metadata.get("tags", [])


def test_reduced_steps_wait_for_every_live_rank_but_not_past_the_wait(tmp_path):
    sim = Sim(tmp_path, ranks=3, reduce={"loss": ["mean", "max"]}, reduce_wait_s=10.0)
    one, two = sim.hello(1), sim.hello(2)
    sim.state.local_records([(RecordKind.METRICS, 0, 0.0, WALL0, {"loss": 1.0})])
    sim.log(one, 0, {"loss": 2.0})
    sim.commit()
    assert sim.points["loss.mean"] == 0  # rank 2 has not reported step 0
    sim.log(two, 0, {"loss": 6.0})
    sim.commit()
    assert sim.points["loss.mean"] == 1 and sim.points["loss.count"] == 1
    sim.state.local_records([(RecordKind.METRICS, 1, 0.0, WALL0, {"loss": 1.0})])
    sim.advance(9.0, tick_every_s=1.0)
    assert sim.points["loss.mean"] == 1  # step 1 still waits for ranks 1 and 2
    sim.advance(2.0, tick_every_s=1.0)
    assert sim.points["loss.mean"] == 2
    sim.log(one, 1, {"loss": 3.0})  # too late: counted
    for sender in (one, two):
        sim.bye(sender)
    sim.finish()
    assert sim.metadata["simvue"]["losses"] == {"late_step": 1}


def test_an_abort_is_announced_to_every_live_sender_and_to_later_joiners(tmp_path):
    sim = Sim(tmp_path, ranks=3)
    one, two = sim.hello(1), sim.hello(2)
    sim.bye(two)
    sim.abort.request("the server asked this run to stop")
    sim.replies.clear()
    sim.advance(0.1, tick_every_s=0.1)
    assert [r for r in sim.replies if r.kind == MessageKind.ABORT] == [Reply(one, MessageKind.ABORT, None)]
    late = sim.hello(None, role="worker")
    assert Reply(late, MessageKind.ABORT, None) in sim.replies
    assert any("asked to stop: the server asked" in message for _, message, _ in sim.events)


def test_a_run_that_closes_because_of_its_abort_tells_its_workers_before_any_tick(tmp_path):
    """The pool's parent ends its run as soon as the abort reaches it (abort_on_alert="run"),
    which can be before the aggregator's next tick: the workers still hear the abort, ahead
    of the DRAIN, and a run finishing before any tick still tells those left."""
    sim = Sim(tmp_path, ranks=1)
    workers = [sim.hello(None, role="worker"), sim.hello(None, role="worker")]
    sim.abort.request("the server asked this run to stop")
    out = sim.state.close_local("terminated")  # no tick in between
    assert [(r.sender_id, r.kind) for r in out] == [
        *((w, MessageKind.ABORT) for w in workers), *((w, MessageKind.DRAIN) for w in workers)
    ]
    finishing = Sim(tmp_path / "b", ranks=1)
    worker = finishing.hello(None, role="worker")
    finishing.abort.request("stop")
    finishing.replies.extend(finishing.state.close_local(None))
    finishing.abort.request("stop")
    kinds = [r.kind for r in finishing.state.farewell()]
    assert MessageKind.ABORT not in kinds  # announced once, at the close
    assert [r.kind for r in finishing.replies if r.sender_id == worker and r.kind != MessageKind.ACK] == [
        MessageKind.ABORT, MessageKind.DRAIN
    ]


def test_a_critical_alert_that_asks_for_it_raises_the_abort(tmp_path):
    sim = Sim(tmp_path, ranks=1)
    alert = {"name": "hot", "source": "metrics", "rule": "is above", "metric": "t", "threshold": 10.0,
             "frequency_s": 60.0, "window": 2, "trigger_abort": True}
    sim.state.local_records([(RecordKind.ALERT, alert)])
    for minute in range(4):
        sim.state.local_records([(RecordKind.METRICS, minute, sim.clock.t, sim.clock.time(), {"t": 50.0})])
        sim.advance(60.0, tick_every_s=60.0)
    assert sim.abort.is_set and "hot" in sim.abort.reason


def test_workers_are_asked_to_drain_and_those_that_do_not_are_lost_after_the_close_timeout(tmp_path):
    sim = Sim(tmp_path, ranks=1, close_timeout_s=30.0)
    drained, stuck = sim.hello(None, role="worker"), sim.hello(None, role="worker")
    sim.advance(2 * HOUR, alive=(drained, stuck))
    out = sim.state.close_local("completed")
    assert sorted(r.sender_id for r in out if r.kind == MessageKind.DRAIN) == sorted([drained, stuck])
    sim.heartbeat(drained)  # its answer to DRAIN: everything sent
    assert not sim.state.can_finish()
    sim.advance(29.0, tick_every_s=1.0, alive=(stuck,))  # alive, but never drains
    assert sim.lost_events() == [] and not sim.state.can_finish()
    sim.advance(2.0, tick_every_s=1.0)
    assert len(sim.lost_events()) == 1 and "did not drain within 30 s" in sim.lost_events()[0]
    assert sim.state.can_finish()
    sim.commit(sim.state.finish())
    assert sim.state.final_status == "failed"


def test_a_worker_whose_hello_arrives_after_the_close_is_asked_to_drain_too(tmp_path):
    """The pool's tasks are done and the main process closes, but a worker's HELLO was still
    queued: it must be asked to drain as well, not waited for until the close timeout."""
    sim = Sim(tmp_path, ranks=1, close_timeout_s=30.0)
    early = sim.hello(None, role="worker")
    assert [r.sender_id for r in sim.state.close_local(None) if r.kind == MessageKind.DRAIN] == [early]
    sim.replies.clear()
    late = sim.hello(None, role="worker")
    assert [r.sender_id for r in sim.replies if r.kind == MessageKind.DRAIN] == [late]
    sim.log(late, 0, {"x": 1.0})
    sim.heartbeat(early)
    sim.heartbeat(late)
    assert sim.state.can_finish()
    sim.commit(sim.state.finish())
    assert sim.state.final_status == "completed" and sim.points["worker1/x"] == 1


def test_a_worker_on_another_rank_counts_as_that_rank_having_joined(tmp_path):
    """mpi4py.futures under ``mpiexec -n 3 python -m mpi4py.futures``: ranks 1 and 2 are pool
    workers that never call init; their processes join with the Run they were handed."""
    sim = Sim(tmp_path, ranks=3)
    sim.hello(None, role="worker")  # a pool worker of rank 0's own
    assert sim.state.table.missing_ranks() == [1, 2]  # a worker without a rank is not a rank
    sim.send(b"w-rank1", MessageKind.HELLO, {"role": "worker", "rank": 1, "pid": 3001, "host": "node0"})
    sim.send(b"w-rank2", MessageKind.HELLO, {"role": "worker", "rank": 2, "pid": 3002, "host": "node0"})
    assert sim.state.table.missing_ranks() == []
    sim.advance(120.0)
    assert not any("never joined" in message for _, message, _ in sim.events)


def test_a_stopped_run_records_its_end_before_waiting_for_the_ranks_still_closing(tmp_path):
    """SIGTERM to every rank (scancel): rank 0 stores ``terminated``, the time and which ranks
    have not finished at once, so that a SIGKILL while it waits (a rank stuck past Slurm's
    KillWait) leaves a run that says when and how it ended; the final commit replaces both."""
    sim = Sim(tmp_path, ranks=4)
    stuck, quick, quickest = sim.hello(1), sim.hello(2), sim.hello(3)
    sim.advance(HOUR, alive=(stuck, quick, quickest))
    signalled = sim.clock.time()
    sim.bye(quickest, "terminated")  # its goodbye arrived before rank 0's own close
    sim.state.close_local("terminated")
    batch = sim.state.take_batch()  # the next commit, before anyone else has said goodbye
    assert batch.status == "terminated" and batch.ended == signalled
    sim.commit(batch)
    states = [sim.metadata["simvue"]["processes"][label]["state"] for label in ("rank0", "rank1", "rank2", "rank3")]
    assert states == ["done", "stopping", "stopping", "done"]
    assert sim.state.final_status is None and not sim.state.can_finish()
    sim.bye(quick, "terminated")
    sim.advance(3.0, tick_every_s=1.0, alive=(stuck,))
    sim.bye(stuck, "terminated")
    assert sim.state.can_finish()
    final = sim.state.finish()
    assert final.ended is not None and final.ended >= signalled + 3.0
    sim.commit(final)
    assert {sim.metadata["simvue"]["processes"][label]["state"] for label in ("rank1", "rank2", "rank3")} == {"done"}


def test_the_local_node_is_sampled_here_and_each_other_node_by_its_lowest_rank(tmp_path):
    sim = Sim(tmp_path, ranks=5, resources_interval_s=5.0)
    sim.hello(1, host="node0")
    for rank in (4, 3, 2):
        sim.hello(rank, host="node1")
    sim.replies.clear()
    sim.advance(0.1, tick_every_s=0.1)
    here = [r for r in sim.replies if isinstance(r, SampleHere)]
    assert [p.label for p in here[-1].processes] == ["rank0", "rank1"]
    plans = [r for r in sim.replies if isinstance(r, Reply) and r.kind == MessageKind.SAMPLE]
    assert [p.sender_id for p in plans] == [b"rank2"]
    assert [p[0] for p in plans[0].body["processes"]] == ["rank2", "rank3", "rank4"]
    sim.replies.clear()
    sim.bye(b"rank2")  # planned with the goodbye, before its ACK: no tick needed
    plans = [r for r in sim.replies if isinstance(r, Reply) and r.kind == MessageKind.SAMPLE]
    assert [(p.sender_id, bool(p.body)) for p in plans] == [(b"rank2", False), (b"rank3", True)]
    assert sim.replies[-1].kind == MessageKind.ACK


def test_resource_steps_are_numbered_per_host(tmp_path):
    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1, host="node1")
    for i in range(3):
        sim.send(sender, MessageKind.DATA, [[RecordKind.RESOURCES, "node1", float(i), WALL0, {"resources/x": 1.0}]])
    sim.state.local_records([(RecordKind.RESOURCES, "node0", 0.0, WALL0, {"resources/y": 2.0, "other": 3.0})])
    batch = sim.state.take_batch()
    assert list(batch.metrics["resources/x"].steps) == [0, 1, 2]
    assert list(batch.metrics["resources/y"].steps) == [0]
    assert "other" not in batch.metrics
    assert not any(math.isnan(v) for v in batch.metrics["resources/x"].values)


def test_ranks_that_do_not_join_are_named_within_seconds_and_given_up_when_they_gave_up(tmp_path):
    """Rank 0 knows the job's size: after JOIN_WARNING_S it says on stderr (a Notice) which
    ranks are missing, why that happens and what to do; it stops waiting for them once they
    have given up looking for it (rendezvous_timeout_s + JOIN_GRACE_S), not at the sender
    timeout."""
    from simvue.aggregator.instructions import Notice
    from simvue.aggregator.state import JOIN_GRACE_S, JOIN_WARNING_S

    sim = Sim(tmp_path, ranks=4, rendezvous_timeout_s=60.0)
    one = sim.hello(1)
    sim.advance(JOIN_WARNING_S - 0.5, tick_every_s=0.5, alive=(one,))
    assert not [r for r in sim.replies if isinstance(r, Notice)]
    sim.advance(1.0, tick_every_s=0.5, alive=(one,))
    notices = [r for r in sim.replies if isinstance(r, Notice)]
    assert len(notices) == 1
    assert "2 of 4 ranks have not joined" in notices[0].text and "rank2, rank3" in notices[0].text
    assert "SIMVUE_AGGREGATOR_ADDRESS" in notices[0].text and "mpi4py" in notices[0].text
    given_up = 60.0 + JOIN_GRACE_S
    sim.advance(given_up - sim.clock.t, tick_every_s=0.5, alive=(one,))
    assert not any("never joined" in message for _, message, _ in sim.events)
    sim.advance(1.0, tick_every_s=0.5, alive=(one,))
    assert [m for _, m, _ in sim.events if "never joined" in m] == [
        f"rank2 never joined the run within {given_up:g} s", f"rank3 never joined the run within {given_up:g} s"
    ]
    assert len([r for r in sim.replies if isinstance(r, Notice)]) == 1  # said once
    sim.bye(one)
    assert sim.state.can_finish() is False  # the local producer still runs
    assert sim.finish() == "failed"


# -- metric points in columns (METRIC_COLUMNS) -------------------------------------------------


def _columns_record(names, steps, times, stamps, values, rows=None):
    """A METRIC_COLUMNS record as a sender packs one (``values``: one list per name)."""
    from array import array

    def packed(code, items):
        column = array(code, items)
        if sys.byteorder != "little":
            column.byteswap()
        return column.tobytes()

    return [RecordKind.METRIC_COLUMNS, len(steps) if rows is None else rows, list(names), packed("q", steps),
            packed("d", times), packed("d", stamps), [packed("d", column) for column in values]]


GOOD = _columns_record(["a", "b"], [0, 1, 2], [0.0, 0.1, 0.2], [WALL0] * 3, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def _forged() -> dict[str, list]:
    ok = dict(names=["bad"], steps=[0, 1], times=[0.0, 1.0], stamps=[WALL0, WALL0], values=[[1.0, 2.0]])
    forged = {
        "columns of different lengths": _columns_record(**{**ok, "times": [0.0]}, rows=2),
        "a value column one row short": _columns_record(**{**ok, "values": [[1.0]]}, rows=2),
        "more names than value columns": _columns_record(**{**ok, "names": ["bad", "bad2"]}),
        "more value columns than names": _columns_record(**{**ok, "values": [[1.0, 2.0], [3.0, 4.0]]}),
        "no names": _columns_record(**{**ok, "names": [], "values": []}),
        "a name twice": _columns_record(**{**ok, "names": ["bad", "bad"], "values": [[1.0, 2.0], [3.0, 4.0]]}),
        "a name that is not a str": _columns_record(**{**ok, "names": [7]}),
        "names that are not a list": _columns_record(**{**ok, "names": "bad"}),
        "a count larger than the columns": _columns_record(**ok, rows=3),
        "a huge count": _columns_record(**ok, rows=2**40),
        "a count of zero": _columns_record(**ok, rows=0),
        "a count that is not an int": _columns_record(**ok, rows=2.0),
        "a step below zero (int64 -1)": _columns_record(**{**ok, "steps": [0, -1]}),
        "the smallest int64 step": _columns_record(**{**ok, "steps": [-(2**63), 0]}),
        "a nan time": _columns_record(**{**ok, "times": [0.0, math.nan]}),
        "an inf timestamp": _columns_record(**{**ok, "stamps": [math.inf, WALL0]}),
        "a nan value": _columns_record(**{**ok, "values": [[math.nan, 1.0]]}),
        "a value of -inf": _columns_record(**{**ok, "values": [[1.0, -math.inf]]}),
        "too few fields": _columns_record(**ok)[:6],
        "too many fields": [*_columns_record(**ok), b""],
    }
    record = _columns_record(**ok)
    for index, part in ((3, "steps"), (4, "times"), (5, "timestamps")):
        cut = list(record)
        cut[index] = cut[index][:-1]  # 15 bytes: not a multiple of 8
        forged[f"{part} not a multiple of 8 bytes"] = cut
        as_text = list(record)
        as_text[index] = "x" * 16
        forged[f"{part} as a str"] = as_text
    cut = list(record)
    cut[6] = [cut[6][0][:-3]]
    forged["a value column not a multiple of 8 bytes"] = cut
    not_bytes = list(record)
    not_bytes[6] = [[1.0, 2.0]]
    forged["a value column that is a list"] = not_bytes
    rows = MAX_COLUMN_ROWS + 1  # consistent, but more rows than a record may hold
    forged["more rows than a record may hold"] = [RecordKind.METRIC_COLUMNS, rows, ["bad"], *[bytes(8 * rows)] * 3,
                                                  [bytes(8 * rows)]]
    return forged


FORGED = _forged()


@pytest.mark.parametrize("what", sorted(FORGED))
def test_a_malformed_metric_columns_record_is_dropped_whole_and_the_batch_still_commits(tmp_path, store_dir, what):
    """A forged METRIC_COLUMNS record is dropped and counted, whatever is wrong with it; the
    records before and after it in the same message are kept, nothing of it reaches a series,
    and the batch it was in still commits to a real store."""
    from simvue.store import Store

    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1)
    after = _columns_record(["a"], [3, 4], [0.3, 0.4], [WALL0] * 2, [[7.0, 8.0]])
    sim.send(sender, MessageKind.DATA, [GOOD, FORGED[what], after])
    losses = sim.state.losses.snapshot()
    assert list(losses) == ["bad_record"] and losses["bad_record"] >= 1
    batch = sim.state.take_batch()
    assert sorted(batch.metrics) == ["rank1/a", "rank1/b"]
    assert list(batch.metrics["rank1/a"].steps) == [0, 1, 2, 3, 4]
    assert list(batch.metrics["rank1/a"].values) == [1.0, 2.0, 3.0, 7.0, 8.0]
    assert list(batch.metrics["rank1/b"].values) == [4.0, 5.0, 6.0]
    store = Store(store_dir)
    try:
        run_id = store.create_run(name="forged", folder="/", description=None, metadata={}, tags=[], status="running",
                                  system={}, heartbeat_timeout_s=30.0)
        store.write(run_id, batch)
        assert list(store.metric_series(run_id, "rank1/a")["values"]) == [1.0, 2.0, 3.0, 7.0, 8.0]
        assert store.metric_names(run_id) == ["rank1/a", "rank1/b"]
    finally:
        store.close()


def test_metric_columns_from_a_rank_are_merged_in_order_beside_its_plain_records(tmp_path):
    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1)
    sim.send(sender, MessageKind.DATA, [
        [RecordKind.METRICS, 0, 0.0, WALL0, {"a": 0.5}],
        _columns_record(["b", "a"], [1, 2], [0.1, 0.2], [WALL0 + 1, WALL0 + 2], [[10.0, 20.0], [1.0, 2.0]]),
        [RecordKind.EVENT, WALL0, "between", "info"],
        [RecordKind.METRICS, 3, 0.3, WALL0 + 3, {"a": 3.0}],
    ])
    batch = sim.state.take_batch()
    a, b = batch.metrics["rank1/a"], batch.metrics["rank1/b"]
    assert (list(a.steps), list(a.times), list(a.values)) == ([0, 1, 2, 3], [0.0, 0.1, 0.2, 0.3], [0.5, 1.0, 2.0, 3.0])
    assert (list(b.steps), list(b.timestamps), list(b.values)) == ([1, 2], [WALL0 + 1, WALL0 + 2], [10.0, 20.0])
    assert [message for _, message, _ in batch.events] == ["[rank1] between"]
    assert sim.state.losses.snapshot() == {}


def test_a_reduced_metric_sees_every_point_of_metric_columns(tmp_path):
    """Reduction keeps its per-step accounting: each point of a columns record is one rank's
    value at one step, a step is written once every live rank has it, and late values are
    counted as before."""
    sim = Sim(tmp_path, ranks=3, reduce={"loss": ["mean", "max", "namespace"]}, reduce_wait_s=10.0)
    one, two = sim.hello(1), sim.hello(2)
    sim.state.local_records([(RecordKind.METRICS, step, 0.0, WALL0, {"loss": 1.0}) for step in range(4)])
    sim.send(one, MessageKind.DATA, [_columns_record(["loss"], [0, 1, 2, 3], [0.0] * 4, [WALL0] * 4,
                                                     [[2.0, 2.0, 2.0, 2.0]])])
    sim.commit()
    assert sim.points["loss.mean"] == 0  # rank 2 has reported nothing
    sim.send(two, MessageKind.DATA, [_columns_record(["loss", "other"], [0, 1, 2], [0.0] * 3, [WALL0] * 3,
                                                     [[6.0, 6.0, 6.0], [0.0, 0.0, 0.0]])])
    batch = sim.state.take_batch()
    assert list(batch.metrics["loss.mean"].steps) == [0, 1, 2]
    assert list(batch.metrics["loss.mean"].values) == [3.0, 3.0, 3.0]
    assert list(batch.metrics["loss.max"].values) == [6.0, 6.0, 6.0]
    assert list(batch.metrics["loss.count"].values) == [3.0, 3.0, 3.0]
    assert list(batch.metrics["rank2/loss"].steps) == [0, 1, 2]  # "namespace": its own series too
    assert list(batch.metrics["rank2/other"].steps) == [0, 1, 2]
    sim.commit(batch)
    sim.advance(11.0, tick_every_s=1.0)  # step 3 waited for rank 2 long enough
    assert sim.points["loss.mean"] == 4
    sim.send(two, MessageKind.DATA, [_columns_record(["loss"], [3, 4], [0.0] * 2, [WALL0] * 2, [[6.0, 6.0]])])
    for sender in (one, two):
        sim.bye(sender)
    sim.finish()
    assert sim.metadata["simvue"]["losses"] == {"late_step": 1}  # step 3 from rank 2; step 4 is new
    assert sim.points["loss.mean"] == 5


def test_a_message_in_another_protocol_version_is_counted_apart_and_named_once(tmp_path):
    from simvue.aggregator.instructions import Notice
    from simvue.transport.protocol import PROTOCOL_VERSION

    sim = Sim(tmp_path, ranks=1)
    notices = sim.state.bad_frame(PROTOCOL_VERSION - 1)
    assert len(notices) == 1 and isinstance(notices[0], Notice)
    assert f"protocol version {PROTOCOL_VERSION - 1}" in notices[0].text
    assert sim.state.bad_frame(PROTOCOL_VERSION - 1) == []  # named once per version
    assert sim.state.bad_frame() == []
    assert sim.finish() == "completed"
    assert sim.metadata["simvue"]["losses"] == {"protocol_version": 2, "bad_frame": 1}
    assert sum("protocol version" in message for _, message, _ in sim.events) == 1


# -- the aggregator in a process of its own (``simvue.aggregator.host``) ---------------------


def test_a_hosted_run_of_four_ranks_over_hours_ends_when_its_owner_and_the_ranks_have_left(tmp_path):
    """Rank 0 is a sender like the others, marked owner; the helper process logs nothing,
    is no rank, is not waited for by the reducer and is not listed among the processes."""
    sim = Sim(tmp_path, ranks=4, hosted=True, reduce={"loss": ["mean"]}, reduce_wait_s=600.0)
    owner = sim.hello(0, owner=True)
    others = [sim.hello(rank) for rank in (1, 2, 3)]
    everyone = (owner, *others)
    for hour in range(6):
        for step in range(hour * 50, hour * 50 + 50):
            for sender in everyone:
                sim.log(sender, step, {"loss": 1.0, "energy": float(step)})
        sim.advance(HOUR, alive=everyone)
    # Reduced steps were written as soon as the four ranks had sent them, not after the wait.
    assert sim.points["loss.mean"] == 300
    assert sim.state.table.owner is not None and sim.state.table.owner.label == "rank0"
    sim.bye(owner)
    assert sim.state.closing and not sim.state.can_finish()  # the owner closed; ranks 1-3 still run
    for sender in others:
        sim.bye(sender)
    assert sim.state.can_finish()
    sim.commit(sim.state.finish())
    assert sim.state.final_status == "completed" and sim.statuses[-1] == "completed"
    assert sorted(sim.metadata["simvue"]["processes"]) == ["rank0", "rank1", "rank2", "rank3"]
    assert all(sim.points[f"rank{k}/energy"] == 300 for k in range(4))
    assert sim.lost_events() == []


def test_a_hosted_run_whose_owner_dies_ends_failed_and_keeps_what_it_sent(tmp_path):
    sim = Sim(tmp_path, ranks=2, hosted=True)
    owner = sim.hello(0, owner=True)
    other = sim.hello(1)
    for step in range(100):
        sim.log(owner, step, {"x": float(step)})
        sim.log(other, step, {"x": float(step)})
    sim.advance(60.0, alive=(owner, other))
    sim.state.process_gone(owner)  # SIGKILLed: seen gone by pid on this node
    sim.advance(GONE_GRACE_S + 1.0, tick_every_s=0.5)
    assert sim.state.closing
    assert sim.statuses == ["failed"]  # stored at once, before waiting for rank 1
    sim.bye(other)
    assert sim.state.can_finish()
    sim.commit(sim.state.finish())
    assert sim.state.final_status == "failed"
    assert sim.points["rank0/x"] == 100 and sim.points["rank1/x"] == 100
    assert "rank0" in sim.metadata["simvue"]["lost"]


def test_only_the_first_owner_counts_and_only_with_a_hosted_aggregator(tmp_path):
    hosted = Sim(tmp_path / "a", ranks=3, hosted=True)
    first = hosted.hello(0, owner=True)
    second = hosted.hello(1, owner=True)  # a forged or confused second owner
    assert hosted.state.table.owner is hosted.state.table.by_id[first]
    hosted.bye(second)
    assert not hosted.state.closing
    threaded = Sim(tmp_path / "b", ranks=3)
    claimant = threaded.hello(1, owner=True)
    threaded.bye(claimant)
    assert threaded.state.table.owner is None and not threaded.state.closing


def test_a_hosted_one_process_run_samples_the_owner_with_plain_names_and_not_the_helper(tmp_path):
    sim = Sim(tmp_path, ranks=1, hosted=True, resources_interval_s=1.0)
    owner = sim.hello(None, role="process", owner=True)
    plans = [i for i in sim.state.tick() if isinstance(i, SampleHere)]
    assert plans and [p.label for p in plans[-1].processes] == ["main"]
    assert plans[-1].plain_pid == sim.state.table.by_id[owner].pid
    sim.bye(owner)
    sim.commit(sim.state.finish())
    assert sim.state.final_status == "completed"
    assert list(sim.metadata["simvue"]["processes"]) == ["main"]
