"""Older and alternative spellings of the ``Run`` API (the ``Simvue()`` client, Simtrack,
OpsML-style verbs), kept so that scripts written for them run unchanged."""

from __future__ import annotations


class CompatMixin:
    """Methods ``Run`` offers under other clients' names; each maps onto a ``Run`` call."""
