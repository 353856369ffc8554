"""``simvue server`` and ``simvue server token``: placeholder until the server lands."""

from __future__ import annotations

import argparse


def add_server_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``server`` command to the ``simvue`` parser."""
