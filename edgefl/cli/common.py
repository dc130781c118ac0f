"""Shared CLI plumbing: logging, token material (keys or a secret), credentials."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.logging import RichHandler

from edgefl.auth.keys import KeyDirError
from edgefl.auth.revocation import RevocationError
from edgefl.auth.tokens import KEYS_ENV, REVOCATIONS_ENV, SECRET_ENV, AuthConfig

err_console = Console(stderr=True)

__all__ = [
    "KEYS_ENV",
    "REVOCATIONS_ENV",
    "SECRET_ENV",
    "err_console",
    "load_auth",
    "require_auth",
    "setup_logging",
]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    # amqtt and uvicorn are chatty at INFO; their warnings still show.
    for noisy in ("amqtt", "transitions", "uvicorn", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def load_auth() -> AuthConfig | None:
    """``AuthConfig.from_env()``, checked now: a bad setting is a usage error naming it,
    not a traceback from a broker thread later.
    """
    try:
        auth = AuthConfig.from_env()
        if auth is not None:
            auth.verifier()  # unreadable keys or revocation list fail here
    except (ValueError, KeyDirError, RevocationError) as exc:
        raise typer.BadParameter(
            f"{exc} (from {KEYS_ENV} / {SECRET_ENV} / {REVOCATIONS_ENV})"
        ) from None
    return auth


def require_auth(insecure: bool) -> AuthConfig | None:
    """Token material from the environment, or None only with the explicit insecure flag.

    Reads ``EDGEFL_JWT_KEYS`` (a key directory or ``jwks.json``) or ``EDGEFL_JWT_SECRET``
    (HS256), and ``EDGEFL_REVOCATIONS``. Security never switches itself off: with neither
    and no ``--insecure``, the command refuses to start.
    """
    auth = load_auth()
    if auth is not None:
        if insecure:
            logging.getLogger("edgefl.security").info(
                "--insecure ignored: token material is set, authentication is on"
            )
        return auth
    if insecure:
        logging.getLogger("edgefl.security").warning(
            "INSECURE development mode: neither %s nor %s is set, authentication is OFF",
            KEYS_ENV,
            SECRET_ENV,
        )
        return None
    raise typer.BadParameter(
        f"set {KEYS_ENV} to a key directory (edgefl keys init DIR) or {SECRET_ENV} to a "
        "secret of at least 32 bytes, or pass --insecure for a development setup without "
        "authentication"
    )
