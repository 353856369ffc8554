"""A stand-in for ``torchrun`` (torch's wheel is too large for CI here): it starts
``--nproc-per-node`` workers of a script on this node with exactly the environment torchrun
gives its workers, and restarts them all, up to ``--max-restarts`` times, when one fails
(torchrun's elastic agent: SIGTERM to the others, then a new attempt with the same run id).

    python torchrun_like.py --nproc-per-node 4 [--max-restarts N] [--rdzv-id ID] script.py [args]
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


def worker_env(rank: int, size: int, run_id: str, restart: int, max_restarts: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
        GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(size), ROLE_NAME="default",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID=run_id,
        TORCHELASTIC_RESTART_COUNT=str(restart), TORCHELASTIC_MAX_RESTARTS=str(max_restarts),
        TORCHELASTIC_USE_AGENT_STORE="True", TORCH_NCCL_ASYNC_ERROR_HANDLING="1", OMP_NUM_THREADS="1",
    )
    return env


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--rdzv-id", default=None)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    run_id = args.rdzv_id or uuid.uuid4().hex[:12]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for restart in range(args.max_restarts + 1):
        workers = [
            subprocess.Popen([sys.executable, args.script, *args.args],
                             env=worker_env(rank, args.nproc_per_node, run_id, restart, args.max_restarts, port))
            for rank in range(args.nproc_per_node)
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
