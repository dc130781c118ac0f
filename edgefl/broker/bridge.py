"""Regional brokers: a central Mosquitto and one Mosquitto per region, bridged over mutual TLS.

Why regional brokers: a region's heavy traffic (tasks and update chunks between its devices and
its combiner) stays on the region's own broker; only what the controller needs crosses the
bridge. The controller sits on the central broker, the combiner and the devices of a region on
that region's broker, and each regional broker dials the central one (outbound only, like the
devices), so the central broker needs no route into the regions.

What crosses a region's bridge (``BRIDGE_TOPICS``; every pattern sits under the region's own
prefix or the shared ``model/`` tree, so nothing of another region can match)::

    central -> region   {region}/comb/round        round plans and closes, QoS 1
                        model/#                    retained model and package chunks, QoS 1
    region -> central   {region}/comb/partial      the combiner's chunked sums, QoS 1
                        {region}/comb/progress     QoS 1
                        {region}/comb/status       retained presence (and last will), QoS 1
                        {region}/comb/pool/+/status  each pool member's, the same, QoS 1
                        {region}/dev/+/status      retained device presence (and wills), QoS 1
                        {region}/dev/+/telemetry   QoS 0, like the devices send it
                        {region}/dev/+/request     a device's fetch of a missing model, QoS 1
    never               {region}/dev/+/task, {region}/dev/+/update (combiner <-> devices)

This module is the source of the configs: ``broker_config/bridge/`` holds copies rendered
with ``EXAMPLE`` options, and ``tests/test_bridged_brokers.py`` keeps them equal.
``write_bridge_configs`` writes a complete set (configs, the central password file and ACL,
certificates) into a folder; ``edgefl bridge-config`` is its command line.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgefl.auth.ca import CA_CERT, device_files, issue_device_cert
from edgefl.fleet.provision import hash_password
from edgefl.protocol.topics import ROOT, check_segment

CENTRAL = "central"
CONTROLLER = "controller"
PLACEHOLDER_PASSWORD = "CHANGE-ME-run-edgefl-bridge-config"

# (pattern under the prefix, direction, QoS, prefix: "region" or "project")
BRIDGE_TOPICS: tuple[tuple[str, str, int, str], ...] = (
    ("comb/round", "in", 1, "region"),
    ("model/#", "in", 1, "project"),
    ("comb/partial", "out", 1, "region"),
    ("comb/progress", "out", 1, "region"),
    ("comb/status", "out", 1, "region"),
    ("comb/pool/+/status", "out", 1, "region"),
    ("dev/+/status", "out", 1, "region"),
    ("dev/+/telemetry", "out", 0, "region"),
    ("dev/+/request", "out", 1, "region"),
)


def bridge_account(region: str) -> str:
    """The central broker's account (and client id) of a region's bridge."""
    return f"bridge-{check_segment('region', region)}"


@dataclass(frozen=True)
class BridgeOptions:
    """Where the brokers listen and where their files live once installed.

    ``install_dir`` is the folder each broker's files are copied to on its host (the paths in
    the configs point there); None means "where ``write_bridge_configs`` writes them", for a
    broker run from the rendered folder itself (tests, a single lab machine). Then each
    broker also keeps its persistence file in its own ``data/`` subfolder.
    """

    project: str
    regions: Sequence[str]
    central_host: str = "central.example.com"  # what the bridges dial; in central.crt's SAN
    central_bridge_port: int = 8884
    central_server_host: str = "127.0.0.1"
    central_server_port: int = 1883
    regional_server_host: str = "127.0.0.1"
    regional_server_port: int = 1883
    regional_device_port: int | None = 8883  # TLS listener for devices; None: no device listener
    device_bind: str = "0.0.0.0"
    install_dir: str | None = "/etc/mosquitto/edgefl"
    persistence_dir: str = "/var/lib/mosquitto/"
    regional_hosts: Mapping[str, str] = field(default_factory=dict)  # informational, per region

    def __post_init__(self) -> None:
        check_segment("project", self.project)
        if not self.regions:
            raise ValueError("a bridged deployment needs at least one region")
        for r in self.regions:
            check_segment("region", r)
        if len(set(self.regions)) != len(self.regions):
            raise ValueError(f"a region appears twice in {list(self.regions)}")


EXAMPLE = BridgeOptions(project="default", regions=("region-0", "region-1"))


def _dirs(opts: BridgeOptions, name: str, out: Path | None) -> tuple[str, str, str]:
    """(config folder, certificate folder, persistence folder) as the config names them."""
    if opts.install_dir is None:
        if out is None:
            raise ValueError("install_dir=None needs the output folder")
        base = str((out / name).resolve())
        return base, f"{base}/certs", f"{base}/data/"
    return opts.install_dir, f"{opts.install_dir}/certs", opts.persistence_dir


_COMMON_TAIL = """\
# Persistent sessions: the bridge's session (cleansession false) and the devices' queued tasks
# survive a restart; retained presence and model chunks too.
persistence true
persistence_location {persistence}
autosave_interval 60
persistent_client_expiration 7d
# Partials and updates are many QoS 1 chunks; the default queue of 1000 would drop some for a
# receiver (or a bridge) that falls briefly behind.
max_queued_messages 100000
# Model and update chunks are at most 1 MiB plus the CBOR envelope.
max_packet_size 16777216
max_inflight_messages 64
set_tcp_nodelay true

