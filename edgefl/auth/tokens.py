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

ALGORITHM = "HS256"
ISSUER = "edgefl"
MIN_SECRET_BYTES = 32


class AuthError(Exception):
    """A token that must be refused; the message says why."""


class Role(str, Enum):
    admin = "admin"
    operator = "operator"
    viewer = "viewer"
    device = "device"
    combiner = "combiner"
    controller = "controller"


@dataclass(frozen=True)
class Claims:
    subject: str
    role: Role
    project: str
    region: str | None
    expires: float


def generate_secret() -> str:
    return secrets.token_urlsafe(48)


def _check_secret(secret: str) -> str:
    if not isinstance(secret, str) or len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes long")
    return secret


class TokenIssuer:
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
        role = Role(role)
        if role is Role.device and not region:
            raise ValueError("a device token needs a region")
        now = int(time.time())
        claims = {
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
    def __init__(self, secret: str, leeway_s: float = 5.0) -> None:
        self._secret = _check_secret(secret)
        self._leeway = leeway_s

    def verify(self, token: str | bytes | None) -> Claims:
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
            raise AuthError("bad token signature") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks claim {exc.claim!r}") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        try:
            role = Role(data.get("role"))
        except ValueError as exc:
            raise AuthError(f"unknown role {data.get('role')!r}") from exc
        project = data.get("project")
        if not isinstance(project, str) or not project:
            raise AuthError("token lacks claim 'project'")
        region = data.get("region")
        if role is Role.device and not region:
            raise AuthError("device token lacks claim 'region'")
        return Claims(str(data["sub"]), role, project, region, float(data["exp"]))
