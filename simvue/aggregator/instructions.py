"""What the aggregator's state asks its I/O shell to do.  The state returns these from each
stimulus (a message, the local records, the clock); the shell carries them out."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..resources import Proc
from ..transport.protocol import MessageKind


class Reply(NamedTuple):
    """Send one message to one sender."""

    sender_id: bytes
    kind: MessageKind
    body: Any


class SampleHere(NamedTuple):
    """The run's processes on the aggregator's own node changed: its sampler samples these.
    ``plain_pid``: whose figures also get the plain Simvue names (a single process's run)."""

    processes: tuple[Proc, ...]
    plain_pid: int | None = None


class Notice(NamedTuple):
    """Tell the user something now (one line on stderr), besides what goes into the run."""

    text: str


Instruction = Reply | SampleHere | Notice
