"""Fleet provisioning for Mosquitto: device bundles, the password file and per-device ACL.

``provision`` turns a CSV of ``device_id,region`` rows into

- ``DIR/devices/<id>/agent.json``: the agent's config (``edgefl-agent --config``), with its
  broker password (or, with token material, its JWT, so the same bundle also works on the
  embedded broker). Mode 0600: it holds the device's secret. With a CA certificate, a copy
  sits next to it as ``ca.crt`` and the config's ``ca_file`` names it.
- ``DIR/servers/<name>.json``: the controller's and each regional combiner's login.
- ``DIR/broker/passwd``: Mosquitto's password file (PBKDF2-SHA512, the ``$7$`` format
  ``mosquitto_passwd`` writes, computed here: as fast as ``mosquitto_passwd -U``, about
  0.1 ms a line, without a plaintext password file on disk or Mosquitto on the host).
- ``DIR/broker/acl.conf``: server blocks and one block per device, region included
  (``edgefl.auth.acl.mosquitto_fleet_acl``).
- ``DIR/fleet.json``: the registry. It holds only password *hashes*, never a secret, so the
  broker files can be rebuilt from it at any time.

Re-running is safe: known devices keep their password and bundle, new ones are added, revoked
ones stay revoked. A known device whose bundle was deleted gets a new password (rotation).

``revoke`` also appends the device to the revocation list (``revoked.json``) every verifier
reads, so the embedded broker disconnects it while connected (see ``edgefl.broker.embedded``).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jwt

from edgefl.auth.acl import mosquitto_fleet_acl
from edgefl.auth.credentials import Credentials
from edgefl.auth.revocation import RevocationError, revoke_subject
from edgefl.auth.tokens import AuthConfig, Role, as_auth
from edgefl.protocol.topics import TopicError, check_segment

REGISTRY_VERSION = 1
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; Mosquitto reads the count per line
SALT_BYTES = 12
DEFAULT_TOKEN_TTL_S = 365 * 86400
ACTIVE = "active"
REVOKED = "revoked"
CA_FILE = "ca.crt"  # the CA certificate's name inside a device bundle
REVOCATIONS_FILE = "revoked.json"  # the default revocation list, in the fleet folder


class ProvisionError(Exception):
    """Provisioning refused to run; the message names the file, line or device and why."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$`` PBKDF2-SHA512 hash of ``password`` (as ``mosquitto_passwd`` writes)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class Registry:
    """``DIR/fleet.json``: every identity ever provisioned, with its status and password hash."""

    project: str
    broker_url: str
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @staticmethod
    def path(out: Path) -> Path:
        return out / "fleet.json"

    @classmethod
    def load(cls, out: Path) -> Registry | None:
        """The registry in ``out``, or None if there is none; ``ProvisionError`` if unreadable."""
        p = cls.path(out)
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            if data.get("version") != REGISTRY_VERSION:
                raise ProvisionError(
                    f"{p}: registry version {data.get('version')!r}, expected {REGISTRY_VERSION}"
                )
            return cls(data["project"], data["broker_url"], data["devices"], data["servers"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProvisionError(f"{p}: unreadable fleet registry ({exc})") from exc

    def save(self, out: Path) -> None:
        doc = {
            "version": REGISTRY_VERSION,
            "project": self.project,
            "broker_url": self.broker_url,
            "servers": self.servers,
            "devices": self.devices,
        }
        _write_private(self.path(out), json.dumps(doc, indent=1, sort_keys=True) + "\n")

    def active_devices(self) -> list[tuple[str, str]]:
        """``(region, device_id)`` of every device not revoked, in provisioning order."""
        return [(d["region"], k) for k, d in self.devices.items() if d["status"] == ACTIVE]


@dataclass
class ProvisionReport:
    """What one ``provision`` run did (device ids per outcome) and how long it took."""

    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)  # known, but the bundle was missing
    skipped_revoked: list[str] = field(default_factory=list)
    servers_added: list[str] = field(default_factory=list)
    seconds: float = 0.0


def read_devices_csv(path: Path) -> list[tuple[str, str]]:
    """``(device_id, region)`` rows of a CSV with a header naming at least those two columns.

    Other columns are ignored; blank lines are skipped. Raises ``ProvisionError`` naming the
    line for a missing column, an invalid name (not a topic segment) or a duplicate id.
    """
    try:
        f = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read the device CSV ({exc})") from exc
    with f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [c for c in ("device_id", "region") if c not in header]
        if missing:
            raise ProvisionError(f"{path}: header lacks column(s) {missing}; found {header}")
        rows: list[tuple[str, str]] = []
        first_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            dev = (row.get("device_id") or "").strip()
            region = (row.get("region") or "").strip()
            if not dev and not region:
                continue
            try:
                check_segment("device_id", dev)
                check_segment("region", region)
            except TopicError as exc:
                raise ProvisionError(f"{path}:{line}: {exc}") from None
            if dev in first_line:
                raise ProvisionError(
                    f"{path}:{line}: device_id {dev!r} already on line {first_line[dev]}"
                )
            first_line[dev] = line
            rows.append((dev, region))
    return rows


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One provisioning/revoking run at a time per output folder."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def bundle_path(out: Path, device_id: str) -> Path:
    """Where a device's agent config lives."""
    return out / "devices" / device_id / "agent.json"


def _usable(record: dict[str, Any], now: float, revoked: Collection[str], name: str) -> bool:
    """Neither revoked nor past its token's ``exp`` (random passwords record none)."""
    expires = record.get("expires")
    return name not in revoked and (expires is None or expires > now)


def write_broker_files(
    out: Path,
    registry: Registry,
    *,
    now: float | None = None,
    revoked: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[str], list[str]]:
    """Rebuild ``DIR/broker/passwd`` and ``acl.conf`` from the registry.

    Accounts whose token has expired, and subjects in ``revoked`` (the revocation list), are
    left out: Mosquitto checks neither expiry nor the list, so its files must. Returns the
    ``(expired, revoked)`` account names left out.
    """
    now = time.time() if now is None else now
    revoked = frozenset(revoked)
    expired: list[str] = []
    dropped: list[str] = []
    lines = []
    for name, rec in sorted(registry.servers.items()):
        if _usable(rec, now, revoked, name):
            lines.append(f"{name}:{rec['hash']}")
        else:
            (dropped if name in revoked else expired).append(name)
    devices = []
    for region, dev in registry.active_devices():
        rec = registry.devices[dev]
        if _usable(rec, now, revoked, dev):
            lines.append(f"{dev}:{rec['hash']}")
            devices.append((region, dev))
        else:
            (dropped if dev in revoked else expired).append(dev)
    broker = out / "broker"
    _write_private(broker / "passwd", "\n".join(lines) + "\n")
    _write_private(broker / "acl.conf", mosquitto_fleet_acl(registry.project, devices))
    return expired, dropped


@dataclass
class SyncReport:
    """What ``sync`` left out of Mosquitto's files, and whether they changed."""

    expired: list[str]
    revoked: list[str]
    changed: bool


def _revoked_subjects(revocations: Path | str | None, registry: Registry) -> set[str]:
    """Subjects the revocation list cuts off, given when each account's password was issued."""
    if revocations is None or not Path(revocations).exists():
        return set()
    from edgefl.auth.revocation import RevocationList

    rl = RevocationList(revocations)
    out = set()
    for name, rec in [*registry.servers.items(), *registry.devices.items()]:
        issued = rec.get("issued")
        if rl.revoked(name, rec.get("token_id"), float(issued) if issued else None):
            out.add(name)
    return out


def sync(
    out: Path,
    *,
    revocations: Path | str | None = None,
    reload_pid: int | None = None,
    now: float | None = None,
) -> SyncReport:
    """Bring Mosquitto's files in line with token expiry and the revocation list.

    Run it on a schedule (``edgefl fleet sync --watch 30``): it rewrites ``passwd`` and
    ``acl.conf`` without expired and revoked accounts and, only when they changed, sends
    SIGHUP to ``reload_pid``; on reload Mosquitto disconnects clients whose account is gone.
    """
    with _locked(out):
        reg = Registry.load(out)
        if reg is None:
            raise ProvisionError(f"no fleet registry in {out} (run 'edgefl fleet provision')")
        broker = out / "broker"
        before = [(broker / f).read_bytes() if (broker / f).exists() else b"" for f in _FILES]
        expired, dropped = write_broker_files(
            out, reg, now=now, revoked=_revoked_subjects(revocations, reg)
        )
        after = [(broker / f).read_bytes() for f in _FILES]
    changed = before != after
    if changed and reload_pid is not None:
        _sighup(reload_pid, "synced the broker files")
    return SyncReport(expired, dropped, changed)


_FILES = ("passwd", "acl.conf")


def provision(
    csv_path: Path,
    project: str,
    out: Path,
    *,
    broker_url: str = "mqtt://127.0.0.1:1883",
    auth: AuthConfig | str | None = None,
    secret: str | None = None,
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S,
    ca_cert: Path | None = None,
) -> ProvisionReport:
    """Provision every device of ``csv_path`` into ``out``; idempotent (see module doc).

    With ``auth`` (an ``AuthConfig``: keys, whose active key signs, or an HS256 secret; or a
    bare secret, also accepted as ``secret=``) each password is a signed token for the
    identity, so the bundle also logs in to the embedded broker; Mosquitto compares it as a
    password. With ``ca_cert`` every active bundle gets a copy (``ca.crt``) and
    ``ca_file: "ca.crt"``, which the agent resolves next to ``agent.json``. Raises
    ``ProvisionError`` for a bad CSV or CA file, another project's registry, or a device
    whose region differs from the registered one (revoke it and provision a new id instead).
    """
    start = time.perf_counter()
    check_segment("project", project)
    rows = read_devices_csv(csv_path)
    if auth is not None and secret is not None:
        raise ValueError("give provision auth= or secret=, not both")
    config = as_auth(auth if auth is not None else secret)
    creds = Credentials(config, project, token_ttl_s) if config is not None else None
    ca_pem: bytes | None = None
    if ca_cert is not None:
        try:
            ca_pem = Path(ca_cert).read_bytes()
        except OSError as exc:
            raise ProvisionError(f"{ca_cert}: cannot read the CA certificate ({exc})") from exc
        if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
            raise ProvisionError(f"{ca_cert}: not a PEM certificate")

    def new_password(subject: str, role: Role, region: str | None) -> str:
        token = creds.token(subject, role, region) if creds is not None else None
        return token if token is not None else secrets.token_urlsafe(24)

    report = ProvisionReport()
    with _locked(out):
        reg = Registry.load(out)
        if reg is None:
            reg = Registry(project, broker_url)
        elif reg.project != project:
            raise ProvisionError(
                f"{Registry.path(out)} belongs to project {reg.project!r}, not {project!r}"
            )
        reg.broker_url = broker_url
        servers = {"controller"} | {f"combiner-{r}" for _, r in rows}
        servers |= {f"combiner-{r}" for r, _ in reg.active_devices()}
        for dev, _region in rows:
            if dev in servers:
                raise ProvisionError(f"device_id {dev!r} collides with a server account name")
        for name in sorted(servers - set(reg.servers)):
            region = name[len("combiner-") :] if name.startswith("combiner-") else None
            role = Role.combiner if region else Role.controller
            password = new_password(name, role, region)
            login = {"broker_url": broker_url, "username": name, "password": password}
            _write_private(out / "servers" / f"{name}.json", json.dumps(login, indent=1) + "\n")
            reg.servers[name] = {"created": _now(), **_password_record(password)}
            report.servers_added.append(name)
        for dev, region in rows:
            known = reg.devices.get(dev)
            if known is not None and known["status"] == REVOKED:
                report.skipped_revoked.append(dev)
                continue
            if known is not None and known["region"] != region:
                raise ProvisionError(
                    f"device {dev!r} is registered in region {known['region']!r}, the CSV says "
                    f"{region!r}: revoke it and provision it under a new id"
                )
            bundle = bundle_path(out, dev)
            if known is not None and bundle.exists():
                report.kept.append(dev)
                if ca_pem is not None:
                    _add_ca(bundle, ca_pem)
                continue
            password = new_password(dev, Role.device, region)
            agent = {
                "broker_url": broker_url,
                "project": project,
                "region": region,
                "device_id": dev,
                "username": dev,
                "password": password,
            }
            _write_private(bundle, json.dumps(agent, indent=1) + "\n")
            if ca_pem is not None:
                _add_ca(bundle, ca_pem)
            if known is None:
                reg.devices[dev] = {"region": region, "status": ACTIVE, "created": _now()}
                report.added.append(dev)
            else:
                report.rotated.append(dev)
            reg.devices[dev].update(_password_record(password))
        write_broker_files(out, reg)
        reg.save(out)
    report.seconds = time.perf_counter() - start
    return report


def _password_record(password: str) -> dict[str, Any]:
    """The registry's view of a password: its hash and, for a token, its id, iat and exp.

    Mosquitto never reads a token's claims, so provisioning records them for ``sync``.
    """
    rec: dict[str, Any] = {"hash": hash_password(password)}
    if password.count(".") != 2:
        return rec  # a random broker password: valid until revoked
    try:
        claims = jwt.decode(password, options={"verify_signature": False})
    except jwt.PyJWTError:
        return rec
    exp = claims.get("exp")
    rec.update(
        expires=float(exp) if isinstance(exp, (int, float)) else None,
        issued=claims.get("iat"),
        token_id=claims.get("jti"),
    )
    return rec


def _add_ca(bundle: Path, ca_pem: bytes) -> None:
    """Put the CA certificate next to ``agent.json`` and name it there (relative path)."""
    (bundle.parent / CA_FILE).write_bytes(ca_pem)
    agent = json.loads(bundle.read_text(encoding="utf-8"))
    if agent.get("ca_file") != CA_FILE:
        agent["ca_file"] = CA_FILE
        _write_private(bundle, json.dumps(agent, indent=1) + "\n")


def revoke(
    out: Path,
    device_id: str,
    *,
    reload_pid: int | None = None,
    revocations: Path | str | None = None,
) -> dict[str, Any]:
    """Revoke a device: registry status, its password line, ACL block and bundle go.

    The device is also added to the revocation list ``revocations`` (default
    ``DIR/revoked.json``), which every token verifier reads: the embedded broker disconnects
    it within its sweep interval and refuses its reconnects. Mosquitto applies the revocation
    on reload (SIGHUP): ``reload_pid`` sends that signal, and on reload Mosquitto also
    disconnects a connected client whose account is gone. Raises ``ProvisionError`` for an
    unknown device, a missing registry or an unwritable revocation list; revoking twice only
    moves the list's cutoff to now. Returns the device's registry record.
    """
    rev_path = Path(revocations) if revocations is not None else out / REVOCATIONS_FILE
    with _locked(out):
        reg = Registry.load(out)
        if reg is None:
            raise ProvisionError(f"no fleet registry in {out} (run 'edgefl fleet provision')")
        record = reg.devices.get(device_id)
        if record is None:
            raise ProvisionError(
                f"device {device_id!r} is not in the registry {Registry.path(out)}"
            )
        try:
            # first, so a connected device is cut off even if a later step fails
            revoke_subject(rev_path, device_id)
        except (OSError, ValueError, RevocationError) as exc:
            raise ProvisionError(f"{rev_path}: cannot update the revocation list ({exc})") from exc
        if record["status"] != REVOKED:
            record["status"] = REVOKED
            record["revoked"] = _now()
            record.pop("hash", None)
            write_broker_files(out, reg)
            reg.save(out)
        shutil.rmtree(bundle_path(out, device_id).parent, ignore_errors=True)
    if reload_pid is not None:
        _sighup(reload_pid, f"revoked {device_id!r}")
    return record


def _sighup(pid: int, done: str) -> None:
    """Make Mosquitto re-read its files; the error says what was already done."""
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise ProvisionError(
            f"{done}, but could not send SIGHUP to Mosquitto pid {pid} ({exc}); "
            "reload it by hand: kill -HUP <pid>"
        ) from exc


def fleet_records(out: Path) -> list[dict[str, Any]]:
    """Every device in the registry: device, region, status, created, revoked (or None)."""
    reg = Registry.load(out)
    if reg is None:
        raise ProvisionError(f"no fleet registry in {out} (run 'edgefl fleet provision')")
    return [
        {
            "device": dev,
            "region": d["region"],
            "status": d["status"],
            "created": d["created"],
            "revoked": d.get("revoked"),
        }
        for dev, d in reg.devices.items()
    ]
