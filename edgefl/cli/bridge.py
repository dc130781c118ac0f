"""`edgefl bridge-config`: render a central and N regional Mosquitto configs, bridged over TLS.

Mounted into the main CLI with ``app.command("bridge-config")(bridge_config)``. What it writes
is described in ``edgefl.broker.bridge`` and broker_config/README.md ("Regional brokers").
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgefl.auth.ca import CaError
from edgefl.broker.bridge import CENTRAL, BridgeOptions, write_bridge_configs
from edgefl.protocol.topics import TopicError


def _fleets(values: list[str]) -> dict[str, Path]:
    fleets = {}
    for value in values:
        region, sep, folder = value.partition("=")
        if not sep or not region or not folder:
            raise typer.BadParameter(f"--fleet wants REGION=DIR, got {value!r}")
        fleets[region] = Path(folder)
    return fleets


def bridge_config(
    out: Path = typer.Argument(..., help="folder to write: central/ and one folder per region"),
    project: str = typer.Option("default", help="project name"),
    region: list[str] = typer.Option(..., "--region", help="a region name (repeat)"),
    central_host: str = typer.Option(
        ..., help="the name (or IP) the regional brokers dial; must be in central.crt"
    ),
    bridge_port: int = typer.Option(8884, help="the central broker's TLS listener for bridges"),
    server_port: int = typer.Option(
        1883, help="the loopback listener of the controller (central) and combiners (regions)"
    ),
    device_port: int = typer.Option(
        8883, min=0, help="the regional brokers' TLS listener for devices; 0: none"
    ),
    install_dir: str = typer.Option(
        "/etc/mosquitto/edgefl", help="where each broker's folder is installed on its host"
    ),
    ca: Path = typer.Option(
        None,
        help="an `edgefl ca` folder with central.crt (and <region>.crt for device listeners): "
        "copies each broker its certificates and issues missing bridge client certificates",
    ),
    fleet: list[str] = typer.Option(
        None,
        "--fleet",
        help="REGION=DIR: that region's `edgefl fleet provision` folder (passwd and acl.conf "
        "are copied in); repeat",
    ),
    force: bool = typer.Option(
        False, "--force", help="replace an existing rendering (rotates the bridge passwords)"
    ),
) -> None:
    """Render a central broker and one bridged broker per region (Mosquitto, TLS bridges)."""
    if (out / CENTRAL / "mosquitto.conf").exists() and not force:
        typer.echo(
            f"error: {out} already holds a rendering; --force replaces it and rotates the "
            "bridge passwords (install the central and regional files together)",
            err=True,
        )
        raise typer.Exit(1)
    try:
        opts = BridgeOptions(
            project=project,
            regions=tuple(region),
            central_host=central_host,
            central_bridge_port=bridge_port,
            central_server_port=server_port,
            regional_server_port=server_port,
            regional_device_port=device_port or None,
            install_dir=install_dir,
        )
        files = write_bridge_configs(out, opts, ca_dir=ca, region_fleets=_fleets(fleet or []))
    except (ValueError, TopicError, CaError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    summary = {
        "central": str(files.central_conf),
        "regions": {r: str(p) for r, p in files.regional_confs.items()},
        "controller_login": str(files.broker_dir(CENTRAL) / "controller.json"),
    }
    typer.echo(json.dumps(summary, indent=1))
