"""Who samples which node's resources (see ``simvue.resources``).

The aggregator's own node is sampled by a sampler process started from the aggregator's
process; each other node by the live sender with the lowest rank there, which a SAMPLE
message names and keeps up to date.  When that sender leaves, the next one is chosen and the
previous one (if it is still there) is told to stop.  Pure: senders in, instructions out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..resources import Proc
from ..transport.protocol import MessageKind
from .instructions import Instruction, Reply, SampleHere
from .senders import Producer, SenderState


class SamplingPlanner:
    """Plans sampling for a run whose aggregator runs on ``host``; ``interval_s`` 0: off."""

    def __init__(self, host: str, interval_s: float) -> None:
        self.host = host
        self.interval_s = interval_s
        self._plans: dict[str, tuple[bytes, dict[str, Any]]] = {}  # other host -> (sender, plan)

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def plan(self, local: Producer, live: Iterable[SenderState]) -> list[Instruction]:
        """What to tell the samplers, given the live senders.  The local producer stays in
        its node's list to the end: its process is sampled until the run finishes (unless it
        is the aggregator's helper process, which is not the job's)."""
        if not self.enabled:
            return []
        by_host: dict[str, list[SenderState]] = {}
        for state in live:
            by_host.setdefault(state.host or "", []).append(state)
        here: list[Producer] = [*([] if local.role == "host" else [local]), *by_host.pop(self.host, [])]
        plain = next((p for p in here if p.role == "process"), None)  # a one-process run's own
        out: list[Instruction] = [SampleHere(tuple(_procs(here)), _sampled_pid(plain) if plain else None)]
        for host, states in by_host.items():
            states.sort(key=lambda s: (s.rank if s.rank is not None else 1 << 30, s.label))
            chosen = states[0]
            plan = {"interval_s": self.interval_s, "processes": [p.wire() for p in _procs(states)]}
            previous = self._plans.get(host)
            if previous == (chosen.sender_id, plan):
                continue
            if previous is not None and previous[0] != chosen.sender_id:
                out.append(Reply(previous[0], MessageKind.SAMPLE, {}))
            out.append(Reply(chosen.sender_id, MessageKind.SAMPLE, plan))
            self._plans[host] = (chosen.sender_id, plan)
        for host in list(self._plans):
            if host not in by_host:
                del self._plans[host]  # its processes have all left
        return out


def _sampled_pid(producer: Producer) -> int | None:
    """The process a producer's figures follow: the one ``Run.set_pid`` named, else its own."""
    return producer.sample_pid if producer.sample_pid is not None else producer.pid


def _procs(producers: Iterable[Producer]) -> list[Proc]:
    return [Proc(p.label, pid, p.cuda) for p in producers if (pid := _sampled_pid(p)) is not None]
