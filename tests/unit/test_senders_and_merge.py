"""The aggregator's sender table and reducer, driven with an injected clock: many senders,
late joiners, silent ones and late steps, without processes or sleeps.  The state machine
that composes them is tested in test_aggregator_state.py."""

from __future__ import annotations

import statistics

import pytest

from simvue.aggregator.merge import Reducer
from simvue.aggregator.senders import DONE, GONE_GRACE_S, LIVE, LOST, SenderTable
from simvue.config import normalise_reduce
from simvue.errors import SimvueValueError
from simvue.losses import LossCounter


def table(ranks=0, timeout_s=10.0, namespace=True, local=None):
    local = local or {"role": "rank", "rank": 0, "pid": 100, "host": "h"}
    return SenderTable(local=local, expected_ranks=ranks, namespace_ranks=namespace, timeout_s=timeout_s,
                       losses=LossCounter(), now=0.0)


def rank_hello(t, rank, now=0.0):
    return t.hello(f"id{rank}".encode(), {"role": "rank", "rank": rank, "pid": 100 + rank, "host": "h"}, now)


def test_ranks_are_labelled_by_rank_and_workers_in_order_of_first_contact():
    t = table(ranks=4)
    assert (t.local.label, t.local.prefix) == ("rank0", "rank0/")
    assert rank_hello(t, 3).prefix == "rank3/"
    w0 = t.hello(b"a", {"role": "worker", "pid": 7}, 0.0)
    w1 = t.hello(b"b", {"role": "worker", "pid": 8}, 0.0)
    assert (w0.label, w1.label) == ("worker0", "worker1")
    assert t.hello(b"a", {"role": "worker"}, 1.0) is w0  # a repeated hello is the same sender
    assert t.hello(b"m", {"role": "process"}, 0.0).prefix == ""
    assert t.live_labels == {"rank0", "rank3", "worker0", "worker1", "main"}


@pytest.mark.parametrize("info", [{"role": "admin"}, {"role": "rank", "rank": -1}, {"role": "rank", "rank": "3"},
                                  {"role": "rank", "rank": True}, {"role": None, "pid": "x", "host": 5}])
def test_odd_hello_fields_make_a_worker_not_an_error(info):
    state = table(ranks=4).hello(b"x", info, 0.0)
    assert (state.role, state.label, state.rank) == ("worker", "worker0", None)
    assert state.pid is None or isinstance(state.pid, int)
    assert state.host is None or isinstance(state.host, str)


def test_a_single_rank_job_keeps_plain_names():
    assert rank_hello(table(ranks=1, namespace=False), 1).prefix == ""


def test_duplicates_are_dropped_and_gaps_counted():
    t = table()
    state = rank_hello(t, 0)
    assert t.accept(state, 1, 0.0)
    assert t.accept(state, 2, 0.0)
    assert not t.accept(state, 2, 0.0)
    assert t.accept(state, 5, 0.0)
    assert t.losses.snapshot() == {"duplicate": 1, "gap": 2}


def test_a_silent_sender_is_lost_after_the_timeout_and_only_once():
    t = table(ranks=64, timeout_s=5.0)
    states = [rank_hello(t, r) for r in range(1, 64)]
    for state in states:
        if state.rank != 17:
            state.last_seen = 4.0
    assert t.tick(5.0) == []  # at the timeout, not yet
    lost = states[16]
    assert t.tick(5.01) == [lost] and lost.label == "rank17"
    assert lost.presence == LOST and "silent" in lost.reason
    assert t.tick(6.0) == []
    assert "rank17" not in t.live_labels and len(t.live_labels) == 63
    assert t.local.presence == LIVE  # the aggregating process itself never times out
    assert t.tick(1e9) and t.local.presence == LIVE


def test_a_process_seen_gone_is_lost_after_the_grace_unless_it_said_goodbye():
    t = table(ranks=3, timeout_s=120.0)
    one, two = rank_hello(t, 1), rank_hello(t, 2)
    t.process_gone(one, 10.0)
    t.process_gone(two, 10.0)
    t.bye(two, "completed")  # its goodbye was still in the socket
    assert t.tick(10.0 + GONE_GRACE_S / 2) == []
    assert t.tick(10.0 + GONE_GRACE_S) == [one]
    assert "ended without closing" in one.reason
    assert two.presence == DONE


def test_a_drained_worker_whose_process_ends_has_done_its_part():
    t = table(ranks=1)
    worker = t.hello(b"w", {"role": "worker", "pid": 7}, 0.0)
    worker.drained = True
    t.process_gone(worker, 1.0)
    assert t.tick(1.0 + GONE_GRACE_S) == []
    assert worker.presence == DONE and worker.exit_status is None


