"""`edgefl ca`: a small CA for the broker's TLS certificate and the devices' client certificates.

Mounted into the main CLI with ``app.add_typer(ca_app, name="ca")``. The files it writes are
what ``broker_config/mosquitto-tls.conf`` and ``mosquitto-mtls.conf`` and the agent's
``--ca-file/--cert-file/--key-file`` expect (see broker_config/README.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from edgefl.auth.ca import (
    CA_DAYS,
    DEVICE_DAYS,
    SERVER_DAYS,
    CaError,
    IssuedFiles,
    init_ca,
    issue_device_cert,
    issue_server_cert,
)

ca_app = typer.Typer(
    help="A small certificate authority (EC P-256): create the fleet's CA, issue the broker's "
    "TLS certificate and one client certificate per device (CN = device id, for mutual TLS). "
    "Private keys are written with mode 0600; nothing is overwritten without --force.",
    no_args_is_help=True,
    add_completion=False,
)

Force = typer.Option(False, "--force", help="replace existing files")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _report(what: str, files: IssuedFiles) -> None:
    typer.echo(f"{what}: {files.cert}")
    typer.echo(f"private key (mode 0600, keep it secret): {files.key}")


@ca_app.command()
def init(
    directory: Path = typer.Argument(..., help="folder for ca.crt and ca.key (created)"),
    common_name: str = typer.Option("edgefl CA", "--cn", help="the CA's common name"),
    days: int = typer.Option(CA_DAYS, min=1, help="validity in days"),
    force: bool = Force,
) -> None:
    """Create the CA: a self-signed certificate (ca.crt, give it to every device) and its key."""
    try:
        files = init_ca(directory, common_name=common_name, days=days, force=force)
    except (CaError, OSError) as exc:
        _fail(str(exc))
    _report("CA certificate (distribute to devices and brokers)", files)


@ca_app.command()
def server(
    directory: Path = typer.Argument(..., help="the CA folder (from `edgefl ca init`)"),
    name: list[str] = typer.Option(
        None, "--name", help="a DNS name clients use to reach the broker (repeat)"
    ),
    ip: list[str] = typer.Option(
        None, "--ip", help="an IP address clients use to reach the broker (repeat)"
    ),
    out: str = typer.Option("server", "--out", help="file stem: writes <out>.crt and <out>.key"),
    days: int = typer.Option(SERVER_DAYS, min=1, help="validity in days"),
    force: bool = Force,
) -> None:
    """Issue the broker's TLS certificate for the given names and IPs (clients check them)."""
    if not name and not ip:
        _fail("give at least one --name or --ip: clients check the broker's address against it", 2)
    try:
        files = issue_server_cert(
            directory, dns_names=name or [], ips=ip or [], name=out, days=days, force=force
        )
    except (CaError, OSError) as exc:
        _fail(str(exc))
    _report("server certificate", files)


@ca_app.command()
def device(
    directory: Path = typer.Argument(..., help="the CA folder (from `edgefl ca init`)"),
    device_id: str = typer.Argument(..., help="the device id; becomes the certificate's CN"),
    days: int = typer.Option(DEVICE_DAYS, min=1, help="validity in days"),
    force: bool = Force,
) -> None:
    """Issue a device's client certificate (devices/<id>.crt and .key) for mutual TLS."""
    try:
        files = issue_device_cert(directory, device_id, days=days, force=force)
    except (CaError, OSError) as exc:
        _fail(str(exc))
    _report(f"client certificate for {device_id}", files)
