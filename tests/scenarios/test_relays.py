"""Per-node relays (docs/mpi.md, "Relays") with real processes and sockets: three simulated
nodes of four ranks on this machine (``SIMVUE_HOST``), each a plain Python process given
its rank through Slurm's variables, with ``SIMVUE_RELAY=on``.  Each node other than rank 0's
gets exactly one relay, the aggregator holds one connection per such node, and every point
of every rank is stored, also when a relay is killed in the middle of the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_for_status

from simvue.topology import detect
from simvue.transport import rendezvous

pytestmark = [pytest.mark.mpi_skip, pytest.mark.timeout(90)]

NODES, PER_NODE = ("nodeA", "nodeB", "nodeC"), 4
SIZE = len(NODES) * PER_NODE
STEPS = 300
RANK = textwrap.dedent(
    """
    import sys, time
    from simvue import Run
    with Run() as run:
        run.init(name=sys.argv[1])
        for step in range(int(sys.argv[2])):
            run.log_metrics({"x": float(step)}, step=step)
            time.sleep(0.03)
            if step in (50, 250):  # acknowledged through the relay: in the store
                t0 = time.monotonic()
                print(f"flush {run.flush(5.0)} {time.monotonic() - t0:.2f}", flush=True)
    """
)


@pytest.fixture
def runtime_dir():
    # Short, private and this test's own: a Unix socket's path has at most 107 bytes.
    path = tempfile.mkdtemp(prefix="svr")
    yield path
    for name in os.listdir(path):
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    os.rmdir(path)


def _env(rank: int, runtime_dir: str, scaled: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_", "HYD"))}
    env.pop("SIMVUE_AGGREGATOR", None)
    env.update(scaled)
    env.update(
        SLURM_JOB_ID="5151", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS=str(SIZE),
        SLURM_LOCALID=str(rank % PER_NODE), SIMVUE_HOST=NODES[rank // PER_NODE], SIMVUE_RELAY="on",
        SIMVUE_RUNTIME_DIR=runtime_dir, SIMVUE_RENDEZVOUS_TIMEOUT_S="20",
    )
    return env


def _start(name: str, runtime_dir: str, scaled: dict[str, str], steps: int = STEPS) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-c", RANK, name, str(steps)], env=_env(rank, runtime_dir, scaled),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(SIZE)
    ]


def _relays(ranks: list[subprocess.Popen]) -> list[psutil.Process]:
    pids = {p.pid for p in ranks}
    found = []
    for process in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = process.info["cmdline"] or []
        if "simvue.transport.relay" in cmdline and process.info["ppid"] in pids:
            found.append(process)
    return found


def _wait_for_relays(ranks: list[subprocess.Popen], count: int, timeout_s: float = 20.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while True:
        relays = _relays(ranks)
        if len(relays) >= count or time.monotonic() > deadline:
            return relays
        time.sleep(0.1)


def _aggregator_port(rank0_env: dict[str, str]) -> int:
    address = rendezvous.find_file(rendezvous.file_for(detect(rank0_env), 1), 20.0)
    assert address is not None, "rank 0 published no address"
    assert address.host == "nodeA"
    return int(address.address.rpartition(":")[2])


def _connections(pid: int, port: int, *, local: bool) -> int:
    count = 0
    for conn in psutil.Process(pid).net_connections("tcp"):
        end = conn.laddr if local else conn.raddr
        if end and end.port == port and conn.status == psutil.CONN_ESTABLISHED:
            count += 1
    return count


def _finish(ranks: list[subprocess.Popen], timeout_s: float = 60.0) -> list[tuple[int, str]]:
    out = []
    for process in ranks:
        try:
            stdout, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, err = process.communicate()
        flushes = [line for line in stdout.splitlines() if line.startswith("flush ")]
        if process.returncode == 0 and not all(line.startswith("flush True") for line in flushes) or len(flushes) != 2:
            err += f"\nflushes: {flushes}"
            out.append((-1, err))
        else:
            out.append((process.returncode, err))
    return out


def _check_every_point(store_dir: Path, name: str) -> dict:
    run = wait_for_status(store_dir, name, timeout_s=30)
    assert run["status"] == "completed", run["status"]
    for rank in range(SIZE):
        steps = [p[0] for p in run["metrics"].get(f"rank{rank}/x", [])]
        assert steps == list(range(STEPS)), f"rank{rank}: {len(steps)} points"
    assert "losses" not in run["metadata"]["simvue"], run["metadata"]["simvue"].get("losses")
    assert "lost" not in run["metadata"]["simvue"], run["metadata"]["simvue"]["lost"]
    return run


def test_one_relay_and_one_connection_per_other_node(store_dir, scaled_timeouts, runtime_dir):
    ranks = _start("relayed", runtime_dir, scaled_timeouts)
    try:
        port = _aggregator_port(_env(0, runtime_dir, scaled_timeouts))
        relays = _wait_for_relays(ranks, 2)
        assert len(relays) == 2, [r.cmdline() for r in relays]
        relayed = ranks[PER_NODE:]
        # The aggregator: a process of its own, started by rank 0 (``aggregate_in``).
        aggregator = next(p for p in psutil.Process(ranks[0].pid).children()
                          if "simvue.aggregator.host" in " ".join(p.cmdline()))
        deadline = time.monotonic() + 15
        while True:  # every rank has connected by now or soon
            direct = _connections(aggregator.pid, port, local=True)
            if direct == PER_NODE + 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # rank 0's node: its 4 ranks (rank 0 too, the run's owner) directly; nodes B and C:
        # their relay each.
        assert direct == PER_NODE + 2, direct
        for relay in relays:
            assert _connections(relay.pid, port, local=False) == 1
        for process in relayed:
            assert _connections(process.pid, port, local=False) == 0, f"pid {process.pid} connects directly"
        time.sleep(2.0)
        assert len(_relays(ranks)) == 2, "a second relay started on a node"
    finally:
        results = _finish(ranks)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err}"
        assert "relay has ended" not in err, err
    _check_every_point(store_dir, "relayed")
    deadline = time.monotonic() + 10
    while _relays(ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [r for r in relays if r.is_running() and r.status() != psutil.STATUS_ZOMBIE], "a relay outlived its ranks"


def test_a_killed_relay_costs_nothing(store_dir, scaled_timeouts, runtime_dir):
    ranks = _start("relay-killed", runtime_dir, scaled_timeouts)
    try:
        relays = _wait_for_relays(ranks, 2)
        assert len(relays) == 2
        time.sleep(3.0)  # well into the run: messages in flight through the relay
        victim = next(r for r in relays if r.environ().get("SIMVUE_HOST") == "nodeB")
        victim.send_signal(signal.SIGKILL)
    finally:
        results = _finish(ranks)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err}"
        if NODES[rank // PER_NODE] == "nodeB":
            assert "relay has ended" in err, f"rank {rank} did not notice: {err}"
        else:
            assert "relay has ended" not in err, f"rank {rank}: {err}"
    run = _check_every_point(store_dir, "relay-killed")
    processes = run["metadata"]["simvue"]["processes"]
    assert all(processes[f"rank{r}"]["state"] == "done" for r in range(1, SIZE))
    # Each of node B's ranks said HELLO again and sent its unacknowledged messages, counted
    # apart (``resent``), not as losses; the other nodes' ranks sent nothing twice.
    for rank in range(1, SIZE):
        resent = processes[f"rank{rank}"].get("resent", 0)
        assert (resent >= 1) if NODES[rank // PER_NODE] == "nodeB" else resent == 0, (rank, resent)
