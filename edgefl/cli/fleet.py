"""`edgefl fleet`: provision devices for Mosquitto from a CSV, revoke them, list the fleet.

Mounted into the main CLI with ``app.add_typer(fleet_app, name="fleet")``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefl.auth.keys import KeyDirError
from edgefl.cli.common import KEYS_ENV, REVOCATIONS_ENV, SECRET_ENV, load_auth
from edgefl.fleet.provision import (
    DEFAULT_TOKEN_TTL_S,
    REVOCATIONS_FILE,
    ProvisionError,
    fleet_records,
    provision,
    revoke,
    sync,
)
from edgefl.protocol.topics import TopicError

fleet_app = typer.Typer(
    help="Fleet provisioning for Mosquitto: one bundle per device (agent.json), the broker's "
    "password file and per-device ACL (region included), revocation, and a listing. "
    "See broker_config/README.md.",
    no_args_is_help=True,
    add_completion=False,
)

OutDir = typer.Option(
    Path("fleet"), "--out", "-o", help="fleet folder: registry, device bundles, broker files"
)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@fleet_app.command("provision")
def provision_cmd(
    csv_file: Path = typer.Option(
        ..., "--csv", help="CSV with a header and columns device_id, region (others ignored)"
    ),
    project: str = typer.Option(..., "--project", "-p", help="the edgefl project name"),
    out: Path = OutDir,
    broker_url: str = typer.Option(
        "mqtt://127.0.0.1:1883",
        "--broker-url",
        help="the URL devices connect to (Mosquitto's device listener), written to bundles",
    ),
    token_ttl_days: float = typer.Option(
        DEFAULT_TOKEN_TTL_S / 86400,
        "--token-ttl-days",
        min=0.01,
        help=f"lifetime of the JWT passwords (only with {KEYS_ENV} or {SECRET_ENV} set)",
    ),
    ca_cert: Path = typer.Option(
        None,
        "--ca-cert",
        dir_okay=False,
        help="the broker's CA certificate (edgefl ca init): copied into every bundle as ca.crt "
        "and set as its ca_file (run the agent from the bundle folder)",
    ),
) -> None:
    """Write a bundle per new device and rebuild DIR/broker/passwd and acl.conf (idempotent).

    Known devices keep their password; revoked ones stay revoked. With EDGEFL_JWT_KEYS (the
    active key signs) or EDGEFL_JWT_SECRET set, each password is the identity's JWT (also
    valid on the embedded broker); otherwise a random broker password.
    """
    auth = load_auth()
    try:
        r = provision(
            csv_file,
            project,
            out,
            broker_url=broker_url,
            auth=auth,
            token_ttl_s=int(token_ttl_days * 86400),
            ca_cert=ca_cert,
        )
    except (ProvisionError, TopicError, ValueError, KeyDirError) as exc:
        _fail(str(exc))
    kind = "JWT" if auth is not None else "random broker password"
    typer.echo(
        f"{len(r.added)} added, {len(r.kept)} kept, {len(r.rotated)} re-issued (bundle was "
        f"missing), {len(r.skipped_revoked)} revoked skipped, in {r.seconds:.2f} s ({kind}s)"
    )
    if r.servers_added:
        typer.echo(f"server accounts added: {', '.join(r.servers_added)} (logins in {out}/servers)")
    typer.echo(
        f"bundles: {out}/devices/<id>/agent.json (run: edgefl-agent --config agent.json)\n"
        f"broker:  {out}/broker/passwd and {out}/broker/acl.conf; reload Mosquitto: "
        "kill -HUP <mosquitto pid>"
    )


def _revocations_path(out: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    auth = load_auth()
    found = auth.revocations_path() if auth is not None else None
    return found or out / REVOCATIONS_FILE


@fleet_app.command("revoke")
def revoke_cmd(
    device: str = typer.Argument(..., help="the device id to revoke"),
    out: Path = OutDir,
    reload_pid: int = typer.Option(
        None, "--reload-pid", help="send SIGHUP to this Mosquitto pid so the revocation applies"
    ),
    revocations: Path = typer.Option(
        None,
        "--revocations",
        dir_okay=False,
        help=f"the revocation list token verifiers read (default: {REVOCATIONS_ENV}, else "
        f"revoked.json next to {KEYS_ENV}, else DIR/{REVOCATIONS_FILE})",
    ),
) -> None:
    """Revoke a device everywhere: the revocation list (the embedded broker disconnects it
    within its sweep), and its password, ACL block and bundle (Mosquitto, on reload).
    """
    rev_path = _revocations_path(out, revocations)
    try:
        revoke(out, device, reload_pid=reload_pid, revocations=rev_path)
    except ProvisionError as exc:
        _fail(str(exc))
    typer.echo(
        f"revoked {device} in {rev_path}: an embedded broker reading that list disconnects it "
        "within its sweep interval"
    )
    if reload_pid is None:
        typer.echo(
            "make Mosquitto reload its files: kill -HUP <mosquitto pid> (or pass --reload-pid); "
            "on reload it also disconnects the device"
        )
    else:
        typer.echo(f"sent SIGHUP to Mosquitto (pid {reload_pid})")


@fleet_app.command("sync")
def sync_cmd(
    out: Path = OutDir,
    reload_pid: int = typer.Option(
        None, "--reload-pid", help="send SIGHUP to this Mosquitto pid when the files change"
    ),
    revocations: Path = typer.Option(
        None,
        "--revocations",
        dir_okay=False,
        help=f"the revocation list (default: {REVOCATIONS_ENV}, else revoked.json next to "
        f"{KEYS_ENV}, else DIR/{REVOCATIONS_FILE})",
    ),
    watch: float = typer.Option(
        None, "--watch", min=1.0, help="keep syncing every this many seconds until interrupted"
    ),
) -> None:
    """Drop expired and revoked accounts from Mosquitto's files (and reload it).

    Mosquitto compares passwords only: it cannot see a token's expiry or the revocation
    list. Run this on a schedule, or with --watch, so both reach it.
    """
    rev_path = _revocations_path(out, revocations)
    while True:
        try:
            report = sync(out, revocations=rev_path, reload_pid=reload_pid)
        except ProvisionError as exc:
            _fail(str(exc))
        if report.changed or watch is None:
            typer.echo(
                f"{len(report.expired)} expired, {len(report.revoked)} revoked accounts left out"
                + ("; files changed" if report.changed else "; no change")
                + (f", SIGHUP sent to {reload_pid}" if report.changed and reload_pid else "")
            )
        if watch is None:
            return
        time.sleep(watch)


@fleet_app.command("list")
def list_cmd(
    out: Path = OutDir,
    status: str = typer.Option(None, "--status", help="show only 'active' or 'revoked' devices"),
) -> None:
    """Show the fleet: device, region, status, created (and when revoked)."""
    try:
        records = fleet_records(out)
    except ProvisionError as exc:
        _fail(str(exc))
    if status is not None:
        records = [r for r in records if r["status"] == status]
    table = Table(title=f"edgefl fleet in {escape(str(out))} ({len(records)} devices)")
    for col in ("device", "region", "status", "created", "revoked"):
        table.add_column(col)
    for r in records:
        table.add_row(
            escape(r["device"]),
            escape(r["region"]),
            r["status"],
            r["created"],
            r["revoked"] or "",
        )
    Console(highlight=False).print(table)