log_dest stderr
log_type error
log_type warning
log_type notice
"""


def render_central_conf(opts: BridgeOptions, out: Path | None = None) -> str:
    """The central broker's ``mosquitto.conf``: the controller's listener and the bridges'."""
    conf, certs, data = _dirs(opts, CENTRAL, out)
    head = f"""\
# Mosquitto 2.x: the CENTRAL broker of an edgefl deployment with regional brokers
# (project '{opts.project}', regions: {", ".join(opts.regions)}).
# Generated by edgefl.broker.bridge (`edgefl bridge-config`); see broker_config/README.md,
# "Regional brokers". The controller connects here; each region's broker bridges in.
# Start: mosquitto -c {conf}/mosquitto.conf

per_listener_settings false

# Server listener: plain MQTT on loopback (or a private network) for the controller. Client ids
# are free here, so several controllers (leases) can share the 'controller' account.
listener {opts.central_server_port} {opts.central_server_host}

# Bridge listener: only the regional brokers dial this, never devices. Mutual TLS: a bridge
# must present a client certificate from the fleet's CA (require_certificate) AND log in with
# its account (password_file), whose ACL block (acl.conf) confines it to its own region's
# topics and the shared model tree. A stolen certificate alone, or a password alone, is not
# enough.
listener {opts.central_bridge_port} 0.0.0.0
cafile   {certs}/ca.crt
certfile {certs}/central.crt
keyfile  {certs}/central.key
require_certificate true
tls_version tlsv1.2
# One session per bridge account: the client id becomes the username (bridge-<region>), so no
# other login can take over a bridge's persistent session and the round plans queued in it.
use_username_as_clientid true

# Authentication: the controller and one account per bridge (passwd, from
# edgefl.broker.bridge). No anonymous clients.
allow_anonymous false
password_file {conf}/passwd

# Authorisation: the controller reads and writes the project; each bridge only its region's
# bridged topics (acl.conf).
acl_file {conf}/acl.conf

"""
    return head + _COMMON_TAIL.format(persistence=data)


def _bridge_lines(opts: BridgeOptions, region: str) -> list[str]:
    project_prefix = f"{ROOT}/{opts.project}/"
    region_prefix = f"{project_prefix}{region}/"
    lines = []
    for pattern, direction, qos, scope in BRIDGE_TOPICS:
        prefix = region_prefix if scope == "region" else project_prefix
        lines.append(f"topic {pattern} {direction} {qos} {prefix} {prefix}")
    return lines


