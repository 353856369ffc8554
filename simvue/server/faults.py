"""Injected failures, for testing how clients cope with a failing server.

A rule ``METHOD /path-prefix=STATUS[xN][@S]`` answers the first ``N`` matching requests (all
of them without ``xN``) with ``STATUS`` instead of serving them.  ``METHOD`` may be ``*``.
Answers 429 and 503 carry ``Retry-After: S`` (default 1 second).  Examples::

    POST /api/metrics=500x2        the next two metric posts fail with 500
    POST /api/metrics=429x3@2      three 429s, each asking the client to wait 2 s
    * /api=503                     every API request fails until the server restarts

Rules come from ``simvue server --fault RULE`` (repeatable) and from
``SIMVUE_SERVER_FAULTS`` (rules separated by ``;``).
"""

from __future__ import annotations

import dataclasses
import re
import threading

FAULTS_ENV = "SIMVUE_SERVER_FAULTS"
RETRY_AFTER_STATUSES = (429, 503)

_RULE = re.compile(r"^\s*(?P<method>[A-Za-z]+|\*)\s+(?P<prefix>/\S*)\s*=\s*(?P<status>\d{3})"
                   r"(?:x(?P<times>\d+))?(?:@(?P<retry_after>\d+))?\s*$")


@dataclasses.dataclass
class FaultRule:
    method: str  # upper case, or "*"
    prefix: str
    status: int
    remaining: int | None  # None: every matching request
    retry_after_s: int = 1

    @property
    def spec(self) -> str:
        times = "" if self.remaining is None else f"x{self.remaining}"
        return f"{self.method} {self.prefix}={self.status}{times}@{self.retry_after_s}"


def parse_fault(text: str) -> FaultRule:
    match = _RULE.match(text)
    if match is None:
        raise ValueError(f"cannot read fault {text!r}: expected 'METHOD /path-prefix=STATUS[xN][@S]'")
    status = int(match["status"])
    if not 400 <= status <= 599:
        raise ValueError(f"fault {text!r}: the status must be an error status (400-599)")
    return FaultRule(
        method=match["method"].upper(),
        prefix=match["prefix"],
        status=status,
        remaining=None if match["times"] is None else int(match["times"]),
        retry_after_s=1 if match["retry_after"] is None else int(match["retry_after"]),
    )


def parse_fault_list(text: str | None) -> list[FaultRule]:
    """The rules of ``SIMVUE_SERVER_FAULTS``: ``;``-separated."""
    return [parse_fault(part) for part in (text or "").split(";") if part.strip()]


class FaultSet:
    """The active rules; ``take`` consumes one use of the first rule matching a request."""

    def __init__(self, rules: list[FaultRule]) -> None:
        self._rules = rules
        self._lock = threading.Lock()

    def take(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining == 0 or rule.method not in ("*", method) or not path.startswith(rule.prefix):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule
        return None
