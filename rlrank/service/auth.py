"""The server's bearer token: from ``RLRANK_TOKEN``, or generated on first start into a file only its
owner can read (mode 0600), and the constant-time check of a request's credentials."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from rlrank.errors import UserError

TOKEN_VARIABLE = "RLRANK_TOKEN"
COOKIE = "rlrank_token"
MIN_LENGTH = 16


class TokenError(UserError):
    """The token file cannot be read or written, or is readable by others."""


def load_token(path: Path) -> str:
    """The token: ``$RLRANK_TOKEN`` when set, else the file at ``path``, created with a new random
    token (0600) on first start.

    Raises:
        TokenError: The token is too short, or the file is readable by group or others, or cannot
            be written.
    """
    given = os.environ.get(TOKEN_VARIABLE)
    if given is not None:
        return _checked(given.strip(), f"${TOKEN_VARIABLE}")
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise TokenError(
                f"token file {path} is readable by others: chmod 600 it (or delete it for a new one)"
            )
        return _checked(path.read_text(encoding="utf-8").strip(), str(path))
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(token + "\n")
    except OSError as exc:
        raise TokenError(f"cannot write token file {path}: {exc.strerror or exc}") from exc
    return token


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_LENGTH:
        raise TokenError(f"the token in {where} is shorter than {MIN_LENGTH} characters")
    return token


def is_authorized(token: str, authorization: str | None, cookie: str | None) -> bool:
    """Whether ``Authorization: Bearer <token>`` or the dashboard's cookie carries ``token``."""
    given = ""
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    elif cookie:
        given = cookie
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())
