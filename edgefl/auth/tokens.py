"""JWT identities (pyjwt) with roles: EdDSA/ES256 for fleets, HS256 for zero-setup runs.

Every component (device, combiner, controller, operator) carries a token that names its
subject, role, project, token id and (for devices and regional combiners) region. The broker
checks it at CONNECT and again on live connections, and derives topic permissions from it,
so a topic is proof of identity.

With asymmetric keys (``edgefl.auth.keys``) verifiers hold only the public keys, so a broken
broker or API host cannot mint tokens. HS256, one shared secret, stays for the demo and labs.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import jwt

from edgefl.auth.keys import ASYMMETRIC_ALGORITHMS, KeyDir, PublicKeys, SigningKey
from edgefl.auth.revocation import RevocationList
from edgefl.protocol.topics import TopicError, check_segment

log = logging.getLogger("edgefl.security")

ALGORITHM = "HS256"
ISSUER = "edgefl"
MIN_SECRET_BYTES = 32


class AuthError(Exception):
    """A token that must be refused; the message says why."""


class Role(str, Enum):
    """What a token's holder is; the ACL in ``edgefl.auth.acl`` grants topics per role."""

    admin = "admin"
    operator = "operator"
    viewer = "viewer"
    device = "device"
    combiner = "combiner"
    controller = "controller"


@dataclass(frozen=True)
class Claims:
    """What a verified token says about its holder.

    From ``TokenVerifier.verify``, ``project`` and ``region`` are valid topic segments, and so
    is ``subject`` for a device. ``region`` is set for devices (always) and regional
    combiners; ``expires`` and ``issued_at`` are Unix times; ``token_id`` is the ``jti``
    that revokes this one token.
    """

    subject: str
    role: Role
    project: str
    region: str | None
    expires: float
    token_id: str | None = None
    issued_at: float | None = None


def generate_secret() -> str:
    """A fresh HS256 secret (64 URL-safe characters, 384 bits)."""
    return secrets.token_urlsafe(48)


def _check_secret(secret: str) -> str:
    # HS256 with a short secret can be brute-forced offline from any captured token.
    if not isinstance(secret, str) or len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes long "
            "(make one with edgefl.auth.tokens.generate_secret())"
        )
    return secret


def _check_identity(subject: str, role: Role, project: str, region: str | None) -> None:
    """Names that become topic segments must be valid segments (no '+', '#', '/')."""
    if not isinstance(subject, str) or not subject:
        raise ValueError("the subject must be a non-empty string")
    check_segment("project", project)
    if region is not None:
        check_segment("region", region)
    if role is Role.device:
        if region is None:
            raise ValueError("a device token needs a region")
        check_segment("device id", subject)


