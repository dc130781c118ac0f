"""Ed25519 keys for signing model packages: generate, save, load, sign, verify.

Key files hold the **raw 32-byte key in base64** (RFC 4648, standard alphabet, padded: 44
characters) on one line. Lines starting with ``#`` are comments. The private key file
(``NAME.key``) holds the 32-byte seed and is written with mode 0600; the public key file
(``NAME.pub``) holds the 32-byte public key. Raw keys and not PEM, because a device embeds the
public key as 32 bytes: a C or MicroPython client decodes one base64 line, not ASN.1.

Runs on Python 3.9 (a device may load its trusted public keys with it).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from edgefl.packages.format import PackageError, key_id

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key from the OS random source."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (of a private key: its public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id_of(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """The key id a package signature names (see ``edgefl.packages.format.key_id``)."""
    if isinstance(key, bytes):
        return key_id(key)
    return key_id(public_key_bytes(key))


def _encode_line(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _decode_text(text: str, what: str) -> bytes:
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) != 1:
        raise PackageError(f"{what}: expected one base64 line, found {len(lines)}")
    try:
        raw = base64.b64decode(lines[0], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PackageError(f"{what}: not valid base64 ({exc})") from exc
    if len(raw) != 32:
        raise PackageError(f"{what}: an Ed25519 key is 32 bytes, this one has {len(raw)}")
    return raw


def private_key_to_text(key: Ed25519PrivateKey) -> str:
    """The private key file's content: a comment and the base64 32-byte seed."""
    return (
        f"# edgefl Ed25519 private key (key_id {key_id_of(key)}); keep it secret\n"
        f"{_encode_line(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))}\n"
    )


def public_key_to_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The public key file's content: a comment and the base64 32-byte public key."""
    raw = public_key_bytes(key)
    return f"# edgefl Ed25519 public key, key_id {key_id(raw)}\n{_encode_line(raw)}\n"


def private_key_from_text(text: str, what: str = "private key") -> Ed25519PrivateKey:
    """Parse a private key file's content."""
    return Ed25519PrivateKey.from_private_bytes(_decode_text(text, what))


def public_key_from_text(text: str, what: str = "public key") -> Ed25519PublicKey:
    """Parse a public key file's content, or a bare base64 key."""
    return Ed25519PublicKey.from_public_bytes(_decode_text(text, what))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a ``.key`` file written by :func:`save_keypair` (or by hand, same format)."""
    return private_key_from_text(Path(path).read_text(encoding="ascii"), f"private key {path}")


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a ``.pub`` file written by :func:`save_keypair` (or by hand, same format)."""
    return public_key_from_text(Path(path).read_text(encoding="ascii"), f"public key {path}")


def save_keypair(
    key: Ed25519PrivateKey, stem: str | os.PathLike[str], *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``STEM.key`` (mode 0600) and ``STEM.pub``; never silently replace a key."""
    base = Path(stem)
    priv = base.with_name(base.name + PRIVATE_SUFFIX)
    pub = base.with_name(base.name + PUBLIC_SUFFIX)
    if not overwrite:
        for p in (priv, pub):
            if p.exists():
                raise FileExistsError(f"{p} exists; refusing to overwrite a key")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(priv, flags, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(private_key_to_text(key))
    os.chmod(priv, 0o600)  # also when the file existed with looser permissions
    pub.write_text(public_key_to_text(key), encoding="ascii")
    return priv, pub


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """A 64-byte Ed25519 signature over ``message``."""
    return key.sign(message)


def verify(key: Ed25519PublicKey | bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature by ``key`` over ``message``."""
    if isinstance(key, bytes):
        key = Ed25519PublicKey.from_public_bytes(key)
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
