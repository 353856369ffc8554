"""simvue: track simulations and processing jobs that run as many processes.

Every rank of an MPI job or worker of a ``multiprocessing`` pool uses a ``Run``; they all
feed one run, merged by an aggregator on rank 0 (or in the pool's parent) and written to the
local store (``.simvue/`` by default), browsable with the ``simvue`` command.

The names below are imported on first use, so that ``import simvue`` alone (and the resource
sampler, a small process of its own) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .client import Client
    from .errors import SimvueError, SimvueRunError, SimvueTypeError, SimvueValueError, SimvueWarning
    from .handler import Handler
    from .run import Run

    Simvue = Run

_LAZY = {
    "Client": ".client",
    "Handler": ".handler",
    "Run": ".run",
    "Simvue": ".run",  # the older ``Simvue()`` client's name for ``Run`` (see docs/compat.md)
    "SimvueError": ".errors",
    "SimvueRunError": ".errors",
    "SimvueTypeError": ".errors",
    "SimvueValueError": ".errors",
    "SimvueWarning": ".errors",
}

__all__ = [  # the names of _LAZY, written out for type checkers and linters
    "Client", "Handler", "Run", "Simvue", "SimvueError", "SimvueRunError", "SimvueTypeError", "SimvueValueError",
    "SimvueWarning", "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'simvue' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), "Run" if name == "Simvue" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
