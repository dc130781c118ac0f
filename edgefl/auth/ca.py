"""A small certificate authority for an edgefl fleet: the broker's TLS and the devices' mTLS.

Why our own CA: a fleet's broker is rarely reachable under a public name, and devices should
trust exactly one issuer (the fleet's), not the whole system store. Everything here uses EC
P-256 keys (small, fast on a Pi, accepted by Mosquitto/OpenSSL and by Python's ``ssl``) and
writes PEM files; private keys are created with mode 0600 and nothing is overwritten unless
``force`` is given.

Layout of a CA folder::

    ca.crt, ca.key              the CA (self-signed, 10 years)
    server.crt, server.key      a broker certificate (``issue_server_cert``; name selectable)
    devices/<id>.crt, .key      a device certificate whose CN is the device id (mTLS)
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity browsers and most TLS stacks accept for a leaf
DEVICE_DAYS = 825
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
DEVICES_DIR = "devices"
_CLOCK_SKEW = _dt.timedelta(minutes=5)  # devices without RTC boot with a clock slightly behind
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CaError(Exception):
    """A CA operation cannot proceed; the message names the file or value and the reason."""


@dataclass(frozen=True)
class IssuedFiles:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its certificate and private key, able to sign leaf certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def sign_server(
        self,
        public_key: ec.EllipticCurvePublicKey,
        dns_names: Iterable[str] = (),
        ips: Iterable[str] = (),
        days: int = SERVER_DAYS,
    ) -> x509.Certificate:
        """A TLS server certificate for these names and addresses (all in the SAN).

        Clients check the host they dial against the SAN only (the CN is ignored by modern
        TLS stacks), so every name and IP a client may use must be listed.
        """
        names = [str(n) for n in dns_names]
        addrs = [_parse_ip(i) for i in ips]
        if not names and not addrs:
            raise CaError("a server certificate needs at least one DNS name or IP address")
        for n in names:
            if not n or any(c.isspace() for c in n):
                raise CaError(f"invalid DNS name {n!r} for the server certificate")
        san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        san += [x509.IPAddress(a) for a in addrs]
        cn = names[0] if names else str(addrs[0])
        builder = self._leaf(cn, public_key, days, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def sign_device(
        self, public_key: ec.EllipticCurvePublicKey, device_id: str, days: int = DEVICE_DAYS
    ) -> x509.Certificate:
        """A TLS client certificate whose CN is ``device_id``.

        Mosquitto's ``use_identity_as_username`` takes the CN as the MQTT username, so the
        broker's per-device ACL applies to the identity the CA vouched for.
        """
        _check_device_id(device_id)
        builder = self._leaf(device_id, public_key, days, ExtendedKeyUsageOID.CLIENT_AUTH)
        return builder.sign(self.key, hashes.SHA256())

    def _leaf(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey,
        days: int,
        usage: x509.ObjectIdentifier,
    ) -> x509.CertificateBuilder:
        if days < 1:
            raise CaError(f"validity must be at least 1 day, got {days}")
        now = _dt.datetime.now(_dt.timezone.utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key (what every certificate of this CA uses)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM: files are protected by mode 0600, not a passphrase,
    because an unattended broker or device must start without one."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "edgefl CA", days: int = CA_DAYS) -> CertificateAuthority:
    """A new self-signed CA in memory (``init_ca`` also writes it)."""
    if days < 1:
        raise CaError(f"validity must be at least 1 day, got {days}")
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _dt.timedelta(days=days))
        # path_length=0: this CA signs leaves only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def init_ca(
    directory: str | Path,
    *,
    common_name: str = "edgefl CA",
    days: int = CA_DAYS,
    force: bool = False,
) -> IssuedFiles:
    """Create a CA in ``directory`` (``ca.crt`` and ``ca.key``, the key mode 0600).

    Refuses to replace an existing CA unless ``force``: a new CA invalidates every
    certificate the old one issued, so that must be a deliberate act.
    """
    d = Path(directory)
    files = IssuedFiles(cert=d / CA_CERT, key=d / CA_KEY)
    _refuse_existing(files, force)
    ca = make_ca(common_name, days)
    _write(files, ca.cert, ca.key)
    return files


def load_ca(directory: str | Path) -> CertificateAuthority:
    """Load the CA of ``directory``; raises ``CaError`` naming the missing or bad file."""
    d = Path(directory)
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise CaError(f"{p}: no such file (create the CA first: edgefl ca init {d})")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise CaError(f"{cert_path}: not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(f"{key_path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CaError(f"{key_path} does not belong to {cert_path}")
    return CertificateAuthority(cert=cert, key=key)


def issue_server_cert(
    directory: str | Path,
    *,
    dns_names: Iterable[str] = (),
    ips: Iterable[str] = (),
    name: str = "server",
    days: int = SERVER_DAYS,
    force: bool = False,
) -> IssuedFiles:
    """Issue a broker certificate into ``directory/<name>.crt`` and ``<name>.key``."""
    _check_file_stem(name, "certificate name")
    d = Path(directory)
    ca = load_ca(d)
    files = IssuedFiles(cert=d / f"{name}.crt", key=d / f"{name}.key")
    _refuse_existing(files, force)
    key = new_key()
    cert = ca.sign_server(key.public_key(), dns_names, ips, days)
    _write(files, cert, key)
    return files


def issue_device_cert(
    directory: str | Path, device_id: str, *, days: int = DEVICE_DAYS, force: bool = False
) -> IssuedFiles:
    """Issue a device's client certificate (CN = ``device_id``) into ``directory/devices/``."""
    _check_device_id(device_id)
    d = Path(directory)
    ca = load_ca(d)
    files = device_files(d, device_id)
    _refuse_existing(files, force)
    key = new_key()
    cert = ca.sign_device(key.public_key(), device_id, days)
    _write(files, cert, key)
    return files


def device_files(directory: str | Path, device_id: str) -> IssuedFiles:
    """Where ``issue_device_cert`` puts a device's certificate and key."""
    d = Path(directory) / DEVICES_DIR
    return IssuedFiles(cert=d / f"{device_id}.crt", key=d / f"{device_id}.key")


def write_private_key(path: str | Path, pem: bytes, *, force: bool = False) -> None:
    """Write a private key so that it is never readable by others, not even for a moment.

    The file is created with mode 0600 (``os.open``, not chmod after the fact); an existing
    file is replaced only with ``force``.
    """
    p = Path(path)
    if p.exists():
        if not force:
            raise CaError(f"{p} exists; refusing to overwrite it (use --force)")
        p.unlink()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(p, 0o600)  # in case a umask or an inherited ACL widened it


def _write(files: IssuedFiles, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    files.cert.parent.mkdir(parents=True, exist_ok=True)
    write_private_key(files.key, key_pem(key), force=True)  # existence was checked before
    files.cert.write_bytes(cert_pem(cert))
    os.chmod(files.cert, 0o644)


def _refuse_existing(files: IssuedFiles, force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in (files.cert, files.key) if p.exists()]
    if existing:
        raise CaError(f"{', '.join(existing)} already exist; refusing to overwrite (use --force)")


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise CaError(f"invalid IP address {value!r} for the server certificate") from exc


def _check_file_stem(value: str, what: str) -> None:
    if not _SAFE_NAME.match(value):
        raise CaError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (max 128),"
            " starting with a letter or digit"
        )


def _check_device_id(device_id: str) -> None:
    # the id becomes a file name and an MQTT username matched by ACL patterns: no '/', '+', '#'
    _check_file_stem(device_id, "device id")
