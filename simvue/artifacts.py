"""Files and Python objects saved with a run (``Run.save`` and friends)."""

from __future__ import annotations


class ArtifactsMixin:
    """The artifact methods of ``Run``."""