def test_bye_ends_a_sender_and_lost_senders_are_not_waited_for():
    t = table(ranks=2)
    b = rank_hello(t, 1)
    t.bye(t.local, "completed")
    assert t.local.presence == DONE and b.presence == LIVE
    assert t.waiting_for() == [b]
    t.mark_lost(b, "test")
    assert t.waiting_for() == []


def test_ranks_that_never_join_are_given_up_after_the_timeout():
    t = table(ranks=4, timeout_s=5.0)
    for rank in (1, 3):
        rank_hello(t, rank)
    assert t.missing_ranks_count() == 1
    assert t.give_up_on_missing_ranks(4.0) == []
    assert t.give_up_on_missing_ranks(6.0) == [2]
    assert t.missing_ranks_count() == 0


def make_reducer(spec, live, missing=0, wait_s=10.0):
    out = []
    losses = LossCounter()
    reducer = Reducer(normalise_reduce(spec), wait_s=wait_s, live_labels=live, missing=lambda: missing,
                      emit=lambda *point: out.append(point), losses=losses)
    return reducer, out, losses


def test_a_step_is_reduced_when_every_live_sender_reported_it():
    live = {f"rank{r}" for r in range(64)}
    reducer, out, _ = make_reducer({"loss": ["mean", "min", "max", "sum"]}, live)
    values = {f"rank{r}": r * 0.5 + 1 for r in range(64)}
    for label, value in values.items():
        assert not out
        reducer.add(label, "loss", 3, 1.0, 100.0, value, now=0.0)
    got = {name: value for name, step, _, _, value in out}
    assert got == pytest.approx({
        "loss.mean": statistics.fmean(values.values()),
        "loss.min": 1.0,
        "loss.max": 32.5,
        "loss.sum": sum(values.values()),
        "loss.count": 64.0,
    })
    assert {step for _, step, *_ in out} == {3}


def test_an_incomplete_step_is_written_after_the_wait_with_its_count():
    reducer, out, _ = make_reducer(["mean"], {"rank0", "rank1", "rank2"}, wait_s=2.0)
    reducer.add("rank0", "x", 0, 0.0, 0.0, 1.0, now=0.0)
    reducer.add("rank1", "x", 0, 0.0, 0.0, 3.0, now=0.5)
    reducer.tick(1.0)
    assert out == []
    reducer.tick(2.5)
    assert {n: v for n, _, _, _, v in out} == {"x.mean": 2.0, "x.count": 2.0}


def test_a_sender_that_left_is_not_waited_for_but_its_values_count():
    live = {"rank0", "rank1"}
    reducer, out, _ = make_reducer(["sum"], live)
    reducer.add("rank0", "x", 0, 0.0, 0.0, 1.0, now=0.0)
    live.discard("rank0")  # rank0 said bye
    reducer.add("rank1", "x", 0, 0.0, 0.0, 2.0, now=0.0)
    assert {n: v for n, _, _, _, v in out} == {"x.sum": 3.0, "x.count": 2.0}


def test_steps_wait_for_ranks_that_have_not_joined():
    reducer, out, _ = make_reducer(["max"], {"rank0"}, missing=1)
    reducer.add("rank0", "x", 0, 0.0, 0.0, 1.0, now=0.0)
    assert out == []
    reducer.finish()
    assert {n: v for n, _, _, _, v in out} == {"x.max": 1.0, "x.count": 1.0}


def test_late_values_are_counted_not_silently_dropped():
    reducer, out, losses = make_reducer(["mean"], {"rank0"})
    reducer.add("rank0", "x", 0, 0.0, 0.0, 1.0, now=0.0)
    reducer.add("rank1", "x", 0, 0.0, 0.0, 5.0, now=1.0)
    assert losses.snapshot() == {"late_step": 1}
    assert len(out) == 2


def test_only_configured_metrics_are_reduced():
    reducer, _, _ = make_reducer({"loss": ["mean"], "*": ["sum"]}, set())
    assert reducer.ops_for("loss") == ("mean",)
    assert reducer.ops_for("other") == ("sum",)
    assert make_reducer({"loss": "max"}, set())[0].ops_for("other") is None


@pytest.mark.parametrize("spec", [{"loss": ["median"]}, {"loss": []}, 3, {"": ["mean"]}])
def test_bad_reduce_specs_name_the_valid_choices(spec):
    with pytest.raises((SimvueValueError, TypeError)):
        normalise_reduce(spec)
