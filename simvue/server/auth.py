"""Tokens and upload keys, both derived from one secret kept in the data directory.

API tokens are standard HS256 JWTs with ``sub`` and ``exp``: the upstream Simvue client decodes
the token itself (without verifying it) and refuses one that has no future ``exp``.  Artifact
upload and download URLs carry no token (the upstream client sends none to them); instead each
URL has a key, an HMAC of the artifact id, so it works for that artifact only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

SECRET_FILE = "server.secret"
TOKEN_SUBJECT = "simvue-server-user"
DEFAULT_TOKEN_DAYS = 365
_ALGORITHM = "HS256"


class TokenRejected(Exception):
    """The request's token is missing or not valid; ``args[0]`` says why, for the 401 body."""


def load_or_create_secret(directory: Path) -> tuple[bytes, bool]:
    """The data directory's signing secret, and whether it was created just now.

    The secret is written to a private (0600) temporary file and linked into place, so that a
    concurrent ``simvue server token`` never reads a half-written secret or makes a second one.
    """
    path = directory / SECRET_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        scratch = directory / f".{SECRET_FILE}.{os.getpid()}"
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
        try:
            os.link(scratch, path)
            created = True
        except FileExistsError:
            created = False
        finally:
            scratch.unlink()
    else:
        created = False
    return bytes.fromhex(path.read_text().strip()), created


def issue_token(secret: bytes, days: float = DEFAULT_TOKEN_DAYS, now: float | None = None) -> str:
    import jwt

    issued = int(time.time() if now is None else now)
    claims = {"sub": TOKEN_SUBJECT, "iat": issued, "exp": issued + int(days * 86400)}
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def check_authorization(secret: bytes, header: str | None) -> str:
    """Accept an ``Authorization: Bearer <jwt>`` header signed with ``secret`` and not expired;
    the token's subject (its user's name)."""
    import jwt

    if not header:
        raise TokenRejected("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRejected("malformed Authorization header (expected 'Bearer <token>')")
    try:
        claims = jwt.decode(token.strip(), secret, algorithms=[_ALGORITHM], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise TokenRejected("token has expired") from None
    except jwt.InvalidSignatureError:
        raise TokenRejected("token signature is not valid for this server") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRejected(f"token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidTokenError as exc:
        raise TokenRejected(f"malformed token: {exc}") from None
    return str(claims["sub"])


def blob_key(secret: bytes, purpose: str, artifact_id: str) -> str:
    """The key that authorises ``purpose`` ("upload" or "download") of one artifact's content."""
    message = f"{purpose}:{artifact_id}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def blob_key_matches(secret: bytes, purpose: str, artifact_id: str, key: str | None) -> bool:
    """Whether ``key`` authorises ``purpose`` of the artifact; a key that is not ASCII never
    does (``compare_digest`` refuses to compare such strings rather than answer False)."""
    return key is not None and key.isascii() and hmac.compare_digest(blob_key(secret, purpose, artifact_id), key)
