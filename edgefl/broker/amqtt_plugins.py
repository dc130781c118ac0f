"""amqtt plug-ins: JWT authentication at CONNECT and topic ACLs on every publish/subscribe.

amqtt 0.12.1 builds each plug-in's inner ``Config`` dataclass from the ``plugins`` section of
the broker config with dacite (strict). dacite passes objects through unchanged, so a live
``TokenVerifier`` would work too, but the config stays plain data (the secret as a string),
so the same plug-ins can be named in an amqtt YAML file.

The claims of a client are kept in its amqtt ``Session.attributes`` (the documented place for
plug-in state), so they live and die with the session and never leak between two brokers in
one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edgefl.auth.acl import allowed
from edgefl.auth.tokens import AuthError, Claims, TokenVerifier

log = logging.getLogger("edgefl.broker.auth")

CLAIMS_KEY = "edgefl.claims"


def session_claims(session: Session | None) -> Claims | None:
    """The verified claims of a session, or None (anonymous mode, or never authenticated)."""
    if session is None:
        return None
    claims = session.attributes.get(CLAIMS_KEY)
    return claims if isinstance(claims, Claims) else None


class JwtAuthPlugin(BaseAuthPlugin):
    """MQTT password = edgefl JWT; its subject must equal the MQTT username.

    Fails closed: without a secret it refuses to load unless ``allow_anonymous`` is set, so a
    config that forgot the secret cannot produce an open broker.
    """

    @dataclass
    class Config:
        """The plug-in's section of the amqtt config (plain data, so YAML can hold it)."""

        secret: str | None = None
        allow_anonymous: bool = False

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        if not self.config.secret and not self.config.allow_anonymous:
            # fail closed: a config that forgot the secret must not become an open broker
            raise ValueError("JwtAuthPlugin needs a secret, or allow_anonymous: true")
        self.verifier = TokenVerifier(self.config.secret) if self.config.secret else None

    async def authenticate(self, *, session: Session) -> bool | None:
        """Accept a CONNECT only with a valid token for its username; log why if refused.

        On success the claims are stored in the session for the ACL plug-in; on any attempt
        the previous claims are cleared first, so a refused reconnect keeps no old rights.
        """
        session.attributes.pop(CLAIMS_KEY, None)
        if self.verifier is None:
            # Explicit insecure mode (logged loudly at start-up). The session is NOT marked
            # anonymous, so persistent sessions still queue QoS 1 messages.
            return True
        try:
            claims = self.verifier.verify(session.password)
        except AuthError as exc:
            log.warning("refused client %r (user %r): %s", session.client_id, session.username, exc)
            return False
        if claims.subject != session.username:
            log.warning(
                "refused client %r: token subject %r is not the username %r",
                session.client_id,
                claims.subject,
                session.username,
            )
            return False
        session.attributes[CLAIMS_KEY] = claims
        return True


class AclTopicPlugin(BaseTopicPlugin):
    """edgefl.auth.acl.allowed on every SUBSCRIBE, PUBLISH and delivery.

    A session without verified claims is denied everything while enforcement is on.
    """

    @dataclass
    class Config:
        """``enforce: false`` lets everything through (only for the anonymous dev broker)."""

        enforce: bool = True

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        """Whether ``session`` may do ``action`` on ``topic``; denials are logged."""
        if not self.config.enforce:
            return True
        claims = session_claims(session)
        if claims is None or topic is None or action is None:
            return False
        if action == Action.RECEIVE:
            # Checked again at delivery with the session's *current* claims: a persistent
            # session keeps its subscriptions across reconnects.
            return allowed(claims, topic, "subscribe")
        ok = allowed(claims, topic, "publish" if action == Action.PUBLISH else "subscribe")
        if not ok:
            log.warning(
                "denied %s (%s) %s on %r", claims.subject, claims.role.value, action.value, topic
            )
        return ok
