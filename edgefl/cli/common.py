"""Shared CLI plumbing: logging, token material (keys or a secret), credentials."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from edgefl.auth.keys import KeyDirError
from edgefl.auth.revocation import RevocationError
from edgefl.auth.tokens import KEYS_ENV, REVOCATIONS_ENV, SECRET_ENV, AuthConfig
from edgefl.observability.logs import LOG_FILE_ENV, LOG_FORMAT_ENV

err_console = Console(stderr=True)

__all__ = [
    "KEYS_ENV",
    "REVOCATIONS_ENV",
    "SECRET_ENV",
    "err_console",
    "load_auth",
    "require_auth",
    "set_observability",
    "setup_logging",
]


def setup_logging(level: str, service: str = "edgefl") -> None:
    """Logs for a server command: rich text on stderr, or JSON lines with
    ``EDGEFL_LOG_FORMAT=json`` (``edgefl --log-format json ...``); and tracing as
    ``EDGEFL_TRACING`` says (off by default), its spans named after ``service``."""
    from edgefl.observability import configure_logging, configure_tracing

    try:
        if os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() == "json":
            configure_logging(True, level)
        elif os.environ.get(LOG_FILE_ENV):
            configure_logging(False, level)
        else:
            logging.basicConfig(
                level=getattr(logging, level.upper(), logging.INFO),
                format="%(name)s: %(message)s",
                handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
                force=True,
            )
        configure_tracing(service_name=service, set_global=True)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
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


def set_observability(log_format: str | None, tracing: str | None) -> None:
    """``edgefl --log-format/--tracing``: set for this process (and what it starts) through
    the environment variables every command's ``setup_logging`` reads."""
    from edgefl.observability.tracing import MODES, TRACING_ENV

    if log_format is not None:
        if log_format not in ("text", "json"):
            raise typer.BadParameter("--log-format must be text or json")
        os.environ[LOG_FORMAT_ENV] = log_format
    if tracing is not None:
        if tracing not in MODES:
            raise typer.BadParameter(f"--tracing must be one of {', '.join(MODES)}")
        os.environ[TRACING_ENV] = tracing


def set_tls_files(ca_cert: Path | None, client_cert: Path | None, client_key: Path | None) -> None:
    """Export the TLS files for every MQTT connection this command opens
    (``edgefl.transport.mqtt`` reads them when the URL is ``mqtts://``); each must exist."""
    for name, path in (
        ("EDGEFL_CA_CERT", ca_cert),
        ("EDGEFL_CLIENT_CERT", client_cert),
        ("EDGEFL_CLIENT_KEY", client_key),
    ):
        if path is None:
            continue
        if not path.is_file():
            raise typer.BadParameter(f"{path}: no such file", param_hint=name)
        os.environ[name] = str(path.resolve())
