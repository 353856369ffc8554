"""The wire between senders and the aggregator: authentication, sequence numbers,
acknowledged close, and spilling when no aggregator answers.  Real ZeroMQ sockets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from collections import deque
from threading import Thread

import msgpack
import zmq
from conftest import read_run

from simvue import Run
from simvue.abort import AbortSignal
from simvue.losses import LossCounter
from simvue.transport import columns, protocol, spill
from simvue.transport.protocol import MessageKind, RecordKind
from simvue.transport.sender import Sender
from simvue.transport.spill import SpillFile


def raw_dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def recv_ack(sock: zmq.Socket, key: bytes, timeout_ms: int = 5000) -> dict:
    assert sock.poll(timeout_ms), "no ACK from the aggregator"
    kind, _, body = protocol.decode(key, sock.recv_multipart())
    assert kind == MessageKind.ACK
    return body


def acked_up_to(sock: zmq.Socket, key: bytes, seq: int, timeout_s: float = 10.0) -> dict:
    """Read ACKs until one covers ``seq`` (an ACK says what is in the store, so the one that
    covers a message comes with the commit after it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = recv_ack(sock, key, max(1, int((deadline - time.monotonic()) * 1000)))
        if body["seq"] >= seq:
            return body


def make_sender(address: str, key: bytes, spill_path, *, flush_interval_s=0.05, heartbeat_interval_s=1.0,
                close_timeout_s=10.0) -> tuple[Sender, LossCounter]:
    losses = LossCounter()
    sender = Sender(
        address,
        key,
        {"role": "worker", "pid": 2, "host": "h"},
        flush_interval_s=flush_interval_s,
        heartbeat_interval_s=heartbeat_interval_s,
        close_timeout_s=close_timeout_s,
        spill=SpillFile(spill_path, losses),
        losses=losses,
        abort=AbortSignal(),
    )
    return sender, losses


def test_forged_and_garbage_frames_are_dropped_and_counted(store_dir):
    with Run() as run:
        run.init(name="forged")
        address = run._address
        sock = raw_dealer(address.address)
        sock.send_multipart([b"not a mac", b"junk"])
        sock.send_multipart(protocol.encode(b"wrong key" * 4, MessageKind.HELLO, 1, {"role": "worker"}))
        sock.send(b"one frame only")
        run.log_metrics({"a": 1.0})
        time.sleep(0.3)
        sock.close()
    exported = read_run(store_dir, "forged")
    assert exported["metadata"]["simvue"]["losses"]["bad_frame"] == 3
    assert exported["status"] == "completed"
    assert exported["metrics"]["a"][0][2] == 1.0


def test_a_replayed_message_is_stored_once_and_bye_is_acknowledged(store_dir):
    with Run() as run:
        run.init(name="replay")
        key = run._address.key
        sock = raw_dealer(run._address.address)
        sock.send_multipart(protocol.encode(key, MessageKind.HELLO, 1, {"role": "worker", "pid": 1, "host": "h"}))
        assert recv_ack(sock, key)["run"]["name"] == "replay"
        data = protocol.encode(key, MessageKind.DATA, 2, [[RecordKind.METRICS, 0, 0.0, time.time(), {"x": 1.5}]])
        sock.send_multipart(data)
        sock.send_multipart(data)
        sock.send_multipart(protocol.encode(key, MessageKind.BYE, 3, {"status": None, "dropped": {}}))
        assert acked_up_to(sock, key, 3)["seq"] == 3
        sock.close()
    exported = read_run(store_dir, "replay")
    assert exported["metrics"]["worker0/x"] == [[0, 0.0, 1.5]]
    assert exported["metadata"]["simvue"]["losses"]["duplicate"] == 1
    assert exported["status"] == "completed"


def test_a_sender_close_is_acknowledged_after_everything_arrived(store_dir):
    with Run() as run:
        run.init(name="acked")
        address = run._address
        sender, losses = make_sender(address.address, address.key, store_dir / "spill" / "unused.msgpack")
        for step in range(20_000):
            sender.buffer.append((RecordKind.METRICS, step, 0.0, 0.0, {"v": float(step)}))
        assert sender.close(None, {}, 10.0) is True
        assert losses.snapshot() == {}
    exported = read_run(store_dir, "acked")
    assert [p[0] for p in exported["metrics"]["worker0/v"]] == list(range(20_000))


def test_without_an_aggregator_records_are_spilled_to_disk_and_counted(tmp_path):
    port = zmq.Context.instance().socket(zmq.ROUTER).bind_to_random_port("tcp://127.0.0.1")  # bound, never read
    path = tmp_path / "spill.msgpack"
    sender, losses = make_sender(
        f"tcp://127.0.0.1:{port + 1 if port < 65535 else port - 1}",
        b"k" * 32,
        path,
        flush_interval_s=0.02,
        heartbeat_interval_s=0.1,
        close_timeout_s=0.5,
    )
    for step in range(100):
        sender.buffer.append((RecordKind.METRICS, step, 0.0, 0.0, {"v": float(step)}))
    started = time.monotonic()
    assert sender.close(None, {}) is False  # waits close_timeout_s (0.5 s) for the BYE's ACK, then spills
    assert time.monotonic() - started < 5.0
    assert losses.snapshot()["spilled"] == 100
    # Sent once, so spilled as sent: in columns (``columns.records`` reads them back).
    steps = [record[1] for kind, _, body in spill.read(path) if kind == MessageKind.DATA
             for record in columns.records(body)]
    assert steps == list(range(100))


def test_a_stalled_aggregator_costs_a_sender_bounded_memory_in_bytes_too(tmp_path, monkeypatch):
    """Unacknowledged messages are bounded in bytes as well as in number: a message of array
    metrics can hold 32 MiB, so 4,000 of them would not be bounded at all.  Past the bound
    the older half is spilled, at once, and nothing is lost."""
    from simvue.transport import sender as sender_module

    monkeypatch.setattr(sender_module, "MAX_UNACKED_BYTES", 8 << 20)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")  # connected to, never read: nothing is acknowledged
    path = tmp_path / "spill.msgpack"
    sender, losses = make_sender(f"tcp://127.0.0.1:{port}", b"k" * 32, path, flush_interval_s=0.01,
                                 heartbeat_interval_s=0.1, close_timeout_s=0.5)
    array = bytes(1 << 20)  # one 1 MiB array value (131,072 float64)
    for step in range(40):
        sender.buffer.append((RecordKind.TENSOR, step, 0.0, 0.0, "field", [131_072], array))
        time.sleep(0.01)
    deadline = time.monotonic() + 10
    while losses.snapshot().get("spilled", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert losses.snapshot().get("spilled", 0) > 0  # spilled while the sender runs, not only at close
    assert sender._unacked_bytes <= (8 << 20) + (2 << 20)
    sender.close(None, {})
    router.close(0)
    assert losses.snapshot()["spilled"] == 40
    steps = [record[1] for kind, _, body in spill.read(path) if kind == MessageKind.DATA
             for record in columns.records(body)]
    assert steps == list(range(40))  # in order, every one


def test_a_sender_that_never_falls_silent_still_gets_acknowledged(store_dir):
    with Run() as run:
        run.init(name="busy")
        address = run._address
        sender, losses = make_sender(
            address.address, address.key, store_dir / "spill" / "busy.msgpack", flush_interval_s=0.005,
            heartbeat_interval_s=0.05,
        )
        deadline = time.monotonic() + 1.5
        step = 0
        while time.monotonic() < deadline:  # a record every millisecond: never 50 ms of silence
            sender.buffer.append((RecordKind.METRICS, step, 0.0, 0.0, {"v": 1.0}))
            step += 1
            time.sleep(0.001)
        assert len(sender._unacked) < 100  # acknowledged as it goes, not kept until close
        assert sender.close(None, {}, 10.0) is True
        assert losses.snapshot() == {}
    assert len(read_run(store_dir, "busy")["metrics"]["worker0/v"]) == step


def test_a_full_buffer_spills_after_a_short_wait_or_with_queue_blocking_waits_for_room(store_dir):
    """While the sender thread is held up (another thread holds its lock for a while), a full
    buffer is spilled after four flush intervals by default; with a longer wait
    (``queue_blocking``) the caller waits until the thread has made room, and nothing is
    spilled."""
    import threading

    def hold(lock, seconds, held):
        with lock:
            held.set()
            time.sleep(seconds)

    with Run() as run:
        run.init(name="full")
        address = run._address
        sender, losses = make_sender(address.address, address.key, store_dir / "spill" / "full.msgpack",
                                     flush_interval_s=0.05)
        for wait_s, spilled_so_far in ((None, 50), (10.0, 50)):  # the second wait spills nothing more
            assert sender.flush(10)
            held = threading.Event()
            holder = threading.Thread(target=hold, args=(sender._acked, 0.6, held))
            holder.start()
            held.wait()
            sender.wake()  # the sender thread now waits for the lock at its next flush check
            time.sleep(0.1)
            for step in range(50):
                sender.buffer.append((RecordKind.METRICS, step, 0.0, 0.0, {"v": 1.0}))
            started = time.monotonic()
            sender.buffer_full(50, wait_s)
            waited = time.monotonic() - started
            holder.join()
            assert losses.snapshot().get("spilled", 0) == spilled_so_far, (wait_s, waited)
            assert (waited < 0.45) if wait_s is None else (waited >= 0.3)
        assert sender.close(None, {}, 10.0) is True


def test_a_signed_message_with_a_malformed_body_cannot_end_the_aggregator(store_dir):
    """Correctly signed frames whose bodies are the wrong shape (a DATA body that is an int,
    a HELLO body that is a list, records of the wrong types) are dropped and counted; the
    aggregator goes on, and everything sent before and after is stored."""
    with Run() as run:
        run.init(name="malformed")
        key = run._address.key
        sock = raw_dealer(run._address.address)
        sock.send_multipart(protocol.encode(key, MessageKind.HELLO, 1, {"role": "worker", "pid": 1, "host": "h"}))
        assert recv_ack(sock, key)["run"]["name"] == "malformed"
        good = lambda seq, step: protocol.encode(  # noqa: E731
            key, MessageKind.DATA, seq, [[RecordKind.METRICS, step, 0.0, time.time(), {"x": float(step)}]]
        )
        sock.send_multipart(good(2, 0))
        sock.send_multipart(protocol.encode(key, MessageKind.DATA, 3, 12345))
        sock.send_multipart(protocol.encode(key, MessageKind.HELLO, 4, [1, 2, 3]))
        sock.send_multipart(protocol.encode(key, MessageKind.DATA, 5, [[RecordKind.METRICS, "step", 0.0, 0.0, {"x": 1.0}],
                                                                         [RecordKind.EVENT, 1.0, {"not": "text"}, "info"],
                                                                         [RecordKind.TAGS, "not-a-list"], "junk", None]))
        sock.send_multipart(protocol.encode(key, MessageKind.ACK, 6, None))  # a kind only the aggregator sends
        sock.send_multipart(good(7, 1))
        run.log_metrics({"after": 1.0})
        sock.send_multipart(protocol.encode(key, MessageKind.BYE, 8, {"status": None, "dropped": {}}))
        assert acked_up_to(sock, key, 8)["seq"] == 8
        sock.close()
    exported = read_run(store_dir, "malformed")
    assert exported["status"] == "completed"
    assert [(p[0], p[2]) for p in exported["metrics"]["worker0/x"]] == [(0, 0.0), (1, 1.0)]
    assert [p[2] for p in exported["metrics"]["after"]] == [1.0]
    losses = exported["metadata"]["simvue"]["losses"]
    assert losses["bad_message"] == 3 and losses["bad_record"] == 5, losses
    assert exported["tags"] == [] and exported["events"] == []


def test_a_record_the_sender_cannot_pack_is_dropped_alone_and_counted_in_the_run(store_dir):
    """A record that slipped past the Run API (an int beyond 64 bits, an object msgpack cannot
    pack, a lone surrogate) costs that record only: the sender goes on, the others arrive,
    and the run's metadata counts the loss."""
    with Run() as run:
        run.init(name="unpackable")
        address = run._address
        sender, losses = make_sender(address.address, address.key, store_dir / "spill" / "bad.msgpack")
        for step in range(30):
            sender.buffer.append((RecordKind.METRICS, step, 0.0, 0.0, {"v": float(step)}))
            if step == 10:
                sender.buffer.append((RecordKind.METRICS, 2**64, 0.0, 0.0, {"v": 1.0}))
                sender.buffer.append((RecordKind.EVENT, 0.0, "lone \ud800", "info"))
                sender.buffer.append((RecordKind.METADATA, {"x": object()}))
        assert sender.flush(10)
        sender.buffer.append((RecordKind.METRICS, 30, 0.0, 0.0, {"v": 30.0}))
        assert sender.close(None, {}, 10.0) is True
        assert losses.snapshot() == {"bad_record": 3}
    exported = read_run(store_dir, "unpackable")
    assert [p[0] for p in exported["metrics"]["worker0/v"]] == list(range(31))
    assert exported["metadata"]["simvue"]["losses"] == {"bad_record": 3}


def test_a_batch_larger_than_a_message_is_split_and_every_record_arrives(store_dir):
    from simvue.transport.protocol import MAX_PAYLOAD_BYTES

    with Run() as run:
        run.init(name="split")
        address = run._address
        sender, losses = make_sender(address.address, address.key, store_dir / "spill" / "split.msgpack")
        text = "y" * (1 << 20)
        count = MAX_PAYLOAD_BYTES // len(text) + 8  # more than one message's worth
        for i in range(count):
            sender.buffer.append((RecordKind.EVENT, float(i), f"{i} {text}", "info"))
        assert sender.close(None, {}, 30.0) is True
        assert losses.snapshot() == {}
    events = read_run(store_dir, "split")["events"]
    assert [int(e["message"].split()[1]) for e in events] == list(range(count))


def test_an_oversized_frame_from_anyone_is_refused_without_holding_it_in_memory(store_dir, tmp_path):
    """libzmq refuses a frame above MAX_FRAME_BYTES before reading it: a 256 MB frame from an
    unauthenticated local process leaves the aggregator's memory where it was."""
    import subprocess
    import sys
    import threading

    import psutil

    from simvue.transport.protocol import MAX_FRAME_BYTES

    with Run() as run:
        run.init(name="oversized")
        me = psutil.Process()
        before = me.memory_info().rss
        peak = [before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], me.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        code = (
            "import sys, uuid, zmq\n"
            "c = zmq.Context(); s = c.socket(zmq.DEALER); s.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)\n"
            "s.connect(sys.argv[1])\n"
            "s.send_multipart([b'm' * 32, b'x' * (256 << 20)]); s.close(linger=30000); c.term(); print('sent')\n"
        )
        result = subprocess.run([sys.executable, "-c", code, run._address.address], capture_output=True, text=True,
                                timeout=60)
        time.sleep(0.5)
        sampling.set()
        sampler.join()
        assert result.stdout.strip() == "sent", result.stderr
        run.log_metrics({"after": 1.0})
    grew = peak[0] - before
    assert grew < MAX_FRAME_BYTES, f"the aggregator's process grew by {grew / 2**20:.0f} MB"
    exported = read_run(store_dir, "oversized")
    assert exported["status"] == "completed" and exported["metrics"]["after"][0][2] == 1.0


def test_a_sender_told_the_run_is_over_neither_waits_nor_loses_what_it_logs_later(store_dir):
    """The aggregator's last words to a live sender (a drained pool worker outliving the run):
    flush, an artifact chunk and close return at once instead of waiting for answers that
    cannot come, and records logged after the end go to the spill file, counted."""
    with Run() as run:
        run.init(name="outlived")
        address = run._address
        sender, losses = make_sender(address.address, address.key, store_dir / "spill" / "late.msgpack",
                                     close_timeout_s=30.0)
        sender.buffer.append((RecordKind.METRICS, 0, 0.0, 0.0, {"v": 0.0}))
        assert sender.flush(10.0) is True
    assert sender.run_finished.wait(10.0), "no word that the run is over"
    assert sender.flush(10.0) is True  # nothing new: everything was acknowledged
    for step in range(1, 6):
        sender.buffer.append((RecordKind.METRICS, step, 0.0, 0.0, {"v": float(step)}))
    started = time.monotonic()
    assert sender.flush(10.0) is False
    chunk = (RecordKind.ARTIFACT_CHUNK, "late", 0, b"x")
    assert sender.put_bulk(chunk, protocol.MAX_ARTIFACT_BYTES_IN_FLIGHT, 10.0) is True  # room: queued
    assert sender.put_bulk(chunk, protocol.MAX_ARTIFACT_BYTES_IN_FLIGHT, 10.0) is False  # no room will come
    assert sender.close(None, {}) is False
    assert time.monotonic() - started < 5.0  # not the 30 s close timeout, nor put_bulk's 10 s
    assert losses.snapshot()["spilled"] == 6
    spilled = [record for kind, _, body in spill.read(store_dir / "spill" / "late.msgpack")
               if kind == MessageKind.DATA for record in columns.records(body)]
    assert [r[1] for r in spilled if r[0] == RecordKind.METRICS] == [1, 2, 3, 4, 5]
    assert [r for r in spilled if r[0] == RecordKind.ARTIFACT_CHUNK] == [list(chunk)]
    assert [p[0] for p in read_run(store_dir, "outlived")["metrics"]["worker0/v"]] == [0]


def test_a_wake_ends_the_receivers_poll_at_once_and_messages_still_arrive():
    """A close or a flush on another thread wakes the aggregator's loop (``Receiver.wake``)
    instead of waiting for its poll to time out; the wake-up itself is never taken for a
    message, and one that arrives is still reported."""
    import threading

    from simvue.aggregator.receiver import Binding, Receiver

    key = b"k" * 32
    receiver = Receiver(key, Binding())
    receiver.wake()  # before open: nothing to wake, and no error
    endpoint = receiver.open()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    try:
        threading.Timer(0.05, receiver.wake).start()
        started = time.monotonic()
        assert receiver.poll(60_000) is False  # woken: no message waiting
        assert time.monotonic() - started < 30
        for _ in range(1000):  # many wakes before one poll: one pipe read drains them all
            receiver.wake()
        assert receiver.poll(60_000) is False
        dealer.connect(endpoint)
        dealer.send_multipart(protocol.encode(key, MessageKind.HEARTBEAT, 1, None))
        assert receiver.poll(60_000) is True
        received = receiver.receive()
        assert received is not None and received[1][0] is MessageKind.HEARTBEAT
        assert receiver.receive() is None
    finally:
        dealer.close(0)
        context.term()
        receiver.close()
    receiver.wake()  # after close: nothing to wake, and no error


def test_the_aggregator_makes_room_for_a_connection_per_rank_or_says_what_to_raise():
    """A ROUTER socket holds a file per connected rank: with a soft limit of 1,024 open files a
    job of about a thousand ranks could not connect.  The limit is raised to the hard one when
    the job needs it, and a hard limit too low is named, with what to do."""
    code = textwrap.dedent(
        """
        import resource, sys
        from simvue.aggregator.receiver import make_room_for_connections
        hard = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        small = make_room_for_connections(10)           # fits: left alone
        after_small = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        big = make_room_for_connections(400)
        print(repr(small), after_small, resource.getrlimit(resource.RLIMIT_NOFILE)[0], repr(big))
        """
    )
    roomy = subprocess.run([sys.executable, "-c", code, "1024"], capture_output=True, text=True, check=True)
    assert roomy.stdout.split() == ["None", "128", "1024", "None"]
    short = subprocess.run([sys.executable, "-c", code, "256"], capture_output=True, text=True, check=True)
    small, after_small, soft, message = short.stdout.split(" ", 3)
    assert (small, after_small, soft) == ("None", "128", "256")
    assert "400 processes need about 464 open files" in message and "only 256" in message
    assert "ulimit -Hn" in message


# -- metric points in columns ------------------------------------------------------------------

MIXED = [  # what a process might log: one set of names, sets that alternate, sets that overlap
    *[(RecordKind.METRICS, step, step * 0.1, 1e9 + step, {"loss": step / 2, "acc": 1.0 - step / 100})
      for step in range(40)],
    (RecordKind.EVENT, 1e9 + 40, "halfway", "info"),
    *[(RecordKind.METRICS, step, step * 0.1, 1e9 + step, {"loss": step / 2} if step % 2 else {"val": float(step)})
      for step in range(40, 60)],
    (RecordKind.STATUS, "running"),
    *[(RecordKind.METRICS, step, step * 0.1, 1e9 + step, {"loss": 1.0, "acc": 2.0} if step % 3 else {"loss": 3.0})
      for step in range(60, 70)],
    (RecordKind.METRICS, 70, 7.0, 1e9 + 70, {"acc": 0.5, "loss": 0.25}),  # its names in another order
    (RecordKind.METRICS, 71, 7.1, 1e9 + 71, {"loss": 0.125, "acc": 0.75}),
    (RecordKind.TAGS, ["end"]),
]


def _as_floats(record):
    """``record`` as it decodes (lists, plain ints), metric values as floats."""
    if record[0] == RecordKind.METRICS:
        record = (RecordKind.METRICS, record[1], record[2], record[3], {k: float(v) for k, v in record[4].items()})
    return msgpack.unpackb(msgpack.packb(record))


def test_a_senders_metric_points_travel_in_columns_and_read_back_in_the_order_logged(tmp_path):
    """What a real sender puts on the wire: its METRICS records as METRIC_COLUMNS records
    (about two thirds of the bytes), every other record where it was, and each metric's
    points in the order they were logged."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    key = b"k" * 32
    losses = LossCounter()
    sender = Sender(f"tcp://127.0.0.1:{port}", key, {"role": "worker", "pid": 2, "host": "h"},
                    flush_interval_s=0.05, heartbeat_interval_s=10.0, close_timeout_s=0.2,
                    spill=SpillFile(tmp_path / "spill.msgpack", losses), losses=losses, abort=AbortSignal(),
                    buffer=deque(MIXED))
    try:
        body = None
        while body is None:
            assert router.poll(5000), "nothing from the sender"
            message = protocol.decode(key, router.recv_multipart()[1:])
            if message.kind == MessageKind.DATA:
                body = message.body
    finally:
        sender.close(None, {}, 0.2)
        router.close()
    kinds = [record[0] for record in body]
    assert kinds.count(RecordKind.METRIC_COLUMNS) >= 4
    assert [k for k in kinds if k not in (RecordKind.METRICS, RecordKind.METRIC_COLUMNS)] == [
        RecordKind.EVENT, RecordKind.STATUS, RecordKind.TAGS]
    read_back = [_as_floats(record) for record in columns.records(body)]
    expected = [_as_floats(record) for record in MIXED]
    assert sorted(read_back, key=repr) == sorted(expected, key=repr)  # nothing lost, nothing changed

    def series(records):  # each metric's points, and where each other record stood among them
        points, marks = {}, []
        for record in records:
            if record[0] == RecordKind.METRICS:
                for name, value in record[4].items():
                    points.setdefault(name, []).append((record[1], record[2], record[3], value))
            else:
                marks.append((record, {name: len(p) for name, p in points.items()}))
        return points, marks

    assert series(read_back) == series(expected)
    plain = len(msgpack.packb([list(r) for r in MIXED]))
    assert len(msgpack.packb(body)) < plain


def test_a_mix_of_metric_names_from_a_sender_is_stored_in_logging_order(store_dir):
    with Run() as run:
        run.init(name="mixed")
        address = run._address
        sender, losses = make_sender(address.address, address.key, store_dir / "spill" / "mixed.msgpack")
        for _ in range(3):  # several batches: the stretches of each are packed on their own
            sender.buffer.extend(MIXED[:-1])
            assert sender.flush(10.0) is True
        assert sender.close(None, {}, 10.0) is True
        assert losses.snapshot() == {}
    exported = read_run(store_dir, "mixed")
    for name in ("loss", "acc", "val"):
        logged = [(r[1], float(r[4][name])) for r in MIXED if r[0] == RecordKind.METRICS and name in r[4]] * 3
        assert [(p[0], p[2]) for p in exported["metrics"][f"worker0/{name}"]] == logged, name
    assert [e["message"] for e in exported["events"]] == ["[worker0] halfway"] * 3
    assert exported["metadata"]["simvue"].get("losses") is None


def test_forged_metric_columns_over_the_socket_are_dropped_and_counted_and_the_rest_is_stored(store_dir):
    """Correctly signed DATA whose columns lie (lengths that differ or are not multiples of
    8, more names than columns, a huge count, a negative step, a nan time) cannot end the
    aggregator or spoil the commit they fall in; the good records around them are stored."""
    import struct

    def cols(names, steps, times, values, rows=None):
        pack = lambda code, items: struct.pack(f"<{len(items)}{code}", *items)  # noqa: E731
        return [RecordKind.METRIC_COLUMNS, len(steps) if rows is None else rows, names, pack("q", steps),
                pack("d", times), pack("d", [1e9] * len(steps)), [pack("d", v) for v in values]]

    forged = [
        cols(["x"], [5, 6], [0.0], [[1.0, 2.0]], rows=2),
        [*cols(["x"], [5, 6], [0.0, 0.0], [[1.0, 2.0]])[:3], b"\0" * 15, *cols(["x"], [5, 6], [0.0, 0.0], [[1.0, 2.0]])[4:]],
        cols(["x", "y"], [5, 6], [0.0, 0.0], [[1.0, 2.0]]),
        cols(["x"], [5, 6], [0.0, 0.0], [[1.0, 2.0]], rows=2**62),
        cols(["x"], [5, -6], [0.0, 0.0], [[1.0, 2.0]]),
        cols(["x"], [5, 6], [0.0, float("nan")], [[1.0, 2.0]]),
    ]
    with Run() as run:
        run.init(name="forged-columns")
        key = run._address.key
        sock = raw_dealer(run._address.address)
        sock.send_multipart(protocol.encode(key, MessageKind.HELLO, 1, {"role": "worker", "pid": 1, "host": "h"}))
        assert recv_ack(sock, key)["run"]["name"] == "forged-columns"
        sock.send_multipart(protocol.encode(key, MessageKind.DATA, 2, [cols(["x"], [0, 1], [0.0, 0.1], [[0.5, 1.5]]),
                                                                       *forged,
                                                                       cols(["x"], [2, 3], [0.2, 0.3], [[2.5, 3.5]])]))
        run.log_metrics({"after": 1.0})
        sock.send_multipart(protocol.encode(key, MessageKind.BYE, 3, {"status": None, "dropped": {}}))
        assert acked_up_to(sock, key, 3)["seq"] == 3
        sock.close()
    exported = read_run(store_dir, "forged-columns")
    assert exported["status"] == "completed"
    assert [(p[0], p[2]) for p in exported["metrics"]["worker0/x"]] == [(0, 0.5), (1, 1.5), (2, 2.5), (3, 3.5)]
    assert "worker0/y" not in exported["metrics"]
    assert exported["metrics"]["after"][0][2] == 1.0
    losses = exported["metadata"]["simvue"]["losses"]
    assert set(losses) == {"bad_record"} and losses["bad_record"] >= len(forged), losses


def test_a_process_speaking_another_protocol_version_is_named_and_counted_not_fatal(store_dir, capfd):
    """A correctly signed message from another simvue's protocol (here version 1, a release
    before metric columns) is dropped, counted as ``protocol_version`` and named once on
    stderr and in the run's events; the run goes on and ends completed."""
    import hashlib
    import hmac

    with Run() as run:
        run.init(name="versions")
        key = run._address.key
        sock = raw_dealer(run._address.address)
        for seq, (kind, body) in enumerate([(MessageKind.HELLO, {"role": "worker", "pid": 1, "host": "h"}),
                                            (MessageKind.DATA, [[RecordKind.METRICS, 0, 0.0, 0.0, {"x": 1.0}]])], 1):
            payload = msgpack.packb([protocol.PROTOCOL_VERSION - 1, kind, seq, body])
            sock.send_multipart([hmac.new(key, payload, hashlib.sha256).digest(), payload])
        run.log_metrics({"mine": 1.0})
        time.sleep(0.5)
        sock.close()
    exported = read_run(store_dir, "versions")
    assert exported["status"] == "completed"
    assert exported["metadata"]["simvue"]["losses"] == {"protocol_version": 2}
    assert list(exported["metrics"]) == ["mine"]
    named = [e["message"] for e in exported["events"] if "protocol version" in e["message"]]
    assert len(named) == 1 and f"version {protocol.PROTOCOL_VERSION - 1}" in named[0]
    assert capfd.readouterr().err.count(f"protocol version {protocol.PROTOCOL_VERSION - 1}") == 1


def test_a_goodbye_stops_waiting_when_the_run_ends_before_acknowledging_it(tmp_path):
    """A pool worker's goodbye can cross the aggregator's farewell (the run ended while the
    worker was exiting): the farewell does not cover the goodbye, and nothing else will come.
    The close returns then, not after the 30 s close timeout."""
    key = b"k" * 32
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    sender, _ = make_sender(f"tcp://127.0.0.1:{port}", key, tmp_path / "spill.msgpack", close_timeout_s=30.0)
    try:
        assert router.poll(5000), "no HELLO"
        identity, *frames = router.recv_multipart()
        kind, seq, _ = protocol.decode(key, frames)
        assert kind is MessageKind.HELLO
        router.send_multipart([identity, *protocol.encode(key, MessageKind.ACK, 0, {"seq": seq, "closed": False})])
        started = time.monotonic()
        closing = Thread(target=lambda: closed.append(sender.close(None, {})))
        closed: list[bool] = []
        closing.start()
        deadline = time.monotonic() + 10
        while True:  # until the goodbye arrives (heartbeats may come first)
            assert router.poll(max(1, int((deadline - time.monotonic()) * 1000))), "no BYE"
            identity, *frames = router.recv_multipart()
            kind, bye_seq, _ = protocol.decode(key, frames)
            if kind is MessageKind.BYE:
                break
        farewell = {"seq": bye_seq - 1, "closed": True, "finished": True}  # the last commit, without the BYE
        router.send_multipart([identity, *protocol.encode(key, MessageKind.ACK, 0, farewell)])
        closing.join(15)
        assert closed == [False]  # its goodbye was never acknowledged, and close says so
        assert time.monotonic() - started < 5.0, "the goodbye waited out the close timeout"
    finally:
        router.close(0)
