"""What the ``Run`` feature mixins (compat, artifacts, alerting, processes) use of ``Run`` itself.

Declared once, for the type checker: at run time ``RunParts`` is an empty base class and
``Run`` (``run.py``) provides every member.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api.config import ServerConfig
    from .config import Settings
    from .errors import SimvueError
    from .session import Membership, Pipe

    class RunParts:
        _state: str
        _buffer: deque[tuple] | None
        _pipe: Pipe | None
        _steps: Iterator[int]
        _max_buffered: int
        _full_wait_s: float | None
        _grid_defs: dict[str, tuple[list[list[float]], list[str]]]
        _metric_grids: dict[str, str]
        _grids_sent: set[str]
        _membership: Membership | None
        _settings: Settings
        _name: str | None
        _id: str | None
        _mode: str | None
        _t0: float
        _status: str | None
        _server: ServerConfig | None
        _server_url: str | None
        _server_token: str | None

        def _process_buffer(self, call: str) -> deque[tuple] | None: ...

        def _record(self, record: tuple, call: str = "record") -> bool: ...

        def _fail(self, kind: str, error: SimvueError) -> bool: ...

        # ``message`` may be an exception too: ``log_event`` records it as "Type: message".
        def log_event(self, message: Any, timestamp: str | None = None, log_level: str = "info") -> bool: ...

        def log_metrics(
            self, metrics: dict[str, int | float | Any], step: int | None = None, time: float | None = None,
            timestamp: str | None = None,
        ) -> bool: ...

        def update_metadata(self, metadata: Mapping[str, Any]) -> bool: ...

        def set_status(self, status: str) -> bool: ...

        def save_file(
            self, file_path: str | os.PathLike, category: str, file_type: str | None = None,
            preserve_path_relative_to: str | os.PathLike | None = None, name: str | None = None,
            metadata: Mapping[str, Any] | None = None,
        ) -> bool: ...

        def create_user_alert(
            self, name: str, *, description: str | None = None, notification: str = "none",
            trigger_abort: bool = False, attach_to_run: bool = True,
        ) -> str | None: ...

        def log_alert(self, identifier: str | None = None, state: str = "critical", *, name: str | None = None) -> bool: ...

        def set_folder_details(
            self, path: str | Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
            tags: Iterable[str] | None = None, description: str | None = None,
        ) -> bool: ...

else:

    class RunParts:
        pass
