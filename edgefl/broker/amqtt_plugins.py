"""amqtt plug-ins: JWT authentication at CONNECT and topic ACLs on every publish/subscribe.

amqtt 0.12.1 builds each plug-in's inner ``Config`` dataclass from the ``plugins`` section of
the broker config with dacite (strict). dacite passes objects through unchanged, so a live
``TokenVerifier`` would work too, but the config stays plain data (the secret as a string),
so the same plug-ins can be named in an amqtt YAML file: ``secret`` (HS256) or ``keys`` (a key
directory or a ``jwks.json``), ``revocations`` (the revocation list), ``project`` and
``sweep_s`` (how often the broker re-checks live sessions, see ``edgefl.broker.embedded``),
``leeway_s`` (the clock skew tolerated on expiry).

The claims of a client are kept in its amqtt ``Session.attributes`` (the documented place for
plug-in state), so they live and die with the session and never leak between two brokers in
one process.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edgefl.auth.acl import allowed
from edgefl.auth.tokens import AuthConfig, AuthError, Claims, TokenVerifier

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

    Fails closed: without a secret or keys it refuses to load unless ``allow_anonymous`` is
    set, so a config that forgot them cannot produce an open broker.
    """

    @dataclass
    class Config:
        """The plug-in's section of the amqtt config (plain data, so YAML can hold it)."""

        secret: str | None = None
        keys: str | None = None
        revocations: str | None = None
        project: str | None = None
        sweep_s: float = 2.0
        leeway_s: float = 5.0
        allow_anonymous: bool = False

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        c = self.config
        if not c.secret and not c.keys and not c.allow_anonymous:
            # fail closed: a config that forgot the secret must not become an open broker
            raise ValueError("JwtAuthPlugin needs a secret or keys, or allow_anonymous: true")
        self.verifier: TokenVerifier | None = None
        if c.secret or c.keys:
            auth = AuthConfig(
                secret=c.secret or None, keys=c.keys or None, revocations=c.revocations
            )
            self.verifier = auth.verifier(project=c.project, leeway_s=c.leeway_s)

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

    A session without verified claims is denied everything while enforcement is on. Denials
    are counted in ``stats`` (``denied_publish``, ``denied_subscribe``).
    """

    @dataclass
    class Config:
        """``enforce: false`` lets everything through (only for the anonymous dev broker)."""

        enforce: bool = True

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.stats: Counter[str] = Counter(denied_publish=0, denied_subscribe=0)

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
            self.stats["denied_" + action.value] += 1
            log.warning(
                "denied client %r (%s, %s) %s on %r",
                session.client_id if session is not None else None,
                claims.subject,
                claims.role.value,
                action.value,
                topic,
            )
        return ok