def render_regional_conf(
    opts: BridgeOptions, region: str, password: str, out: Path | None = None
) -> str:
    """A regional broker's ``mosquitto.conf``: its combiner, its devices, its bridge.

    ``password`` is the bridge account's password on the central broker: Mosquitto needs it in
    plain text here, so the rendered file is a secret (written with mode 0600).
    """
    check_segment("region", region)
    if region not in opts.regions:
        raise ValueError(f"region {region!r} is not one of {list(opts.regions)}")
    if any(c.isspace() for c in password) or not password:
        raise ValueError("the bridge password must be non-empty and contain no whitespace")
    conf, certs, data = _dirs(opts, region, out)
    account = bridge_account(region)
    device_listener = (
        f"""\
# Device listener over TLS (certificate from `edgefl ca server <ca> --name <this host>
# --out {region}`). The client id becomes the username, so no device can take over another's
# session.
listener {opts.regional_device_port} {opts.device_bind}
cafile   {certs}/ca.crt
certfile {certs}/{region}.crt
keyfile  {certs}/{region}.key
tls_version tlsv1.2
use_username_as_clientid true
"""
        if opts.regional_device_port is not None
        else "# No device listener: devices use another listener you add here.\n"
    )
    head = f"""\
# Mosquitto 2.x: the REGIONAL broker of '{region}' (project '{opts.project}'), bridged to the
# central broker {opts.central_host}:{opts.central_bridge_port}.
# Generated by edgefl.broker.bridge (`edgefl bridge-config`); see broker_config/README.md,
# "Regional brokers". This file holds the bridge's password: keep it mode 0600.
# Start: mosquitto -c {conf}/mosquitto.conf

per_listener_settings false

# Server listener: plain MQTT on loopback (or a private network) for this region's combiner.
listener {opts.regional_server_port} {opts.regional_server_host}

{device_listener}
# Authentication and authorisation: this region's fleet only. Provision it on its own
# (`edgefl fleet provision --csv <this region's devices>.csv ...`) and copy its broker/passwd
# and broker/acl.conf here: a device of another region then cannot even log in.
allow_anonymous false
password_file {conf}/passwd
acl_file {conf}/acl.conf

"""
    bridge = f"""
# ---------------------------------------------------------------------------------------
# The bridge to the central broker. The regional broker dials out (like the devices), so the
# central site needs no route into the region.
connection edgefl-{region}
address {opts.central_host}:{opts.central_bridge_port}
# The central account of this bridge; its ACL block allows exactly the topics below.
remote_clientid {account}
remote_username {account}
remote_password {password}
bridge_protocol_version mqttv311
# try_private true: the central broker knows this client is a bridge. Mosquitto then keeps the
# retain flag of what it forwards (retain as published) and does not echo back what came in
# over the bridge. Without it the model chunks would arrive here as plain messages: not
# retained, so a device that subscribes after the controller published (every device does)
# would never get the model, and the controller's zero-length deletions would not clear old
# chunks here.
try_private true
# cleansession false: both ends keep the bridge's session. While the link is down the central
# broker queues this region's round plans and closes (QoS 1), and this broker queues the
# combiner's partials and the devices' presence; both flow when it comes back, instead of
# being lost. Needs the fixed remote_clientid above and persistence on both brokers.
cleansession false
# notifications: the link's state ("1"/"0", retained) on this broker's
# $SYS/broker/connection/{account}/state, for local monitoring. Local only: publishing it on
# the central broker would need a write grant outside the region's topics (and a last will
# there); the controller learns that a region is cut off from its round deadline instead.
notifications true
notifications_local_only true
keepalive_interval 30
# Reconnect with exponential backoff (with jitter) from 2 s up to 60 s.
restart_timeout 2 60
start_type automatic
# Keep the retain flag on what goes to the central broker: device and combiner presence are
# retained there too, so a restarted controller sees who is online.
bridge_outgoing_retain true
# TLS: verify the central broker's certificate (and its name, {opts.central_host}) against the
# fleet's CA, and prove this bridge with its own client certificate
# (`edgefl ca device <ca> {account}`).
bridge_cafile   {certs}/ca.crt
bridge_certfile {certs}/{account}.crt
bridge_keyfile  {certs}/{account}.key
bridge_tls_version tlsv1.2
bridge_insecure false
# What crosses, as `topic <pattern> <direction> <qos> <local prefix> <remote prefix>`. Every
# pattern sits under this region's prefix or the shared model tree: nothing of another region
# can match, and update chunks and tasks (the bulk of the traffic) stay in the region.
# Names are the same on both sides (the controller and the devices use the protocol's topic
# tree unchanged); the prefixes are what scope the bridge to this region.
"""
    return (
        head
        + _COMMON_TAIL.format(persistence=data)
        + bridge
        + "\n".join(_bridge_lines(opts, region))
        + "\n"
    )


def render_central_acl(opts: BridgeOptions) -> str:
    """The central broker's ``acl_file``: the controller, then one block per bridge.

    A bridge may write only its region's presence, telemetry, requests and combiner output,
    and read only its region's round plans and the shared model chunks; the same list as
    ``BRIDGE_TOPICS``, so the ACL and the bridge cannot drift apart.
    """
    base = f"{ROOT}/{opts.project}"
    lines = [
        f"# edgefl central broker ACL for project '{opts.project}' (generated by",
        "# edgefl.broker.bridge; do not edit: re-render). No 'pattern' lines.",
        "",
        f"user {CONTROLLER}",
        f"topic readwrite {base}/#",
        "",
    ]
    for region in opts.regions:
        lines.append(f"user {bridge_account(region)}")
        for pattern, direction, _qos, scope in BRIDGE_TOPICS:
            topic = f"{base}/{region}/{pattern}" if scope == "region" else f"{base}/{pattern}"
            lines.append(f"topic {'read' if direction == 'in' else 'write'} {topic}")
        lines.append("")
    return "\n".join(lines)


