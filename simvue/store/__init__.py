"""The local store: one SQLite database per project directory."""

from .sqlite import RunNotFound, SeriesChunk, Store, StoreBatch, new_id

__all__ = ["RunNotFound", "SeriesChunk", "Store", "StoreBatch", "new_id"]
