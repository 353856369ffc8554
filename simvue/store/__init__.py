"""The local store: one SQLite database per project directory."""

from .sqlite import (
    SPILL_DIRECTORY,
    STOPPING,
    STORE_SPILL_SUFFIX,
    RunNotFound,
    SeriesChunk,
    Store,
    StoreBatch,
    new_id,
    pack_batch,
    read_spilled_batches,
    still_stopping,
)

__all__ = [
    "SPILL_DIRECTORY",
    "STOPPING",
    "STORE_SPILL_SUFFIX",
    "RunNotFound",
    "SeriesChunk",
    "Store",
    "StoreBatch",
    "new_id",
    "pack_batch",
    "read_spilled_batches",
    "still_stopping",
]
