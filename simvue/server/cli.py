"""``simvue server``, ``simvue server token`` and ``simvue ui``.

    simvue server [--host H] [--port P] [--data DIR] [--max-body-mb N] [--fault RULE ...]
    simvue server token [--data DIR] [--days N]
    simvue ui [--store DIR] [--port P]

The server needs the ``server`` extra (FastAPI, uvicorn, PyJWT); it is imported only when one
of these commands runs, so the rest of simvue works without it.

Without ``--data`` both commands use the same directory from wherever they are run (see
``default_data_dir``), outside any source tree, so ``simvue server &`` then
``simvue server token`` in a clone leaves ``git status`` clean.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..store.sqlite import DATABASE_FILE
from . import DEFAULT_MAX_BODY_MB
from .auth import DEFAULT_TOKEN_DAYS
from .private import keep_private, make_private

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_UI_PORT = 8766
UI_TOKEN_DAYS = 7
DATA_ENV = "SIMVUE_SERVER_DATA"
LEGACY_DATA_DIR = ".simvue-server"  # where earlier versions kept it by default: in the working directory
DATA_DIR_HELP = f"data directory (default: ${DATA_ENV}, else ~/.local/share/simvue/server; see docs/server.md)"
SERVER_FILE = "server.json"
GRACEFUL_SHUTDOWN_S = 5
_INSTALL_HINT = "simvue server needs the server extra: pip install 'simvue[server]'"
_EXTRA_MODULES = ("fastapi", "uvicorn", "jwt")


def add_server_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``server`` (and ``server token``) to the ``simvue`` parser."""
    server = commands.add_parser(
        "server",
        help="run a local Simvue-compatible server",
        description="Run a Simvue-compatible HTTP server that keeps its data in --data DIR.",
    )
    server.add_argument("--data", default=None, help=DATA_DIR_HELP)
    server.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    server.add_argument(
        "--port", type=int, default=DEFAULT_PORT,
        help=f"port to listen on; 0 picks a free one (default: {DEFAULT_PORT})",
    )
    server.add_argument(
        "--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
        help=f"largest request body accepted, in MiB (default: {DEFAULT_MAX_BODY_MB:g})",
    )
    server.add_argument(
        "--fault", action="append", default=[], metavar="RULE",
        help="testing only: answer matching requests with an error, e.g. 'POST /api/metrics=500x2' "
        "or 'POST /api/metrics=429x3@2' (see docs/server.md); also $SIMVUE_SERVER_FAULTS, ';'-separated",
    )
    server.set_defaults(handler=_serve, standalone=True)

    token = server.add_subparsers(title="server commands").add_parser(
        "token", help="print a token for the server of --data DIR", description="Print a token for the server."
    )
    # SUPPRESS: without --data here, keep what `simvue server --data DIR token` gave
    token.add_argument("--data", default=argparse.SUPPRESS, help=DATA_DIR_HELP)
    token.add_argument(
        "--days", type=float, default=DEFAULT_TOKEN_DAYS,
        help=f"days until the token expires (default: {DEFAULT_TOKEN_DAYS})",
    )
    token.set_defaults(handler=_token, standalone=True)

    ui = commands.add_parser(
        "ui",
        help="browse the local store's runs in a web browser",
        description="Serve the dashboard over a local store, on 127.0.0.1 only, with a token in the URL it prints"
        " (valid while this command runs).",
    )
    ui.add_argument("--store", metavar="DIR", default=None, help="store directory (default: $SIMVUE_STORE or ./.simvue)")
    ui.add_argument("--port", type=int, default=DEFAULT_UI_PORT,
                    help=f"port to listen on; 0 picks a free one (default: {DEFAULT_UI_PORT})")
    ui.set_defaults(handler=_ui, standalone=True)


def default_data_dir(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The data directory when ``--data`` is not given: ``$SIMVUE_SERVER_DATA``; else
    ``./.simvue-server`` if the working directory has one (where older versions kept their
    data, which stays in use); else ``$XDG_DATA_HOME/simvue/server``, by default
    ``~/.local/share/simvue/server``: outside any source tree, and the same whichever
    directory the server and ``simvue server token`` are started in."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    if environ.get(DATA_ENV):
        return Path(environ[DATA_ENV]).expanduser()
    if (cwd / LEGACY_DATA_DIR / DATABASE_FILE).exists():
        return cwd / LEGACY_DATA_DIR
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    data_home = Path(environ["XDG_DATA_HOME"]) if environ.get("XDG_DATA_HOME") else home / ".local" / "share"
    return data_home / "simvue" / "server"


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data) if getattr(args, "data", None) else default_data_dir()


def _token(args: argparse.Namespace) -> int:
    try:
        import jwt  # noqa: F401  (checked here to give the install hint rather than a traceback)
    except ImportError:
        print(_INSTALL_HINT, file=sys.stderr)
        return 1
    from .auth import issue_token, load_or_create_secret

    directory = _data_dir(args)
    keep_private()  # the secret, and the directory if this creates it
    make_private(directory)
    secret, _ = load_or_create_secret(directory)
    print(issue_token(secret, args.days))
    return 0


