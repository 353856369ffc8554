"""What the command line shows on a terminal while it works, shared by its commands."""

from __future__ import annotations

import time
from typing import Any, TextIO

PROGRESS_INTERVAL_S = 0.2


def printable(text: Any) -> str:
    """``text`` with control characters escaped (``\\x1b``), for a terminal."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Progress:
    """A one-line progress bar on a terminal, redrawn at most every ``PROGRESS_INTERVAL_S``
    and once more, at its total, when done; silent when ``stream`` is not a terminal."""

    WIDTH = 30
    NAME_WIDTH = 40  # a longer name is cut, so that the bar fits on one line

    def __init__(self, name: str, total: int, stream: TextIO, unit: str = "points") -> None:
        name = printable(name)
        self.name = name if len(name) <= self.NAME_WIDTH else name[: self.NAME_WIDTH - 1] + "…"
        self.total, self.stream, self.unit = total, stream, unit
        self.done_count = 0
        self.shown_at: float | None = None
        self.active = total > 0 and stream.isatty()

    def add(self, count: int) -> None:
        self.done_count += count
        now = time.monotonic()
        if self.active and (self.shown_at is None or now - self.shown_at >= PROGRESS_INTERVAL_S):
            self.shown_at = now
            self._draw()

    def done(self) -> None:
        """Draw the bar at its count and end its line (once; later calls do nothing)."""
        if self.active:
            self.active = False
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        shown = min(self.done_count, self.total)
        filled = self.WIDTH * shown // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r{self.name} [{bar}] {shown:,}/{self.total:,} {self.unit}")
        self.stream.flush()
