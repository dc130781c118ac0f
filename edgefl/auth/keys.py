"""Signing keys for asymmetric tokens (EdDSA or ES256), with rotation.

Only the issuer (the CLI or controller that provisions identities) holds a private key;
verifiers (brokers, combiners, the API) hold ``jwks.json``, the public half. A key directory:

- ``private/<kid>.pem``: one private key per key id, mode 0600;
- ``active``: the key id new tokens are signed with;
- ``jwks.json``: the public keys every verifier accepts (a standard JWK Set).

Rotation adds a key and makes it active while the old one stays in ``jwks.json``, so tokens
signed with either verify during the overlap; ``retire`` ends the overlap. Verifiers reload
``jwks.json`` when it changes, so neither step needs a restart. The format is documented in
docs/security.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

log = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = ("EdDSA", "ES256")
DEFAULT_ALGORITHM = "EdDSA"
JWKS_FILE = "jwks.json"
ACTIVE_FILE = "active"
PRIVATE_DIR = "private"


class KeyDirError(Exception):
    """Missing, unreadable or inconsistent key material; the message names the file."""


@dataclass(frozen=True)
class SigningKey:
    """A private key with its id and algorithm, as the issuer uses it."""

    kid: str
    algorithm: str
    key: Any  # a cryptography private key


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _new_private_key(algorithm: str) -> Any:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise KeyDirError(f"unknown key algorithm {algorithm!r}; use one of {ASYMMETRIC_ALGORITHMS}")


def _algorithm_of(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return "ES256"
    raise KeyDirError(f"unsupported private key type {type(key).__name__}")


def _public_jwk(kid: str, algorithm: str, private_key: Any) -> dict[str, Any]:
    alg = jwt.get_algorithm_by_name(algorithm)
    jwk: dict[str, Any] = json.loads(alg.to_jwk(private_key.public_key()))
    jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
    return jwk


class KeyDir:
    """The issuer's key directory (see the module docstring); not safe across processes."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def jwks_path(self) -> Path:
        return self.path / JWKS_FILE

    def exists(self) -> bool:
        return (self.path / ACTIVE_FILE).exists()

    def init(self, algorithm: str = DEFAULT_ALGORITHM) -> str:
        """Create the first key; ``KeyDirError`` if the directory already has keys."""
        if self.exists():
            raise KeyDirError(f"{self.path} already holds keys (rotate them instead)")
        return self._add_key(algorithm)

    def rotate(self, algorithm: str | None = None) -> str:
        """Add a key and sign with it from now on; the old keys stay valid until retired."""
        if not self.exists():
            raise KeyDirError(f"no keys in {self.path} (run `edgefl keys init` first)")
        return self._add_key(algorithm or self.signing_key().algorithm)

    def retire(self, kid: str) -> None:
        """Stop accepting tokens signed with ``kid`` (never the active key)."""
        if kid == self.active_kid():
            raise KeyDirError(f"{kid} is the active key; rotate before retiring it")
        keys = self._jwks()["keys"]
        remaining = [k for k in keys if k.get("kid") != kid]
        if len(remaining) == len(keys):
            raise KeyDirError(f"no key {kid!r} in {self.jwks_path}")
        _write_public(self.jwks_path, json.dumps({"keys": remaining}, indent=1))
        (self.path / PRIVATE_DIR / f"{kid}.pem").unlink(missing_ok=True)

    def active_kid(self) -> str:
        try:
            return (self.path / ACTIVE_FILE).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeyDirError(f"cannot read the active key id in {self.path}: {exc}") from exc

    def key_ids(self) -> list[str]:
        """Key ids verifiers accept, oldest first."""
        return [str(k.get("kid")) for k in self._jwks()["keys"]]

    def signing_key(self) -> SigningKey:
        """The active private key; ``KeyDirError`` naming the file if it is missing."""
        kid = self.active_kid()
        path = self.path / PRIVATE_DIR / f"{kid}.pem"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise KeyDirError(f"cannot load the signing key {path}: {exc}") from exc
        return SigningKey(kid, _algorithm_of(key), key)

    def _jwks(self) -> dict[str, Any]:
        if not self.jwks_path.exists():
            return {"keys": []}
        return load_jwks(self.jwks_path)

    def _add_key(self, algorithm: str) -> str:
        key = _new_private_key(algorithm)
        kid = f"k{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:8]}"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.path.mkdir(parents=True, exist_ok=True)
        _write_private(self.path / PRIVATE_DIR / f"{kid}.pem", pem)
        jwks = self._jwks()
        jwks["keys"].append(_public_jwk(kid, algorithm, key))
        _write_public(self.jwks_path, json.dumps(jwks, indent=1))
        _write_public(self.path / ACTIVE_FILE, kid + "\n")
        return kid


def load_jwks(path: Path | str) -> dict[str, Any]:
    """A JWK Set from disk, checked: every key has a kid and an asymmetric alg."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KeyDirError(f"cannot read the public keys {path}: {exc}") from exc
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise KeyDirError(f"{path} is not a JWK Set (no 'keys' list)")
    for k in keys:
        if not isinstance(k, dict) or not k.get("kid") or k.get("alg") not in ASYMMETRIC_ALGORITHMS:
            raise KeyDirError(f"{path}: every key needs a kid and alg in {ASYMMETRIC_ALGORITHMS}")
    return data


class PublicKeys:
    """The verifier's view of ``jwks.json``: kid -> (public key, alg), reloaded on change.

    The file's mtime is checked at most every ``reload_s`` seconds, so a rotation or
    retirement reaches running verifiers within that time. A file that turns unreadable keeps
    the last good keys (and logs), so a half-copied file never locks the whole fleet out.
    """

    def __init__(self, path: Path | str, reload_s: float = 1.0) -> None:
        self.path = Path(path)
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[Any, str]] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._load(force=True)

    def _load(self, force: bool = False) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            if force:
                raise KeyDirError(f"cannot read the public keys {self.path}: {exc}") from exc
            return
        if not force and mtime == self._mtime:
            return
        try:
            data = load_jwks(self.path)
        except KeyDirError:
            if force:
                raise
            log.exception("keeping the previous public keys")
            return
        keys: dict[str, tuple[Any, str]] = {}
        for k in data["keys"]:
            keys[k["kid"]] = (jwt.PyJWK(k, algorithm=k["alg"]).key, k["alg"])
        self._keys, self._mtime = keys, mtime

    def get(self, kid: str) -> tuple[Any, str] | None:
        """The public key and algorithm for ``kid``, or None if it is not (or no longer) valid."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.reload_s:
                self._checked = now
                self._load()
            return self._keys.get(kid)

    def key_ids(self) -> list[str]:
        with self._lock:
            return list(self._keys)
