"""The wire between senders and the aggregator: authentication, sequence numbers,
acknowledged close, and spilling when no aggregator answers.  Real ZeroMQ sockets."""

from __future__ import annotations

import time
import uuid

import zmq

from simvue import Run
from simvue.abort import AbortSignal
from simvue.losses import LossCounter
from simvue.transport import columns, protocol, spill
from simvue.transport.protocol import MessageKind, RecordKind
from simvue.transport.sender import Sender
from simvue.transport.spill import SpillFile

from conftest import read_run


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
