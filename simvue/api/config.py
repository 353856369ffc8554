"""Where the Simvue server is, and whether to use it.

Each of the URL and the token comes from the first source that has it, by the one rule of
every setting (docs/configuration.md): what the code says, then the environment, then files.

1. ``Run(server_url=..., server_token=...)``;
2. the environment: ``SIMVUE_URL``, ``SIMVUE_TOKEN``;
3. a ``simvue.toml`` (or ``.simvue.toml``) ``[server]`` section, or ``[profiles.<name>]``
   when ``SIMVUE_SERVER_PROFILE`` names one;
4. an older ``simvue.ini`` ``[server]`` section with ``url`` and ``token``;
5. ``SIMTRACK_URL`` / ``SIMTRACK_TOKEN``, then a ``simtrack.ini`` ``[server]`` section.

Files are looked for in the working directory and its parents, then in the home directory
and ``~/.config/simvue``.  The mode is ``Run(mode=...)``, else ``SIMVUE_MODE``, else
``[run] mode`` of the TOML file, else ``online``; ``online`` with no server configured means
offline (the local store), which is the embedded default and never an error.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from ..errors import SimvueValueError

MODES = ("online", "offline", "disabled")
TOML_NAMES = ("simvue.toml", ".simvue.toml")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The resolved server settings; ``url`` is None when the run stays offline."""

    url: str | None = None
    token: str | None = None
    mode: str = "offline"
    source: str = "none"  # where the URL came from, for messages

    @property
    def online(self) -> bool:
        return self.mode == "online"

    @property
    def api_url(self) -> str:
        """The base of every endpoint: the URL with ``/api`` appended unless it has it."""
        assert self.url is not None
        base = self.url.rstrip("/")
        return base if base.endswith("/api") else base + "/api"


def resolve(
    mode: str | None = None,
    server_url: str | None = None,
    server_token: str | None = None,
    *,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Resolve the server settings for a run (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    sources = [
        ("Run() arguments", server_url, server_token),
        ("environment", environ.get("SIMVUE_URL"), environ.get("SIMVUE_TOKEN")),
    ]
    toml = _toml_settings(cwd, environ)
    sources.append((toml.get("path", "simvue.toml"), toml.get("url"), toml.get("token")))
    ini = _first_file(cwd, environ, ("simvue.ini",))
    if ini is not None:
        sources.append((str(ini), *_ini_server(ini)))
    sources.append(("SIMTRACK_URL", environ.get("SIMTRACK_URL"), environ.get("SIMTRACK_TOKEN")))
    simtrack = _first_file(cwd, environ, ("simtrack.ini",))
    if simtrack is not None:
        sources.append((str(simtrack), *_ini_server(simtrack)))

    url = token = None
    source = "none"
    for where, source_url, source_token in sources:
        if url is None and source_url:
            url, source = source_url.strip(), where
        if token is None and source_token:
            token = source_token.strip()

    chosen = mode or environ.get("SIMVUE_MODE") or toml.get("mode") or "online"
    if chosen not in MODES:
        raise SimvueValueError(f"mode must be one of {', '.join(MODES)}, not {chosen!r}")
    if chosen == "online" and not (url and token):
        chosen = "offline"
    return ServerConfig(url=url, token=token, mode=chosen, source=source)


def _toml_settings(cwd: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    path = _first_file(cwd, environ, TOML_NAMES)
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SimvueValueError(f"cannot read {path}: {exc}") from None
    profile = environ.get("SIMVUE_SERVER_PROFILE")
    server = document.get("profiles", {}).get(profile) if profile else document.get("server")
    if profile and server is None:
        raise SimvueValueError(f"{path} has no [profiles.{profile}] (named by SIMVUE_SERVER_PROFILE)")
    server = server or {}
    return {
        "path": str(path),
        "url": server.get("url"),
        "token": server.get("token"),
        "mode": document.get("run", {}).get("mode"),
    }


def _ini_server(path: Path) -> tuple[str | None, str | None]:
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise SimvueValueError(f"cannot read {path}: {exc}") from None
    if not parser.has_section("server"):
        return None, None
    return parser.get("server", "url", fallback=None), parser.get("server", "token", fallback=None)


def _first_file(cwd: Path, environ: Mapping[str, str], names: tuple[str, ...]) -> Path | None:
    for directory in _search_path(cwd, environ):
        for name in names:
            candidate = directory / name
            if candidate.is_file():
                return candidate
    return None


def _search_path(cwd: Path, environ: Mapping[str, str]) -> Iterator[Path]:
    yield from (cwd, *cwd.parents)
    home = environ.get("HOME")
    if home:
        yield Path(home)
        yield Path(environ.get("XDG_CONFIG_HOME") or Path(home) / ".config") / "simvue"
