"""Attacks on a job from another local process or user: a guessed transport key, a planted
rendezvous file.  Ranks are real processes started with Slurm's variables (no srun needed),
the attacker real ZeroMQ sockets."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import zmq

from simvue.topology import detect
from simvue.transport import protocol, rendezvous
from simvue.transport.protocol import MessageKind, RecordKind

from conftest import read_run

RANK = textwrap.dedent(
    """
    import sys
    from simvue import Run
    with Run() as run:
        run.init(name=sys.argv[1])
        for step in range(300):
            run.log_metrics({"x": float(step)}, step=step)
    """
)


def slurm(rank: int, size: int = 2, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS=str(size),
               SLURM_LOCALID=str(rank), SIMVUE_RENDEZVOUS_TIMEOUT_S="10", **extra)
    return env


def start(env: dict[str, str], name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RANK, name], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_planted_rendezvous_file_is_refused_and_its_planter_receives_nothing(store_dir, tmp_path):
    """Another user plants the file a rank looks for, naming an address of theirs: the rank
    refuses it at once, says why, and keeps its records in a spill file."""
    env = slurm(1)
    path = rendezvous.file_for(detect(env), 1)
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    thief = zmq.Context.instance().socket(zmq.ROUTER)
    thief.setsockopt(zmq.LINGER, 0)
    port = thief.bind_to_random_port("tcp://127.0.0.1")
    planted = rendezvous.AggregatorAddress(address=f"tcp://127.0.0.1:{port}", key=b"t" * 32, run_name="stolen",
                                           run_id="x", started=time.time(), pid=1)
    path.write_text(planted.to_json())
    if os.geteuid() == 0:
        os.chmod(path, 0o600)
        os.chown(path, 65534, 65534)  # another user's file
        reason = "belongs to user id 65534"
    else:
        os.chmod(path, 0o644)  # a file others can read: not trusted either
        reason = "only you can read"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", RANK, "victim"], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "refused the rendezvous" in result.stderr and reason in result.stderr, result.stderr
    assert took < 10, f"the rank waited {took:.0f} s before giving up"
    assert not thief.poll(500), "the planted address received a message"
    thief.close()
    spilled = list((store_dir / "spill").glob("*-rank1-*.msgpack"))
    assert len(spilled) == 1
    from simvue.transport import spill

    steps = [record[1] for kind, _, body in spill.read(spilled[0]) if kind == MessageKind.DATA for record in body]
    assert steps == list(range(300))


def test_with_an_explicit_address_and_no_key_the_key_is_random_and_a_guessed_one_forges_nothing(store_dir):
    """``SIMVUE_AGGREGATOR_ADDRESS`` without ``SIMVUE_AGGREGATOR_KEY``: rank 0 makes a random
    key and rank 1 reads it from the private rendezvous file.  Frames signed with the key an
    attacker would guess from the address (as older versions derived it) are dropped."""
    address = f"tcp://127.0.0.1:{free_port()}"
    name = "explicit"
    rank0 = start(slurm(0, SIMVUE_AGGREGATOR_ADDRESS=address), name)
    path = rendezvous.file_for(detect(slurm(1)), 1)
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), rank0.stderr.read() if rank0.poll() is not None else "no rendezvous file"
    guessed = hashlib.sha256(f"simvue:{address}".encode()).digest()
    forger = zmq.Context.instance().socket(zmq.DEALER)
    forger.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
    forger.setsockopt(zmq.LINGER, 1000)
    forger.connect(address)
    forger.send_multipart(protocol.encode(guessed, MessageKind.HELLO, 1, {"role": "worker", "pid": 1, "host": "h"}))
    forger.send_multipart(protocol.encode(guessed, MessageKind.DATA, 2, [[RecordKind.METRICS, 0, 0.0, 0.0, {"forged": 1.0}],
                                                                          [RecordKind.STATUS, "failed"]]))
    forger.send_multipart(protocol.encode(guessed, MessageKind.BYE, 3, {"status": "failed", "dropped": {}}))
    time.sleep(0.5)
    forger.close()
    rank1 = start(slurm(1, SIMVUE_AGGREGATOR_ADDRESS=address), name)
    for rank in (rank1, rank0):
        out, err = rank.communicate(timeout=120)
        assert rank.returncode == 0, err
        assert "Warning" not in err, err
    run = read_run(store_dir, name)
    assert run["status"] == "completed"
    assert set(run["metrics"]) == {"rank0/x", "rank1/x"}
    for rank in (0, 1):
        assert [p[0] for p in run["metrics"][f"rank{rank}/x"]] == list(range(300))
    assert run["metadata"]["simvue"]["losses"] == {"bad_frame": 3}
    assert not Path(path).exists()  # removed once the run has ended


def _non_loopback_ipv4() -> str | None:
    import ipaddress

    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    return None


def test_traffic_that_can_leave_the_node_is_encrypted(store_dir):
    """On an address other nodes can reach, the aggregator speaks CURVE: a client without the
    run's key cannot even complete the handshake, and the ranks' own traffic goes through."""
    import secrets

    import pytest

    ip = _non_loopback_ipv4()
    if ip is None or not zmq.has("curve"):
        pytest.skip("no network interface besides loopback, or no CURVE in libzmq")
    with socket.socket() as probe:
        probe.bind((ip, 0))
        port = probe.getsockname()[1]
    address = f"tcp://{ip}:{port}"
    key = secrets.token_hex(32)
    extra = {"SIMVUE_AGGREGATOR_ADDRESS": address, "SIMVUE_AGGREGATOR_KEY": key}
    rank0 = start(slurm(0, **extra), "encrypted")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                raw = socket.create_connection((ip, port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and rank0.poll() is None, "rank 0 never listened"
                time.sleep(0.05)
        with raw:
            raw.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00")  # a ZMTP 3.0 greeting's first part
            greeting = b""
            while len(greeting) < 32:
                chunk = raw.recv(64)
                if not chunk:
                    break
                greeting += chunk
        assert greeting[12:17] == b"CURVE", greeting  # the security mechanism the aggregator asks for
        plain = zmq.Context.instance().socket(zmq.DEALER)  # the right HMAC key, but no CURVE
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(address)
        plain.send_multipart(protocol.encode(bytes.fromhex(key), MessageKind.HELLO, 1, {"role": "worker", "pid": 1}))
        assert not plain.poll(1000), "a client without CURVE got an answer"
        plain.close()
        rank1 = start(slurm(1, **extra), "encrypted")
        for rank in (rank1, rank0):
            out, err = rank.communicate(timeout=120)
            assert rank.returncode == 0, err
    finally:
        for job in (rank0,):
            if job.poll() is None:
                job.kill()
    run = read_run(store_dir, "encrypted")
    assert run["status"] == "completed"
    assert {name: len(points) for name, points in run["metrics"].items()} == {"rank0/x": 300, "rank1/x": 300}
