"""A stand-in for ``torchrun`` (torch's wheel is too large for CI here): it starts
``--nproc-per-node`` workers of a script on this node with exactly the environment torchrun
gives its workers, and restarts them all, up to ``--max-restarts`` times, when one fails
(torchrun's elastic agent: SIGTERM to the others, then a new attempt with the same run id).
``--nnodes N`` starts N agents' worth of workers, as N nodes would: each "node" has its own
``GROUP_RANK`` and ``LOCAL_WORLD_SIZE``, and ``MASTER_ADDR`` is this host's name, not
loopback, as on a real multi-node job.

    python torchrun_like.py --nproc-per-node 4 [--nnodes N] [--max-restarts N] [--rdzv-id ID] script.py [args]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid


def worker_env(node: int, nnodes: int, local_rank: int, nproc: int, run_id: str, restart: int, max_restarts: int,
               master: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    rank, size = node * nproc + local_rank, nnodes * nproc
    env.update(
        RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK=str(node), GROUP_WORLD_SIZE=str(nnodes), ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(size),
        ROLE_NAME="default", MASTER_ADDR=master, MASTER_PORT=str(port), TORCHELASTIC_RUN_ID=run_id,
        TORCHELASTIC_RESTART_COUNT=str(restart), TORCHELASTIC_MAX_RESTARTS=str(max_restarts),
        TORCHELASTIC_USE_AGENT_STORE="True", TORCH_NCCL_ASYNC_ERROR_HANDLING="1", OMP_NUM_THREADS="1",
    )
    return env


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--rdzv-id", default=None)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    run_id = args.rdzv_id or uuid.uuid4().hex[:12]
    master = "127.0.0.1" if args.nnodes == 1 else socket.getfqdn()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for restart in range(args.max_restarts + 1):
        workers = [
            subprocess.Popen([sys.executable, args.script, *args.args],
                             env=worker_env(node, args.nnodes, local_rank, args.nproc_per_node, run_id, restart,
                                            args.max_restarts, master, port))
            for node in range(args.nnodes)
            for local_rank in range(args.nproc_per_node)
        ]
        failed = False
        while any(w.poll() is None for w in workers):
            if any(w.poll() not in (None, 0) for w in workers):
                failed = True
                for w in workers:
                    if w.poll() is None:
                        w.send_signal(signal.SIGTERM)  # as torchrun's agent stops the others
                break
            time.sleep(0.05)
        for w in workers:
            w.wait()
        failed = failed or any(w.returncode != 0 for w in workers)
        if not failed:
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
