"""``simvue server`` and ``simvue server token``.

    simvue server [--host H] [--port P] [--data DIR] [--max-body-mb N] [--fault RULE ...]
    simvue server token [--data DIR] [--days N]

The server needs the ``server`` extra (FastAPI, uvicorn, PyJWT); it is imported only when one
of these commands runs, so the rest of simvue works without it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path

from . import DEFAULT_MAX_BODY_MB
from .auth import DEFAULT_TOKEN_DAYS, SECRET_FILE
from .private import keep_private, make_private

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_DATA_DIR = ".simvue-server"
SERVER_FILE = "server.json"
GRACEFUL_SHUTDOWN_S = 5
_INSTALL_HINT = "simvue server needs the server extra: pip install 'simvue[server]'"


def add_server_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``server`` (and ``server token``) to the ``simvue`` parser."""
    server = commands.add_parser(
        "server",
        help="run a local Simvue-compatible server",
        description="Run a Simvue-compatible HTTP server that keeps its data in --data DIR.",
    )
    server.add_argument("--data", default=DEFAULT_DATA_DIR, help=f"data directory (default: ./{DEFAULT_DATA_DIR})")
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
    token.add_argument("--data", default=argparse.SUPPRESS, help=f"data directory (default: ./{DEFAULT_DATA_DIR})")
    token.add_argument(
        "--days", type=float, default=DEFAULT_TOKEN_DAYS,
        help=f"days until the token expires (default: {DEFAULT_TOKEN_DAYS})",
    )
    token.set_defaults(handler=_token, standalone=True)


def _token(args: argparse.Namespace) -> int:
    try:
        import jwt  # noqa: F401  (checked here to give the install hint rather than a traceback)
    except ImportError:
        print(_INSTALL_HINT, file=sys.stderr)
        return 1
    from .auth import issue_token, load_or_create_secret

    keep_private()  # the secret, and the directory if this creates it
    make_private(Path(args.data))
    secret, _ = load_or_create_secret(Path(args.data))
    print(issue_token(secret, args.days))
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import ServerSettings, create_app
        from .auth import issue_token
        from .faults import FAULTS_ENV, parse_fault, parse_fault_list
    except ImportError as exc:
        print(f"{_INSTALL_HINT} ({exc.name} is missing)", file=sys.stderr)
        return 1
    try:
        faults = [parse_fault(rule) for rule in args.fault] + parse_fault_list(os.environ.get(FAULTS_ENV))
    except ValueError as exc:
        print(f"simvue server: {exc}", file=sys.stderr)
        return 2

    try:
        listener = _listen(args.host, args.port)
    except OSError as exc:
        print(f"simvue server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    url = _url(listener)
    directory = Path(args.data)
    # Before anything is created: the database, its -wal and -shm files, the secret, server.json
    # and every artifact are then the owner's alone (see private.py).
    keep_private()
    make_private(directory)
    first_start = not (directory / SECRET_FILE).exists()
    app = create_app(ServerSettings(directory=directory, faults=faults, max_body_mb=args.max_body_mb))
    server_file = directory / SERVER_FILE
    server_file.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    if first_start:
        print(
            f"first start: a signing secret was created in {directory / SECRET_FILE}; point clients here with\n"
            f"  export SIMVUE_URL={url}\n"
            f"  export SIMVUE_TOKEN={issue_token(app.state.secret)}\n"
            f"(simvue server token --data {directory} prints a new token at any time)"
        )
    print(f"simvue server listening on {url}", flush=True)  # last: whoever waits for it has read the rest
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the
    # handler that was installed before it; these make that a no-op so the clean-up below runs.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        server_file.unlink(missing_ok=True)
        app.state.data.close()
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
