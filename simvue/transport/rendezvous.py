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

The file holds the run's secret key, so it is trusted only if nobody else could have written
it: it must belong to this user and be readable by nobody else, in a directory that belongs
to this user and that nobody else can write.  Anything else raises ``RendezvousRefused``
with what is wrong and what to do, for the writer and for every reader.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
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
MAX_FILE_BYTES = 64 << 10


class RendezvousRefused(Exception):
    """The rendezvous directory or file could have been written by another user."""


@dataclasses.dataclass(frozen=True)
class AggregatorAddress:
    """Everything a sender needs to join a run."""

    address: str
    key: bytes
    run_name: str | None = None
    run_id: str | None = None
    started: float | None = None
    pid: int | None = None
    host: str | None = None  # the aggregator's node (``Topology.host``), for relays; absent in older files

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["key"] = self.key.hex()
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str | bytes) -> AggregatorAddress:
        fields: dict[str, Any] = json.loads(text)
        fields["key"] = bytes.fromhex(fields["key"])
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in fields.items() if name in known})


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


def check_private_directory(directory: Path) -> None:
    """Raise ``RendezvousRefused`` unless ``directory`` is this user's and nobody else can
    write it (another user could then plant or replace the file that carries the key)."""
    info = os.stat(directory)
    if info.st_uid != os.getuid():
        raise RendezvousRefused(
            f"the rendezvous directory {directory} belongs to user id {info.st_uid}, not to you; set "
            f"{DIRECTORY_ENV} to a directory of your own (visible to every node of the job)"
        )
    if info.st_mode & 0o022:
        raise RendezvousRefused(
            f"the rendezvous directory {directory} can be written by other users (mode {info.st_mode & 0o777:o}); "
            f"run chmod go-w on it, or set {DIRECTORY_ENV} to a private directory"
        )


def publish_file(path: Path, address: AggregatorAddress) -> None:
    """Write ``address`` to ``path`` atomically, readable by the owner only.  Raises
    ``RendezvousRefused`` if the directory is not private to this user."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private_directory(path.parent)
    write_private(path, address.to_json())


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once (no reader sees half of it), mode 0600."""
    import tempfile  # only a process that publishes needs it, not every run's start

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def find_file(path: Path, timeout_s: float) -> AggregatorAddress | None:
    """Poll for ``path`` (10 ms, growing to 200 ms) until it appears or ``timeout_s`` passes.
    Raises ``RendezvousRefused`` for a file or directory another user could have written."""
    deadline = time.monotonic() + timeout_s
    pause_s = 0.01
    while True:
        try:
            return AggregatorAddress.from_json(_read_private(path))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause_s)
        pause_s = min(pause_s * 1.5, 0.2)


def _read_private(path: Path) -> bytes:
    """The content of ``path``, checked on the open file itself (no symlink is followed, so
    what is checked is what is read)."""
    if path.parent.exists():
        check_private_directory(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RendezvousRefused(f"the rendezvous file {path} is a symbolic link; only a plain file is trusted") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise RendezvousRefused(
                f"the rendezvous file {path} belongs to user id {info.st_uid} with mode {info.st_mode & 0o777:o}: only"
                f" a file of your own that only you can read is trusted (another user may have planted it); remove it"
            )
        return os.read(fd, MAX_FILE_BYTES)
    finally:
        os.close(fd)


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
