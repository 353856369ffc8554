"""The run's processes as the sampler knows them, and node names as series carry them.

Kept apart from ``sampler`` (which needs psutil) so that the aggregator, which only names
processes and nodes, imports no psutil on a run's start."""

from __future__ import annotations

import dataclasses

from .._util import safe_filename

PREFIX = "resources"  # every resource series' name starts with it


@dataclasses.dataclass(frozen=True)
class Proc:
    """A process of the run: its label (``rank3``, ``worker0``, ``main``), pid and
    ``CUDA_VISIBLE_DEVICES`` (None when unset)."""

    label: str
    pid: int
    cuda: str | None = None

    def wire(self) -> list:
        """As it travels in SAMPLE messages and to the sampler process."""
        return [self.label, self.pid, self.cuda]

    @classmethod
    def from_wire(cls, item: list) -> Proc:
        label, pid, cuda = item
        return cls(str(label), int(pid), cuda)


def node_name(host: str) -> str:
    """``host`` as it appears in series names."""
    return safe_filename(host)
