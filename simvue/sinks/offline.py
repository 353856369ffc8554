"""The default sink: the local SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import Store, StoreBatch


class OfflineSink:
    """Writes one run into the store at ``directory``; each ``write`` is one transaction."""

    def __init__(self, directory: Path) -> None:
        self.store = Store(directory)
        self.location = str(self.store.path)
        self.run_id: str | None = None

    def start_run(self, run: dict[str, Any]) -> str:
        resume = run.pop("resume_id", None)
        if resume is not None:  # Run.reconnect: the stored run's name and folder stand
            stored = self.store.resume_run(resume, run["now"])
            run.update(name=stored["name"], folder=stored["folder"])
            self.run_id = stored["id"]
        else:
            self.run_id = self.store.create_run(**run)
        return self.run_id

    def write(self, batch: StoreBatch) -> None:
        assert self.run_id is not None, "start_run must come first"
        self.store.write(self.run_id, batch)

    def close(self, timeout_s: float) -> bool:
        self.store.close()
        return True
