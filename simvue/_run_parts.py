"""What the ``Run`` feature mixins (compat, artifacts, alerting) use of ``Run`` itself.

Declared once, for the type checker: at run time ``RunParts`` is an empty base class and
``Run`` (``run.py``) provides every member.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import SimvueError
    from .session import Pipe

    class RunParts:
        _state: str
        _buffer: deque[tuple] | None
        _pipe: Pipe | None
        _t0: float
        _steps: Iterator[int]
        _max_buffered: int
        _full_wait_s: float | None
        _grid_defs: dict[str, tuple[list[list[float]], list[str]]]
        _metric_grids: dict[str, str]
        _grids_sent: set[str]

        def _process_buffer(self, call: str) -> deque[tuple] | None: ...

        def _record(self, record: tuple, call: str = "record") -> bool: ...

        def _fail(self, kind: str, error: SimvueError) -> bool: ...

        # ``message`` may be an exception too: ``log_event`` records it as "Type: message".
        def log_event(self, message: Any, timestamp: str | None = None, log_level: str = "info") -> bool: ...

        def log_metrics(
            self, metrics: dict[str, int | float | Any], step: int | None = None, time: float | None = None,
            timestamp: str | None = None,
        ) -> bool: ...

        def set_folder_details(
            self, path: str | Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
            tags: Iterable[str] | None = None, description: str | None = None,
        ) -> bool: ...

else:

    class RunParts:
        pass
