"""Per-node relays, piece by piece: the aggregator's socket reading relayed frames (real
ZeroMQ sockets), the state's NODE_HEARTBEAT, the setting, the host override, the choice of
relaying, and the election of one relay per node among processes that race for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest
import zmq
from test_aggregator_state import TIMEOUT_S, Sim

from simvue.aggregator.receiver import Binding, Receiver
from simvue.aggregator.senders import GONE_GRACE_S, LIVE, LOST
from simvue.config import RELAY_MIN_RANKS, Settings, from_environment
from simvue.errors import SimvueValueError
from simvue.topology import Topology, detect
from simvue.transport import protocol, relay
from simvue.transport.protocol import BadFrame, Message, MessageKind
from simvue.transport.rendezvous import AggregatorAddress

pytestmark = pytest.mark.timeout(60)
KEY = b"k" * 32


class Peer:
    """A DEALER with a routing id of its own: a sender or a relay."""

    def __init__(self, context: zmq.Context, endpoint: str, identity: bytes) -> None:
        self.identity = identity
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_ms: int = 5000) -> list[bytes]:
        assert self.sock.poll(timeout_ms), "no reply"
        return self.sock.recv_multipart()


def _next(receiver: Receiver, timeout_ms: int = 5000):
    """The next message or the BadFrame it raised."""
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        receiver.poll(100)
        try:
            got = receiver.receive()
        except BadFrame as exc:
            return exc
        if got is not None:
            return got
    raise AssertionError("nothing arrived")


@pytest.fixture
def receiver():
    receiver = Receiver(KEY, Binding())
    endpoint = receiver.open()
    context = zmq.Context()
    yield receiver, endpoint, context
    receiver.close()
    context.destroy(0)


def test_the_receiver_reads_direct_and_relayed_frames_and_routes_replies_back_the_same_way(receiver):
    receiver, endpoint, context = receiver
    direct, relay_a = Peer(context, endpoint, b"D" * 16), Peer(context, endpoint, b"R" * 16)
    direct.send(*protocol.encode(KEY, MessageKind.HELLO, 1, {}))
    sender_id, message = _next(receiver)
    assert sender_id == b"D" * 16 and message.kind is MessageKind.HELLO
    relay_a.send(b"S" * 16, *protocol.encode(KEY, MessageKind.HELLO, 1, {}))
    sender_id, message = _next(receiver)
    assert sender_id == b"S" * 16 and message.kind is MessageKind.HELLO
    relay_a.send(*protocol.encode(KEY, MessageKind.NODE_HEARTBEAT, 0, {"senders": [b"S" * 16], "gone": []}))
    sender_id, message = _next(receiver)
    assert sender_id == b"R" * 16 and message.kind is MessageKind.NODE_HEARTBEAT
    assert receiver.connections() == 2  # one sender directly, one relay (with its sender behind it)

    from simvue.aggregator.instructions import Reply

    receiver.send(Reply(b"S" * 16, MessageKind.ACK, {"seq": 1}))
    frames = relay_a.recv()
    assert frames[0] == b"S" * 16 and protocol.decode(KEY, frames[1:]).body == {"seq": 1}
    receiver.send(Reply(b"D" * 16, MessageKind.ACK, {"seq": 1}))
    assert protocol.decode(KEY, direct.recv()).body == {"seq": 1}

    # Its relay died: the sender comes directly, and its replies go directly from then on.
    moved = Peer(context, endpoint, b"S" * 16)
    moved.send(*protocol.encode(KEY, MessageKind.HELLO, 1, {}))
    assert _next(receiver)[0] == b"S" * 16
    receiver.send(Reply(b"S" * 16, MessageKind.ACK, {"seq": 2}))
    assert protocol.decode(KEY, moved.recv()).body == {"seq": 2}
    assert not relay_a.sock.poll(200)
    # A late frame for it through the old relay is refused.
    relay_a.send(b"S" * 16, *protocol.encode(KEY, MessageKind.HEARTBEAT, 1, None))
    assert isinstance(_next(receiver), BadFrame)


def test_forged_and_malformed_relayed_frames_are_refused_and_nothing_crashes(receiver):
    receiver, endpoint, context = receiver
    relay_a, relay_b = Peer(context, endpoint, b"A" * 16), Peer(context, endpoint, b"B" * 16)
    direct = Peer(context, endpoint, b"D" * 16)
    relay_a.send(b"S" * 16, *protocol.encode(KEY, MessageKind.HELLO, 1, {}))
    assert _next(receiver)[0] == b"S" * 16
    direct.send(*protocol.encode(KEY, MessageKind.HELLO, 1, {}))
    assert _next(receiver)[0] == b"D" * 16
    good = protocol.encode(KEY, MessageKind.HEARTBEAT, 1, None)
    forged = [
        [b"S" * 16, good[0], good[1], b"extra"],  # five frames
        [b"S" * 16, b"x" * 32, good[1]],  # a bad signature inside a relayed frame
        [b"S" * 16, good[0], good[1] + b"\x00"],  # a payload that does not match its mac
        [b"", *good],  # an empty sender id
        [b"A" * 16, *good],  # a relay naming itself
    ]
    for frames in forged:
        relay_a.send(*frames)
        assert isinstance(_next(receiver), BadFrame), frames
    relay_b.send(b"S" * 16, *good)  # claims relay A's sender
    assert isinstance(_next(receiver), BadFrame)
    relay_b.send(b"D" * 16, *good)  # claims a sender connected directly
    assert isinstance(_next(receiver), BadFrame)
    relay_b.send(b"A" * 16, *good)  # claims relay A itself
    assert isinstance(_next(receiver), BadFrame)
    relay_b.send(b"T" * 16, b"x" * 32, good[1])  # an unauthentic frame claims no route
    assert isinstance(_next(receiver), BadFrame)
    assert b"T" * 16 not in receiver.routes
    relay_a.send(b"S" * 16, *good)  # the real route still works
    sender_id, message = _next(receiver)
    assert sender_id == b"S" * 16 and message.kind is MessageKind.HEARTBEAT
    assert receiver.routes == {b"S" * 16: b"A" * 16}


def _node_heartbeat(sim: Sim, relay_id: bytes, alive: list[bytes], gone: list[bytes] = ()) -> None:
    sim.state.receive(relay_id, Message(MessageKind.NODE_HEARTBEAT, 0, {"senders": alive, "gone": list(gone)}))


def test_node_heartbeats_keep_relayed_senders_alive_and_name_those_whose_process_ended(tmp_path):
    sim = Sim(tmp_path, ranks=5)
    ranks = [sim.hello(rank, host="node1") for rank in (1, 2, 3, 4)]
    relay_id = b"relay-node1"
    for _ in range(int(3 * TIMEOUT_S)):  # three sender timeouts: only the relay speaks for them
        sim.clock.t += 1.0
        _node_heartbeat(sim, relay_id, ranks)
        sim.replies.extend(sim.state.tick())
    assert sim.lost_events() == []
    assert all(sim.state.table.by_id[r].presence is LIVE for r in ranks)
    assert relay_id not in sim.state.table.by_id  # a relay is not a sender
    sim.bye(ranks[3])
    _node_heartbeat(sim, relay_id, ranks[:2], gone=[ranks[2], ranks[3]])  # rank4 said goodbye first
    sim.advance(GONE_GRACE_S / 2, tick_every_s=0.1)
    assert sim.lost_events() == []
    sim.advance(GONE_GRACE_S, tick_every_s=0.1)
    assert len(sim.lost_events()) == 1 and "rank3" in sim.lost_events()[0]
    assert sim.state.table.by_id[ranks[3]].presence is not LOST
    _node_heartbeat(sim, relay_id, [b"nobody"], gone=[b"nobody either"])  # unknown ids: ignored
    assert "losses" not in sim.metadata.get("simvue", {})
    for sender in ranks[:2]:
        sim.bye(sender)
    assert sim.finish() == "failed"  # rank3 ended without closing


@pytest.mark.parametrize(
    "body", [None, [], {"senders": "x"}, {"senders": [1, 2]}, {"gone": [b"a", "b"]}, {"senders": [[b"a"]]}]
)
def test_a_malformed_node_heartbeat_is_counted_and_changes_nothing(tmp_path, body):
    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1, host="node1")
    sim.clock.t = TIMEOUT_S - 1
    sim.state.receive(b"relay", Message(MessageKind.NODE_HEARTBEAT, 0, body))
    assert sim.state.losses.snapshot() == {"bad_message": 1}
    sim.clock.t = TIMEOUT_S + 1
    sim.state.tick()
    assert sim.state.table.by_id[sender].presence is LOST


def test_messages_sent_again_after_a_relay_died_are_counted_as_resent_not_as_losses(tmp_path):
    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1, host="node1")
    for step in range(3):
        sim.log(sender, step, {"x": float(step)})  # seqs 2-4 arrive, none acknowledged yet
    sim.state.receive(sender, Message(MessageKind.HELLO, 1, {"role": "rank", "rank": 1}))  # again, directly
    for seq, step in ((2, 0), (3, 1), (4, 2), (5, 3)):  # every unacknowledged message, then a new one
        sim.state.receive(sender, Message(MessageKind.DATA, seq, [[0, step, 0.0, 0.0, {"x": float(step)}]]))
    sim.seq[sender] = 5
    sim.bye(sender)
    sim.commit()
    assert sim.points["rank1/x"] == 4
    assert sim.state.losses.snapshot() == {}
    assert sim.state.table.by_id[sender].resent == 4
    sim.state.receive(sender, Message(MessageKind.DATA, 3, []))  # a true duplicate, later on
    assert sim.state.losses.snapshot() == {"duplicate": 1}


def test_the_relay_setting_and_the_host_override(monkeypatch):
    assert Settings().relay == "auto"
    assert Settings().replace(relay="off").relay == "off"
    with pytest.raises(SimvueValueError, match="relay must be one of auto, on, off"):
        Settings().replace(relay="yes")
    monkeypatch.setenv("SIMVUE_RELAY", "on")
    assert from_environment().relay == "on"
    monkeypatch.setenv("SIMVUE_RELAY", "sometimes")
    with pytest.raises(SimvueValueError):
        from_environment()
    monkeypatch.setenv("SIMVUE_HOST", "nodeQ")
    assert Topology().host == "nodeQ" and detect({"PMI_RANK": "1", "PMI_SIZE": "2"}).host == "nodeQ"


def test_when_a_rank_relays():
    small = Topology(rank=1, size=4, host="n2")
    large = Topology(rank=1, size=RELAY_MIN_RANKS, host="n2")
    assert not relay.wanted("auto", small, "n1") and relay.wanted("auto", large, "n1")
    assert relay.wanted("on", small, "n1") and not relay.wanted("off", large, "n1")
    assert not relay.wanted("on", small, "n2") and not relay.wanted("on", small, "n2.cluster")
    assert not relay.wanted("on", small, None)  # the aggregator's node is not known
    assert relay.aggregator_host("tcp://127.0.0.1:5", "n1") == "n1"
    assert relay.aggregator_host("tcp://node01:5557", None) == "node01"
    assert relay.aggregator_host("tcp://10.0.0.5:5557", None) is None
    assert relay.aggregator_host("ipc:///x", None) is None
    assert relay.aggregator_host("tcp://127.0.0.1:5557", None) == Topology().host


def test_an_address_file_without_a_host_or_with_unknown_fields_still_reads():
    old = {"address": "tcp://h:1", "key": "00" * 32, "run_name": "r", "run_id": "i", "started": 1.0, "pid": 5}
    assert AggregatorAddress.from_json(json.dumps(old)).host is None
    newer = {**old, "host": "nodeA", "something_later": 1}
    assert AggregatorAddress.from_json(json.dumps(newer)).host == "nodeA"


def test_the_runtime_directory_must_be_private(monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    monkeypatch.setenv(relay.RUNTIME_DIR_ENV, str(shared))
    with pytest.raises(relay.RendezvousRefused):
        relay.runtime_directory()
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    monkeypatch.setenv(relay.RUNTIME_DIR_ENV, str(tmp_path / "link"))
    with pytest.raises(relay.RendezvousRefused):
        relay.runtime_directory()
    # attach() never raises: a rank without a usable directory connects directly.
    assert relay.attach("tcp://127.0.0.1:1", KEY, "nodeZ", 1.0, {}) is None


RACER = textwrap.dedent(
    """
    import sys, time
    from simvue.transport import relay
    found = relay.attach(sys.argv[1], bytes.fromhex(sys.argv[2]), "nodeR", 20.0,
                         {"heartbeat_interval_s": 0.2, "rendezvous_timeout_s": 3.0})
    print(found.pid if found else "none", flush=True)
    """
)


def test_processes_racing_for_a_node_start_exactly_one_relay_that_ends_when_unused(receiver):
    receiver, endpoint, _ = receiver
    key = uuid.uuid4().bytes * 2
    with tempfile.TemporaryDirectory(prefix="svr") as runtime:
        env = {**os.environ, relay.RUNTIME_DIR_ENV: runtime}
        racers = [
            subprocess.Popen([sys.executable, "-c", RACER, endpoint, key.hex()], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        pids = set()
        for racer in racers:
            out, err = racer.communicate(timeout=40)
            assert racer.returncode == 0, err
            pids.add(out.strip())
        assert len(pids) == 1 and "none" not in pids, pids
        pid = int(pids.pop())
        deadline = time.monotonic() + 15  # no rank ever connects: it ends after the rendezvous timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the relay did not end")
        assert os.listdir(runtime) == []  # its socket, address file and lock file are gone
