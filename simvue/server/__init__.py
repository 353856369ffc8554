"""A local Simvue-compatible HTTP server: ``simvue server``.

It speaks the Simvue REST API closely enough that the upstream Simvue client runs unchanged
against it, and keeps everything in one data directory: the store database (the same schema
the ``simvue`` command browses, plus ``server_*`` tables), the token signing secret and the
artifact content.  ``cli`` is the entry point; ``app`` wires ``routes`` behind the ``guard``
middleware; ``db``, ``blobs`` and ``auth`` hold the state; ``query`` is the list filter
language and ``faults`` the injected failures used in tests; ``local`` runs a server as a
child process (for tests, benchmarks and notebooks).

Nothing here imports FastAPI, uvicorn or PyJWT until a server command runs.
"""

DEFAULT_MAX_BODY_MB = 64.0
