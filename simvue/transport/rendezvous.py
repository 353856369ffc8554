"""How a rank or worker finds its run's aggregator (address, HMAC key, run identity).

In order of precedence:

1. ``SIMVUE_AGGREGATOR``: the JSON an aggregator exports into its own environment, so that
   processes it starts (pool workers, subprocesses) join its run.
2. ``SIMVUE_AGGREGATOR_ADDRESS`` (+ ``SIMVUE_AGGREGATOR_KEY``, hex): an explicit address
   for multi-node jobs; rank 0 binds it, the other ranks connect to it.
3. ``mpi4py``, only if the user already imported and initialised it: rank 0 broadcasts.
4. A rendezvous file keyed by the job id and the run's ordinal in the process, written by
   rank 0 atomically with mode 0600 under ``$SIMVUE_RENDEZVOUS_DIR`` (default
   ``~/.cache/simvue/rendezvous``) and polled by the other ranks.

Every wait is bounded by ``timeout_s``; ``None`` means "not found" and the caller spills.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .._util import safe_filename
from ..topology import Topology, initialised_mpi

INHERITED_ENV = "SIMVUE_AGGREGATOR"
ADDRESS_ENV = "SIMVUE_AGGREGATOR_ADDRESS"
KEY_ENV = "SIMVUE_AGGREGATOR_KEY"
DIRECTORY_ENV = "SIMVUE_RENDEZVOUS_DIR"
MPI_MESSAGE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class AggregatorAddress:
    """Everything a sender needs to join a run."""

    address: str
    key: bytes
    run_name: str | None = None
    run_id: str | None = None
    started: float | None = None
    pid: int | None = None

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["key"] = self.key.hex()
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str | bytes) -> AggregatorAddress:
        fields: dict[str, Any] = json.loads(text)
        fields["key"] = bytes.fromhex(fields["key"])
        return cls(**fields)


def inherited() -> AggregatorAddress | None:
    """The run of the process that started this one, if it exported one (never our own)."""
    raw = os.environ.get(INHERITED_ENV)
    if not raw:
        return None
    try:
        address = AggregatorAddress.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return None
    return None if address.pid == os.getpid() else address


def export(address: AggregatorAddress | None) -> None:
    """Make processes started from now on join ``address`` (or nothing, for ``None``)."""
    if address is None:
        os.environ.pop(INHERITED_ENV, None)
    else:
        os.environ[INHERITED_ENV] = address.to_json()


def explicit() -> tuple[str, bytes | None] | None:
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        return None
    key = os.environ.get(KEY_ENV)
    return address, (bytes.fromhex(key) if key else None)


def directory() -> Path:
    configured = os.environ.get(DIRECTORY_ENV)
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "simvue" / "rendezvous"


def file_for(topology: Topology, ordinal: int) -> Path:
    return directory() / f"{safe_filename(str(topology.job_id), distinct=True)}.{ordinal}.json"


def publish_file(path: Path, address: AggregatorAddress) -> None:
    """Write ``address`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(address.to_json())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def find_file(path: Path, timeout_s: float) -> AggregatorAddress | None:
    """Poll for ``path`` (10 ms, growing to 200 ms) until it appears or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    pause_s = 0.01
    while True:
        try:
            return AggregatorAddress.from_json(path.read_text())
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause_s)
        pause_s = min(pause_s * 1.5, 0.2)


def remove_file(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def broadcast_mpi(address: AggregatorAddress | None, timeout_s: float) -> AggregatorAddress | None:
    """Share rank 0's ``address`` over the user's initialised MPI; ``None`` if MPI is not in
    use or the broadcast did not complete within ``timeout_s``.

    A non-blocking broadcast polled with short sleeps: MPICH busy-polls in blocking calls,
    and a rank that never calls ``init`` must not hang the others forever.
    """
    mpi = initialised_mpi()
    if mpi is None:
        return None
    comm = mpi.COMM_WORLD
    buffer = bytearray(MPI_MESSAGE_BYTES)
    if comm.Get_rank() == 0 and address is not None:
        data = address.to_json().encode()
        buffer[: len(data)] = data
    request = comm.Ibcast([buffer, mpi.BYTE], root=0)
    deadline = time.monotonic() + timeout_s
    while not request.Test():
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)
    text = bytes(buffer).rstrip(b"\0")
    return AggregatorAddress.from_json(text) if text else None
