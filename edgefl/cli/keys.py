"""`edgefl keys`: the issuer's signing keys for asymmetric tokens (EdDSA or ES256).

Mounted into the main CLI with ``app.add_typer(keys_app, name="keys")``. The directory
format is in ``edgefl.auth.keys``; verifiers (brokers, the API) need only its ``jwks.json``
and reload it on change, so ``rotate`` and ``retire`` need no restart anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefl.auth.keys import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_ALGORITHM,
    KeyDir,
    KeyDirError,
    load_jwks,
)

keys_app = typer.Typer(
    help="Signing keys for asymmetric JWTs: init, rotate, retire, list. Point EDGEFL_JWT_KEYS "
    "at the directory on the issuer, or at its jwks.json on a verifier-only host.",
    no_args_is_help=True,
    add_completion=False,
)

KeyDirArg = typer.Argument(..., help="the key directory (private/, active, jwks.json)")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@keys_app.command("init")
def init_cmd(
    directory: Path = KeyDirArg,
    alg: str = typer.Option(
        DEFAULT_ALGORITHM, "--alg", help=f"signature algorithm: {', '.join(ASYMMETRIC_ALGORITHMS)}"
    ),
) -> None:
    """Create the first signing key (refuses a directory that already holds keys)."""
    if alg not in ASYMMETRIC_ALGORITHMS:
        _fail(f"--alg must be one of {', '.join(ASYMMETRIC_ALGORITHMS)}, not {alg!r}")
    try:
        kid = KeyDir(directory).init(alg)
    except (KeyDirError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"created {alg} key {kid} in {directory}; verifiers need {directory}/jwks.json")


@keys_app.command("rotate")
def rotate_cmd(directory: Path = KeyDirArg) -> None:
    """Add a key and sign with it from now on; the old keys keep verifying until retired."""
    try:
        kid = KeyDir(directory).rotate()
    except (KeyDirError, OSError) as exc:
        _fail(str(exc))
    typer.echo(
        f"active key is now {kid}; re-issue tokens, then: edgefl keys retire {directory} OLD_KID"
    )


@keys_app.command("retire")
def retire_cmd(
    directory: Path = KeyDirArg,
    kid: str = typer.Argument(..., help="the key id to stop accepting (never the active one)"),
) -> None:
    """Stop accepting tokens signed with KID: verifiers refuse them at their next connect."""
    try:
        KeyDir(directory).retire(kid)
    except (KeyDirError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"retired {kid}: tokens signed with it are refused from now on")


@keys_app.command("list")
def list_cmd(directory: Path = KeyDirArg) -> None:
    """Show the keys verifiers accept: kid, algorithm, and which one signs."""
    keys = KeyDir(directory)
    try:
        active = keys.active_kid()
        entries = load_jwks(keys.jwks_path)["keys"]
    except KeyDirError as exc:
        _fail(str(exc))
    table = Table(title=f"edgefl keys in {escape(str(directory))} ({len(entries)})")
    for col in ("kid", "alg", "active"):
        table.add_column(col)
    for k in entries:
        table.add_row(escape(str(k["kid"])), str(k["alg"]), "yes" if k["kid"] == active else "")
    Console(highlight=False, width=120).print(table)