def _missing_extra() -> str | None:
    """The first module of the server extra that cannot be imported, found without importing
    it (that takes a while, and the server listens first)."""
    for name in _EXTRA_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):  # ValueError: blocked (sys.modules[name] is None)
            return name
    return None


def _serve(args: argparse.Namespace) -> int:
    from .faults import FAULTS_ENV, parse_fault, parse_fault_list

    if missing := _missing_extra():
        print(f"{_INSTALL_HINT} ({missing} is missing)", file=sys.stderr)
        return 1
    try:
        faults = [parse_fault(rule) for rule in args.fault] + parse_fault_list(os.environ.get(FAULTS_ENV))
    except ValueError as exc:
        print(f"simvue server: {exc}", file=sys.stderr)
        return 2
    # Listening first, before the slow imports below: a client started right after the server
    # (`simvue server &` then the job) then waits in the listen backlog for its answer instead
    # of finding nothing there.
    try:
        listener = _listen(args.host, args.port)
    except OSError as exc:
        print(f"simvue server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        import uvicorn  # noqa: F401  (the install hint rather than a traceback, before anything is created)

        from .app import ServerSettings, create_app
        from .auth import issue_token
    except ImportError as exc:
        listener.close()
        print(f"{_INSTALL_HINT} ({exc.name} is missing)", file=sys.stderr)
        return 1
    url = _url(listener)
    directory = _data_dir(args)
    # Before anything is created: the database, its -wal and -shm files, the secret, server.json
    # and every artifact are then the owner's alone (see private.py).
    keep_private()
    make_private(directory)
    # The first start is the first with a database, whoever made the secret: `simvue server
    # token` run at the same moment often makes it first, and the banner must still be shown.
    first_start = not (directory / DATABASE_FILE).exists()
    app = create_app(ServerSettings(directory=directory, faults=faults, max_body_mb=args.max_body_mb))
    server_file = directory / SERVER_FILE
    server_file.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    if first_start:
        data = "" if args.data is None else f" --data {directory}"
        print(
            f"first start in {directory}; point clients at this server with\n"
            f"  export SIMVUE_URL={url}\n"
            f"  export SIMVUE_TOKEN={issue_token(app.state.secret)}\n"
            f"(simvue server token{data} prints a new token at any time)"
        )
    try:
        # the ready line last: whoever waits for it has read the rest
        _run(app, listener, f"simvue server listening on {url}")
    finally:
        server_file.unlink(missing_ok=True)
    return 0


def _run(app: Any, listener: socket.socket, ready: str) -> None:
    """Print ``ready``, then serve ``app`` on ``listener`` until SIGINT or SIGTERM; closes its
    data at the end.  The stop signals are handled before ``ready`` is printed."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)

    # SIGINT/SIGTERM before uvicorn has installed its own handlers stop the server as soon as it
    # has started (rather than being lost); uvicorn, after its graceful shutdown, passes the
    # signal on to this handler too, where it is a no-op, so that the clean-up below runs.
    def stop(*_: object) -> None:
        server.should_exit = True

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, stop)
    print(ready, flush=True)
    try:
        server.run(sockets=[listener])
    finally:
        app.state.data.close()


def _ui(args: argparse.Namespace) -> int:
    """``simvue ui``: the dashboard over a local store.  Loopback only; the token is signed
    with a secret that lives as long as this process, so nothing is written beside the store
    but the dashboard's own tables in its database."""
    import secrets

    from ..config import Settings

    if missing := _missing_extra():
        print(f"simvue ui needs the server extra: pip install 'simvue[server]' ({missing} is missing)", file=sys.stderr)
        return 1
    directory = Path(args.store) if args.store else Settings().store_path()
    if not (directory / DATABASE_FILE).exists():
        print(f"simvue ui: no store at {directory} (run something first, or pass --store DIR)", file=sys.stderr)
        return 1
    try:
        listener = _listen(DEFAULT_HOST, args.port)
    except OSError as exc:
        print(f"simvue ui: cannot listen on {DEFAULT_HOST}:{args.port}: {exc} (--port 0 picks a free one)", file=sys.stderr)
        return 1
    from .app import ServerSettings, create_app
    from .auth import issue_token

    secret = secrets.token_bytes(32)
    app = create_app(ServerSettings(directory=directory, secret=secret))
    url = f"{_url(listener)}/dashboard/runs?token={issue_token(secret, UI_TOKEN_DAYS)}"
    _run(app, listener, f"simvue ui: the runs of {directory} at\n  {url}\n(Ctrl-C stops it)")
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that the real port of ``--port 0`` is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # protocol says TCP, and without it keep-alive answers stall ~40 ms on delayed ACKs.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    return listener


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
