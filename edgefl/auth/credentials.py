"""Credentials for components: the one place that turns token material into broker logins."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgefl.auth.tokens import AuthConfig, Role, as_auth

DEFAULT_TTL_S = 86400


@dataclass(frozen=True)
class Credentials:
    """Issues the MQTT username/password (a JWT) each component connects with.

    ``auth`` is an ``AuthConfig`` (an HS256 secret or a key directory, whose active key signs)
    or a bare HS256 secret string. With ``auth=None`` (the explicit insecure development mode)
    every login is empty, so components connect anonymously; callers never branch on the mode
    themselves.
    """

    auth: AuthConfig | str | None
    project: str
    ttl_s: int = DEFAULT_TTL_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "auth", as_auth(self.auth))

    @property
    def config(self) -> AuthConfig | None:
        """The normalised ``AuthConfig`` (a bare secret was wrapped at construction)."""
        return as_auth(self.auth)

    @property
    def secret(self) -> str | None:
        """The HS256 secret, if that is what signs (None with keys or in insecure mode)."""
        cfg = self.config
        return None if cfg is None else cfg.secret

    @property
    def secure(self) -> bool:
        return self.auth is not None

    def token(self, subject: str, role: Role | str, region: str | None = None) -> str | None:
        """A signed token for ``subject``, or None in insecure mode.

        With keys, the key that is active *now* signs, so a rotation applies to the next
        token without rebuilding anything.
        """
        cfg = self.config
        if cfg is None:
            return None
        return cfg.issuer().issue(
            subject, Role(role), self.project, region=region, ttl_s=self.ttl_s
        )

    def login(self, subject: str, role: Role | str, region: str | None = None) -> dict[str, str]:
        """``{"username", "password"}`` keyword arguments for a component, or ``{}``."""
        token = self.token(subject, role, region)
        return {} if token is None else {"username": subject, "password": token}


class Logins(Protocol):
    """Where a component's broker login comes from: minted tokens, or provisioned files."""

    def token(self, subject: str, role: Role | str, region: str | None = None) -> str | None:
        """The password for ``subject``, or None for an anonymous login."""
        ...

    def login(self, subject: str, role: Role | str, region: str | None = None) -> dict[str, str]:
        """``{"username", "password"}`` for a component, or ``{}``."""
        ...


class ProvisionedLogins:
    """The logins ``edgefl fleet provision`` wrote: ``DIR/servers/<name>.json`` for servers,
    ``DIR/devices/<id>/agent.json`` (the bundle) for devices.

    Mosquitto compares passwords against its password file, so on Mosquitto every component
    must present exactly the password provisioning hashed; it cannot mint a fresh token.
    Accepts the provisioning output folder or its ``servers/`` folder (servers only). A
    missing login raises ``FileNotFoundError`` naming the file and the command that writes it.
    """

    def __init__(self, folder: Path | str) -> None:
        folder = Path(folder)
        self.root = folder if (folder / "servers").is_dir() else folder.parent
        self.folder = self.root / "servers"
        if not self.folder.is_dir():
            raise FileNotFoundError(f"no server logins in {folder} (run edgefl fleet provision)")

    def token(self, subject: str, role: Role | str, region: str | None = None) -> str | None:
        return self.login(subject, role, region)["password"]

    def login(self, subject: str, role: Role | str, region: str | None = None) -> dict[str, str]:
        if Role(role) is Role.device:
            path = self.root / "devices" / subject / "agent.json"
        else:
            path = self.folder / f"{subject}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"no login for {subject!r}: {path} is missing (provision it with "
                "edgefl fleet provision)"
            ) from exc
        return {"username": str(data["username"]), "password": str(data["password"])}
