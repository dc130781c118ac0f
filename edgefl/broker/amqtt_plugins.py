"""amqtt plug-ins: JWT authentication at CONNECT and topic ACLs on every publish/subscribe.

amqtt configures plug-ins from plain data (dacite into the inner ``Config`` dataclass), so the
secret travels as a string. The claims of each authenticated client are kept per client id
for the topic plug-in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edgefl.auth.acl import allowed
from edgefl.auth.tokens import AuthError, Claims, TokenVerifier

log = logging.getLogger("edgefl.broker.auth")

# client id -> claims, shared by the two plug-ins of one process
_CLAIMS: dict[str, Claims] = {}


class JwtAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        secret: str | None = None
        allow_anonymous: bool = False

    def __init__(self, context) -> None:  # noqa: ANN001
        super().__init__(context)
        self.verifier = TokenVerifier(self.config.secret) if self.config.secret else None

    async def authenticate(self, *, session: Session) -> bool | None:
        if self.verifier is None:
            # Explicit insecure mode (logged loudly at start-up). The session is NOT marked
            # anonymous, so persistent sessions still queue QoS 1 messages.
            return bool(self.config.allow_anonymous)
        try:
            claims = self.verifier.verify(session.password)
        except AuthError as exc:
            log.warning("refused client %s (user %r): %s", session.client_id, session.username, exc)
            return False
        if claims.subject != session.username:
            log.warning(
                "refused client %s: token subject %r is not username %r",
                session.client_id,
                claims.subject,
                session.username,
            )
            return False
        _CLAIMS[session.client_id] = claims
        return True


class AclTopicPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        enforce: bool = True

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if not self.config.enforce:
            return True
        if session is None or topic is None or action is None:
            return False
        claims = _CLAIMS.get(session.client_id)
        if claims is None:
            return False
        if action == Action.RECEIVE:
            # delivery was already allowed by the subscription's check
            return True
        ok = allowed(claims, topic, "publish" if action == Action.PUBLISH else "subscribe")
        if not ok:
            log.warning("denied %s %s on %s", claims.subject, action.value, topic)
        return ok
