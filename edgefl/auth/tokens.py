"""JWT identities (HS256 via pyjwt) with roles.

Every component — device, combiner, controller, operator — carries a token that names its
subject, role, project and (for devices and regional combiners) region. The broker checks it
at CONNECT and derives topic permissions from it, so a topic is proof of identity.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from enum import Enum

import jwt

from edgefl.protocol.topics import TopicError, check_segment

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
    combiners; ``expires`` is a Unix time.
    """

    subject: str
    role: Role
    project: str
    region: str | None
    expires: float


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

    Holds no mutable state, so it can be shared across threads. Raises ``ValueError`` for a secret
    shorter than ``MIN_SECRET_BYTES``.
    """

    def __init__(self, secret: str) -> None:
        self._secret = _check_secret(secret)

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
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": subject,
            "role": role.value,
            "project": project,
            "iat": now,
            "exp": now + int(ttl_s),
        }
        if region:
            claims["region"] = region
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Checks tokens; the broker holds one.

    Holds no mutable state, so it can be shared across threads. Raises ``ValueError`` for a secret
    shorter than ``MIN_SECRET_BYTES``. ``leeway_s`` tolerates clock skew on expiry.
    """

    def __init__(self, secret: str, leeway_s: float = 5.0) -> None:
        self._secret = _check_secret(secret)
        self._leeway = leeway_s

    def verify(self, token: str | bytes | None) -> Claims:
        """The claims of a valid, unexpired token; otherwise ``AuthError`` saying why.

        Beyond the signature it refuses tokens whose names could not be used as topic
        levels, so the ACL never sees a ``+`` or ``#`` smuggled in through a claim.
        """
        if not token:
            raise AuthError("no token presented")
        if isinstance(token, bytes):
            token = token.decode("utf-8", "replace")
        try:
            data = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
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
        return Claims(data["sub"], role, data["project"], region, float(data["exp"]))
