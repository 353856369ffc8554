"""Resource sampling under mpiexec (2 and 4 ranks, one node): one sampler for the node,
started by rank 0, and resource series for every rank.  See tests/mpi/test_mpi_run.py for
how the ranks share results."""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest

from simvue import Run
from simvue.resources import node_name

from test_mpi_run import _finished_run, allgather, shared_store, comm  # noqa: F401 - fixtures

pytestmark = pytest.mark.mpi


def _sampler_processes() -> int:
    """This process's descendants that are resource samplers (rank 0's sampler is started by
    the aggregator's process, a child of rank 0)."""
    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if "simvue.resources.agent" in " ".join(child.cmdline()):
                count += 1
        except psutil.Error:
            continue
    return count


def test_one_sampler_per_node_and_series_for_every_rank(comm, shared_store):  # noqa: F811
    rank, size = comm.Get_rank(), comm.Get_size()
    run = Run()
    run.config(resources_metrics_interval=1)
    started = run.init(name=f"mpi-resources-n{size}-{os.getpid()}" if rank == 0 else None)
    block = bytearray((20 + 10 * rank) * 2**20)  # rank k holds 20 + 10k MB more than at start
    for i in range(0, len(block), 4096):
        block[i] = 1
    for step in range(25):
        run.log_metrics({"step": step})
        time.sleep(0.1)
    samplers = _sampler_processes()
    closed = run.close()
    del block
    everyone = allgather(comm, {"rank": rank, "init": started, "closed": closed, "name": run.name, "samplers": samplers})
    name = everyone[0]["name"]
    host = node_name(socket.gethostname())

    def check(stored: dict):
        metrics = stored["metrics"]
        if stored["status"] != "completed":
            yield f"status {stored['status']!r}"
        for k in range(size):
            for series in ("cpu.usage.percentage", "memory.usage", "threads"):
                points = metrics.get(f"resources/rank{k}/{series}", [])
                if len(points) < 2:
                    yield f"resources/rank{k}/{series}: {len(points)} points, expected at least 2"
            rss = [p[2] for p in metrics.get(f"resources/rank{k}/memory.usage", [])]
            if rss and max(rss) < 20 + 10 * k:
                yield f"rank{k} RSS peaked at {max(rss):.0f} MB, below the {20 + 10 * k} MB it held"
        nodes = {name.split("/")[2] for name in metrics if name.startswith("resources/node/")}
        if nodes != {host}:
            yield f"node series for {sorted(nodes)}, expected only {host}"
        steps = [p[0] for p in metrics.get(f"resources/node/{host}/memory.usage", [])]
        if len(steps) < 3 or steps != list(range(len(steps))):
            yield f"node samples numbered {steps}: expected one sampler's 0, 1, 2, ..."
        if [n for n in metrics if n.startswith("resources/") and n.split("/")[1] not in {"node"} | {f"rank{k}" for k in range(size)}]:
            yield "plain (single-process) names in an MPI run"
        facts = stored["metadata"]["simvue"].get("hosts", {}).get(host, {})
        if (facts.get("mpi") or {}).get("size") != size or facts.get("cpus") != psutil.cpu_count():
            yield f"host facts {facts}"

    _, problems = _finished_run(comm, shared_store, name, check)
    for result in everyone:
        assert result["init"] is True and result["closed"] is True, result
        want = 1 if result["rank"] == 0 else 0
        assert result["samplers"] == want, f"rank {result['rank']} ran {result['samplers']} samplers, expected {want}"
    assert not problems, "\n".join(problems)