@dataclass
class BridgeFiles:
    """What ``write_bridge_configs`` wrote; ``passwords`` holds the secrets it generated."""

    out: Path
    central_conf: Path
    regional_confs: dict[str, Path]
    passwords: dict[str, str]  # account -> password: the bridges' and the controller's

    def broker_dir(self, name: str) -> Path:
        """The folder of one broker: ``central`` or a region name."""
        return self.out / name


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _copy(src: Path, dst: Path, mode: int) -> None:
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)


def _copy_certs(ca_dir: Path, out: Path, opts: BridgeOptions) -> None:
    """Give each broker only the files it needs: the CA certificate, its own cert and key."""
    missing = []
    for stem in [CENTRAL] + (list(opts.regions) if opts.regional_device_port else []):
        if not (ca_dir / f"{stem}.crt").is_file():
            missing.append(f"edgefl ca server {ca_dir} --name <its host name> --out {stem}")
    if missing:
        raise FileNotFoundError("issue the brokers' certificates first: " + "; ".join(missing))
    central = out / CENTRAL / "certs"
    _copy(ca_dir / CA_CERT, central / "ca.crt", 0o644)
    _copy(ca_dir / "central.crt", central / "central.crt", 0o644)
    _copy(ca_dir / "central.key", central / "central.key", 0o600)
    for region in opts.regions:
        certs = out / region / "certs"
        account = bridge_account(region)
        files = device_files(ca_dir, account)
        if not files.cert.is_file():
            issue_device_cert(ca_dir, account)  # a client certificate, CN = the bridge account
        _copy(ca_dir / CA_CERT, certs / "ca.crt", 0o644)
        _copy(files.cert, certs / f"{account}.crt", 0o644)
        _copy(files.key, certs / f"{account}.key", 0o600)
        if opts.regional_device_port:
            _copy(ca_dir / f"{region}.crt", certs / f"{region}.crt", 0o644)
            _copy(ca_dir / f"{region}.key", certs / f"{region}.key", 0o600)


def write_bridge_configs(
    out: Path | str,
    opts: BridgeOptions,
    *,
    ca_dir: Path | str | None = None,
    bridge_passwords: Mapping[str, str] | None = None,
    controller_password: str | None = None,
    region_fleets: Mapping[str, Path | str] | None = None,
) -> BridgeFiles:
    """Write a bridged deployment's broker files into ``out``, one folder per broker.

    ``out/central/``: ``mosquitto.conf``, ``passwd`` (controller and bridge accounts, ``$7$``
    hashes), ``acl.conf``, ``controller.json`` (the controller's login, 0600).
    ``out/<region>/``: ``mosquitto.conf`` (0600: it holds the bridge's password).
    With ``ca_dir`` (an ``edgefl ca`` folder holding ``central.crt`` and, with a device
    listener, ``<region>.crt``), each broker gets ``certs/`` with only what it needs; missing
    bridge client certificates are issued. With ``region_fleets`` (region -> an
    ``edgefl fleet provision`` folder of that region's devices), the region's ``passwd`` and
    ``acl.conf`` are copied in. Passwords not given are generated (so a re-run rotates them:
    install the central and regional files together).
    """
    out = Path(out)
    given = dict(bridge_passwords or {})
    passwords = {
        bridge_account(r): given.get(r) or given.get(bridge_account(r)) or secrets.token_urlsafe(24)
        for r in opts.regions
    }
    passwords[CONTROLLER] = controller_password or secrets.token_urlsafe(24)

    central_dir = out / CENTRAL
    central_conf = central_dir / "mosquitto.conf"
    _write(central_conf, render_central_conf(opts, out))
    passwd = [f"{name}:{hash_password(pw)}" for name, pw in sorted(passwords.items())]
    _write(central_dir / "passwd", "\n".join(passwd) + "\n", 0o600)
    _write(central_dir / "acl.conf", render_central_acl(opts), 0o600)
    login = {"username": CONTROLLER, "password": passwords[CONTROLLER]}
    _write(central_dir / "controller.json", json.dumps(login, indent=1) + "\n", 0o600)

    regional = {}
    for region in opts.regions:
        path = out / region / "mosquitto.conf"
        _write(
            path, render_regional_conf(opts, region, passwords[bridge_account(region)], out), 0o600
        )
        regional[region] = path
    for region, fleet in (region_fleets or {}).items():
        if region not in opts.regions:
            raise ValueError(f"region_fleets names {region!r}, not one of {list(opts.regions)}")
        for name in ("passwd", "acl.conf"):
            _copy(Path(fleet) / "broker" / name, out / region / name, 0o600)
    if opts.install_dir is None:
        for name in [CENTRAL, *opts.regions]:
            (out / name / "data").mkdir(parents=True, exist_ok=True)
    if ca_dir is not None:
        _copy_certs(Path(ca_dir), out, opts)
    return BridgeFiles(out, central_conf, regional, passwords)
