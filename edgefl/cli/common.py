"""Shared CLI plumbing: logging, secrets, credentials."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.logging import RichHandler

err_console = Console(stderr=True)

SECRET_ENV = "EDGEFL_JWT_SECRET"


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


def require_secret(insecure: bool) -> str | None:
    """The JWT secret from the environment, or None only with the explicit insecure flag."""
    secret = os.environ.get(SECRET_ENV)
    if secret:
        return secret
    if insecure:
        logging.getLogger("edgefl.security").warning(
            "INSECURE development mode: no %s set, authentication is OFF", SECRET_ENV
        )
        return None
    raise typer.BadParameter(
        f"set {SECRET_ENV} to a secret of at least 32 bytes, or pass --insecure for a "
        "development setup without authentication"
    )
