"""simvue: track simulations and processing jobs that run as many processes.

Every rank of an MPI job or worker of a ``multiprocessing`` pool uses a ``Run``; they all
feed one run, merged by an aggregator on rank 0 (or in the pool's parent) and written to the
local store (``.simvue/`` by default), browsable with the ``simvue`` command.
"""

from ._version import __version__
from .client import Client
from .errors import SimvueError, SimvueRunError, SimvueTypeError, SimvueValueError, SimvueWarning
from .handler import Handler
from .run import Run

# The older ``Simvue()`` client's name for the same object (see docs/compat.md).
Simvue = Run

__all__ = [
    "Client",
    "Handler",
    "Run",
    "Simvue",
    "SimvueError",
    "SimvueRunError",
    "SimvueTypeError",
    "SimvueValueError",
    "SimvueWarning",
    "__version__",
]