class TokenIssuer:
    """Signs tokens; only the controller/CLI that provisions identities holds one.

    Give it either an HS256 ``secret`` or an asymmetric ``signing_key`` (its ``kid`` goes into
    the token header, so verifiers pick the right public key during a rotation). Holds no
    mutable state, so it can be shared across threads. Raises ``ValueError`` for a secret
    shorter than ``MIN_SECRET_BYTES``, or for neither or both.
    """

    def __init__(self, secret: str | None = None, *, signing_key: SigningKey | None = None) -> None:
        if (secret is None) == (signing_key is None):
            raise ValueError("a TokenIssuer needs exactly one of secret= or signing_key=")
        self._secret = _check_secret(secret) if secret is not None else None
        self._signing = signing_key

    def issue(
        self,
        subject: str,
        role: Role | str,
        project: str,
        region: str | None = None,
        ttl_s: int = 86400,
    ) -> str:
        """A signed token valid for ``ttl_s`` seconds from now.

        Raises ``ValueError`` (``TopicError`` for a bad name) for an unknown role, an empty
        subject, a device without a region, or a project, region or device id that is not a
        valid topic segment, so no token is issued that the broker would have to refuse.
        """
        role = Role(role)
        region = region or None
        _check_identity(subject, role, project, region)
        # A float iat: a device re-provisioned in the same second as its revocation must
        # get a token that is newer than the revocation.
        now = time.time()
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": subject,
            "role": role.value,
            "project": project,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": int(now) + int(ttl_s),
        }
        if region:
            claims["region"] = region
        if self._signing is not None:
            return jwt.encode(
                claims,
                self._signing.key,
                algorithm=self._signing.algorithm,
                headers={"kid": self._signing.kid},
            )
        assert self._secret is not None
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Checks tokens; brokers, combiners, the controller and the API hold one.

    Give it either an HS256 ``secret`` or ``public_keys`` (never both: a verifier that took
    either would let an HS256 token signed with a *public* key through). ``project`` refuses
    tokens of other projects; ``revocations`` refuses revoked subjects and token ids.
    ``leeway_s`` tolerates clock skew on expiry. Thread-safe. Raises ``ValueError`` for a
    secret shorter than ``MIN_SECRET_BYTES``, or for neither or both.
    """

    def __init__(
        self,
        secret: str | None = None,
        leeway_s: float = 5.0,
        *,
        public_keys: PublicKeys | None = None,
        project: str | None = None,
        revocations: RevocationList | None = None,
    ) -> None:
        if (secret is None) == (public_keys is None):
            raise ValueError("a TokenVerifier needs exactly one of secret= or public_keys=")
        self._secret = _check_secret(secret) if secret is not None else None
        self._public = public_keys
        self._leeway = leeway_s
        self.project = project
        self.revocations = revocations

    def _key_for(self, token: str) -> tuple[Any, str]:
        if self._public is None:
            return self._secret, ALGORITHM
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        kid = header.get("kid")
        found = self._public.get(kid) if isinstance(kid, str) else None
        if found is None:
            raise AuthError(f"token signed with an unknown or retired key {kid!r}")
        key, alg = found
        if header.get("alg") != alg:
            raise AuthError(f"token alg {header.get('alg')!r} does not match key {kid!r} ({alg})")
        return key, alg

    def verify(self, token: str | bytes | None) -> Claims:
        """The claims of a valid, unexpired token; otherwise ``AuthError`` saying why.

        Beyond the signature it refuses tokens whose names could not be used as topic
        levels, so the ACL never sees a ``+`` or ``#`` smuggled in through a claim.
        """
        if not token:
            raise AuthError("no token presented")
        if isinstance(token, bytes):
            token = token.decode("utf-8", "replace")
        key, algorithm = self._key_for(token)
        try:
            data = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("bad token signature (signed with another secret?)") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks claim {exc.claim!r}") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        for claim in ("role", "project"):
            if claim not in data:
                raise AuthError(f"token lacks claim {claim!r}")
        try:
            role = Role(data["role"])
        except ValueError as exc:
            raise AuthError(f"unknown role {data['role']!r}") from exc
        region = data.get("region") or None
        try:
            _check_identity(data["sub"], role, data["project"], region)
        except (TopicError, ValueError) as exc:
            raise AuthError(f"token claims unusable: {exc}") from exc
        if self.project is not None and data["project"] != self.project:
            raise AuthError(f"token is for project {data['project']!r}, not {self.project!r}")
        jti = data.get("jti") if isinstance(data.get("jti"), str) else None
        iat = data.get("iat") if isinstance(data.get("iat"), (int, float)) else None
        claims = Claims(
            data["sub"],
            role,
            data["project"],
            region,
            float(data["exp"]),
            jti,
            float(iat) if iat is not None else None,
        )
        if self.revocations is not None:
            # A fresh verification (a CONNECT, an API call) sees a revocation at once: one
            # stat of the list, cheap beside the signature check. Without it, a revoked
            # device could connect until the list's next periodic reload (up to 1 s).
            self.revocations.refresh()
        reason = self.still_valid(claims)
        if reason:
            raise AuthError(reason)
        return claims

    def still_valid(self, claims: Claims, now: float | None = None) -> str | None:
        """Why a token verified earlier must now be refused (expired, revoked), or None.

        Brokers call this on live connections, so an open connection does not outlive its
        token.
        """
        now = time.time() if now is None else now
        if claims.expires + self._leeway < now:
            return "token expired"
        if self.revocations is not None and self.revocations.revoked(
            claims.subject, claims.token_id, claims.issued_at
        ):
            return "token revoked"
        return None


# -- configuration -------------------------------------------------------------------------

SECRET_ENV = "EDGEFL_JWT_SECRET"
KEYS_ENV = "EDGEFL_JWT_KEYS"
REVOCATIONS_ENV = "EDGEFL_REVOCATIONS"


@dataclass(frozen=True)
class AuthConfig:
    """Where a component's token material lives: plain data, so it crosses process and
    config-file boundaries (the amqtt plug-in config, a systemd unit, a Kubernetes secret).

    Exactly one of ``secret`` (HS256) or ``keys`` (a key directory, or a ``jwks.json`` for a
    verifier-only host). ``revocations`` is the revocation list (default ``revoked.json``
    next to the keys, when keys are used).
    """

    secret: str | None = None
    keys: str | None = None
    revocations: str | None = None

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.keys is None):
            raise ValueError("auth needs exactly one of a JWT secret or a key directory")
        if self.secret is not None:
            _check_secret(self.secret)

    @classmethod
    def from_env(cls) -> AuthConfig | None:
        """From ``EDGEFL_JWT_KEYS`` or ``EDGEFL_JWT_SECRET`` (and ``EDGEFL_REVOCATIONS``)."""
        keys = os.environ.get(KEYS_ENV) or None
        secret = os.environ.get(SECRET_ENV) or None
        revocations = os.environ.get(REVOCATIONS_ENV) or None
        if keys and secret:
            raise ValueError(f"set only one of {KEYS_ENV} and {SECRET_ENV}")
        if not keys and not secret:
            return None
        return cls(secret=secret, keys=keys, revocations=revocations)

    @property
    def algorithm(self) -> str:
        if self.secret is not None:
            return ALGORITHM
        return "/".join(ASYMMETRIC_ALGORITHMS)

    def _keys_path(self) -> Path:
        assert self.keys is not None
        return Path(self.keys)

    def revocations_path(self) -> Path | None:
        if self.revocations:
            return Path(self.revocations)
        if self.keys is not None:
            base = self._keys_path()
            return (base.parent if base.is_file() else base) / "revoked.json"
        return None

    def issuer(self) -> TokenIssuer:
        """The signer; ``KeyDirError`` if this host has only public keys."""
        if self.secret is not None:
            return TokenIssuer(self.secret)
        return TokenIssuer(signing_key=KeyDir(self._keys_path()).signing_key())

    def verifier(self, project: str | None = None, leeway_s: float = 5.0) -> TokenVerifier:
        """A verifier with the public keys and the revocation list (both reloaded on change)."""
        rev_path = self.revocations_path()
        revocations = RevocationList(rev_path) if rev_path is not None else None
        if self.secret is not None:
            return TokenVerifier(self.secret, leeway_s, project=project, revocations=revocations)
        path = self._keys_path()
        jwks = path if path.is_file() else KeyDir(path).jwks_path
        return TokenVerifier(
            None, leeway_s, public_keys=PublicKeys(jwks), project=project, revocations=revocations
        )


def as_auth(auth: AuthConfig | str | None) -> AuthConfig | None:
    """Accept a bare HS256 secret wherever an ``AuthConfig`` goes (the demo and tests)."""
    if auth is None or isinstance(auth, AuthConfig):
        return auth
    return AuthConfig(secret=auth)
