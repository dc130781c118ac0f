"""Credentials for components: the one place that turns a secret into broker logins."""

from __future__ import annotations

from dataclasses import dataclass

from edgefl.auth.tokens import Role, TokenIssuer

DEFAULT_TTL_S = 86400


@dataclass(frozen=True)
class Credentials:
    """Issues the MQTT username/password (a JWT) each component connects with.

    With ``secret=None`` (the explicit insecure development mode) every login is empty, so
    components connect anonymously; callers never branch on the mode themselves.
    """

    secret: str | None
    project: str
    ttl_s: int = DEFAULT_TTL_S

    @property
    def secure(self) -> bool:
        return self.secret is not None

    def token(self, subject: str, role: Role | str, region: str | None = None) -> str | None:
        """A signed token for ``subject``, or None in insecure mode."""
        if self.secret is None:
            return None
        return TokenIssuer(self.secret).issue(
            subject, Role(role), self.project, region=region, ttl_s=self.ttl_s
        )

    def login(self, subject: str, role: Role | str, region: str | None = None) -> dict[str, str]:
        """``{"username", "password"}`` keyword arguments for a component, or ``{}``."""
        token = self.token(subject, role, region)
        return {} if token is None else {"username": subject, "password": token}
