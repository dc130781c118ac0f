"""The embedded broker: amqtt inside the edgefl process, for the zero-setup run.

Secure by default: it needs token material (``auth``: an HS256 secret or asymmetric keys, see
``edgefl.auth.tokens.AuthConfig``), or the explicit ``allow_anonymous`` flag, which is logged
as INSECURE. It binds to loopback unless told otherwise (amqtt's own default is
0.0.0.0:1883 with anonymous access, which we override). MQTT 3.1.1 only (amqtt has no v5).

amqtt 0.12.1 needs a few guards, all in ``_EdgeflBroker`` below (written against 0.12.1,
which pyproject pins; a different version logs a warning):

* It binds a CONNECT to a stored session (deleting it for clean_session, taking over a live
  connection) *before* authenticating. A client with a wrong password could then wipe a
  device's persistent session, kick it off, or leave it marked "connected" so its queued
  QoS 1 messages went to a dead socket. We authenticate first and refuse before any session
  state is touched. The same step refuses a client id held by another identity and a last
  will topic the ACL would not let the client publish to (amqtt sends wills unchecked).
* At CONNECT it sends a client the retained messages matching *every* client's filters,
  without an ACL check. Only the session's own (ACL-checked) subscriptions count here.
* It iterates its subscription dict across awaits, which raised "dictionary changed size
  during iteration" in ``Broker._run_broadcast`` when a client subscribed meanwhile (the
  message was lost). The dict is replaced by one that iterates over snapshots.
* A CONNECT's client id must belong to its token's identity (``edgefl.auth.acl.
  client_id_allowed``: a device's is its id or ``edgefl-{project}-{id}``), so a device cannot
  take over another's session even where no session holds that id yet.
* Tokens are re-checked on live connections: every ``sweep_s`` seconds a sweep reloads the
  revocation list and disconnects every connected session whose token has expired or been
  revoked (``TokenVerifier.still_valid``). Its reconnect is verified from scratch at CONNECT
  and refused. A revocation therefore cuts a live connection within ``sweep_s`` plus the
  list's reload interval (1 s; the sweep forces a reload, so in practice ``sweep_s``); an
  expiry within ``sweep_s`` plus the verifier's clock-skew leeway (5 s).
* When a client's message loop ends without a handled DISCONNECT (e.g. it published to a
  ``$`` topic) the session stayed "connected" with an open socket. We close it and mark it
  disconnected, so a persistent session queues again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import amqtt
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from edgefl.auth.acl import client_id_allowed
from edgefl.auth.tokens import AuthConfig, TokenVerifier, as_auth
from edgefl.broker.amqtt_plugins import AclTopicPlugin, JwtAuthPlugin, session_claims

log = logging.getLogger(__name__)

AMQTT_VERSION = "0.12.1"
if amqtt.__version__ != AMQTT_VERSION:
    log.warning(
        "edgefl's amqtt guards were written for amqtt %s, found %s: re-check embedded.py",
        AMQTT_VERSION,
        amqtt.__version__,
    )

_PREAUTH_KEY = "edgefl.preauthenticated"
DEFAULT_SESSION_EXPIRY_S = 7 * 86400  # like persistent_client_expiration in mosquitto.conf
DEFAULT_SWEEP_S = 2.0
_JWT_PLUGIN = "edgefl.broker.amqtt_plugins.JwtAuthPlugin"
_ACL_PLUGIN = "edgefl.broker.amqtt_plugins.AclTopicPlugin"
# what EmbeddedBroker.stats() reports (the ACL plug-in adds denied_publish/denied_subscribe)
BROKER_COUNTERS = (
    "refused_connect",
    "refused_client_id",
    "refused_will",
    "disconnected_revoked",
    "disconnected_expired",
)


class _SnapshotDict(dict[str, list[Any]]):
    """A dict whose iteration works on a copy, so awaits inside amqtt's loops are safe."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(super().keys())

    def values(self) -> list[list[Any]]:  # type: ignore[override]
        return [list(v) for v in super().values()]

    def items(self) -> list[tuple[str, list[Any]]]:  # type: ignore[override]
        return [(k, list(v)) for k, v in super().items()]


def _identity(session: Session) -> tuple[str, str, str] | None:
    # Not the region: a device moved to another region keeps its client id. Deliveries are
    # re-checked against the current claims, so its old region's topics stop anyway.
    c = session_claims(session)
    return None if c is None else (c.subject, c.role.value, c.project)


class _EdgeflBroker(Broker):
    """amqtt's Broker with the guards described in the module docstring."""

    def __init__(self, config: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(config, loop=loop)
        self._subscriptions = _SnapshotDict()
        self.counters: Counter[str] = Counter(dict.fromkeys(BROKER_COUNTERS, 0))
        self._sweeper: asyncio.Task[None] | None = None

    def _plugin(self, cls: type[Any]) -> Any:
        return next((p for p in self.plugins_manager.plugins if isinstance(p, cls)), None)

    @property
    def verifier(self) -> TokenVerifier | None:
        """The JWT plug-in's verifier (None in the insecure mode)."""
        plugin = self._plugin(JwtAuthPlugin)
        return None if plugin is None else plugin.verifier

    def stats(self) -> dict[str, int]:
        """Refusals, denials and sweep disconnections so far (a copy; any thread may call)."""
        out = dict(self.counters)
        acl = self._plugin(AclTopicPlugin)
        if acl is not None:
            out.update(acl.stats)
        return out

    async def start(self) -> None:
        await super().start()
        plugin = self._plugin(JwtAuthPlugin)
        if plugin is not None and plugin.verifier is not None:
            self._sweeper = asyncio.ensure_future(
                self._sweep_loop(plugin.verifier, plugin.config.sweep_s)
            )

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await super().shutdown()

    async def _sweep_loop(self, verifier: TokenVerifier, interval: float) -> None:
        """Re-check live connections' tokens every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep(verifier)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad sweep must not end the sweeping
                log.exception("token sweep failed")

    async def sweep(self, verifier: TokenVerifier) -> list[str]:
        """Disconnect every connected session whose token expired or was revoked.

        Returns the client ids cut off. The revocation list is reloaded first, so a
        revocation written before the sweep applies in it.
        """
        if verifier.revocations is not None:
            verifier.revocations.refresh()
        cut: list[str] = []
        for client_id, (session, handler) in list(self._sessions.items()):
            claims = session_claims(session)
            if claims is None or handler is None or not session.transitions.is_connected():
                continue
            reason = verifier.still_valid(claims)
            if reason is None:
                continue
            kind = "expired" if "expired" in reason else "revoked"
            self.counters[f"disconnected_{kind}"] += 1
            log.warning(
                "disconnecting client %r (subject %r, %s): %s",
                client_id,
                claims.subject,
                claims.role.value,
                reason,
            )
            # as amqtt's own take-over does: the message loop then ends the connection
            await handler.handle_connection_closed()
            cut.append(client_id)
        return cut

    async def _vet_connect(self, incoming: Session) -> tuple[str, str] | None:
        """Why this CONNECT must be refused (counter, reason), or None.

        Runs before any session is touched.
        """
        if not await super()._authenticate(incoming, None):
            return "refused_connect", "authentication failed"
        claims = session_claims(incoming)
        if claims is not None and not client_id_allowed(claims, incoming.client_id):
            return "refused_client_id", (
                f"client id {incoming.client_id!r} does not belong to {claims.role.value} "
                f"{claims.subject!r} (use {claims.subject!r} or "
                f"'edgefl-{claims.project}-{claims.subject}')"
            )
        existing = self._sessions.get(incoming.client_id)
        if existing is not None:
            old = existing[0]
            held = old.transitions.is_connected() or not old.clean_session
            if held and _identity(old) != _identity(incoming):
                return (
                    "refused_client_id",
                    f"client id {incoming.client_id!r} is held by another identity",
                )
        if incoming.will_flag and not await self._topic_filtering(
            incoming, incoming.will_topic or "", Action.PUBLISH
        ):
            return "refused_will", f"last will topic {incoming.will_topic!r} is not allowed"
        return None

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt 0.12.1's version with authentication moved in front of the session lookup."""
        try:
            handler, incoming = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except AMQTTError as exc:
            raise AMQTTError(exc) from exc
        except MQTTError:
            await writer.close()
            raise
        except NoDataError as exc:
            raise AMQTTError(exc) from exc

        refusal = await self._vet_connect(incoming)
        if refusal is not None:
            counter, reason = refusal
            self.counters[counter] += 1
            log.warning(
                "refused CONNECT of client %r (user %r) from %s:%s: %s",
                incoming.client_id,
                incoming.username,
                remote_address,
                remote_port,
                reason,
            )
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise AMQTTError(f"CONNECT refused: {reason}")

        client_session = incoming
        if incoming.clean_session:
            if incoming.client_id:
                old = self._sessions.get(incoming.client_id)
                if old is not None and old[0].transitions.is_connected():
                    # [MQTT-3.1.4-2] disconnect the old connection (amqtt left it open)
                    await self._stop_handler(old[1])
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self._sessions:
            # the stored session carries the subscriptions and the queued messages
            client_session = self._sessions[incoming.client_id][0]
            for attr in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(client_session, attr, getattr(incoming, attr))
            client_session.parent = 1
        else:
            incoming.parent = 0
        client_session.attributes.update(incoming.attributes)
        client_session.attributes[_PREAUTH_KEY] = True

        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(delay, int):
            client_session.keep_alive += delay
        return handler, client_session

    async def _authenticate(self, session: Session, listener: ListenerConfig | None) -> bool:
        # already done in _initialize_client_session, before the session was bound
        if session.attributes.pop(_PREAUTH_KEY, False):
            return True
        ok: bool = await super()._authenticate(session, listener)
        return ok

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        except asyncio.CancelledError:
            raise
        except BaseException:
            await self._settle(client_session, handler)
            raise
        await self._settle(client_session, handler)

    async def _settle(self, session: Session, handler: BrokerProtocolHandler) -> None:
        """A session whose connection is over must not stay marked connected."""
        entry = self._sessions.get(session.client_id)
        if entry is None or entry[1] is not handler or not session.transitions.is_connected():
            return
        log.info("closing client %r after its message loop ended", session.client_id)
        with contextlib.suppress(Exception):
            await self._stop_handler(handler)
        session.transitions.disconnect()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Only the session's own subscriptions (ACL-checked at SUBSCRIBE) may trigger
        # retained delivery; amqtt calls this at CONNECT for every client's filters.
        subs = self._subscriptions.get(subscription[0], [])
        if not any(s.client_id == session.client_id for s, _ in subs):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """amqtt on a background thread with its own event loop; a context manager.

    It owns that thread and loop: ``start`` blocks until the listener accepts connections (or
    raises ``RuntimeError`` with the cause), ``stop`` shuts amqtt down and joins the thread.
    With ``port=0`` the OS picks a free port, readable from ``port``/``url`` after ``start``.

    ``auth`` is an ``AuthConfig`` (HS256 secret, or keys with a revocation list) or a bare
    HS256 secret; ``secret=`` is the older spelling of the latter. ``project`` refuses tokens
    of other projects (None: any); ``leeway_s`` is the clock skew tolerated on expiry.
    Every ``sweep_s`` seconds live sessions are re-checked
    and those whose token expired or was revoked are disconnected (see the module
    docstring); ``stats()`` counts that and every refusal. Refuses to build an
    unauthenticated broker unless ``allow_anonymous`` says so; raises ``ValueError`` for
    missing or bad token material before any thread starts. Call ``start``/``stop`` from
    one thread; the broker itself serves clients concurrently.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        auth: AuthConfig | str | None = None,
        secret: str | None = None,
        allow_anonymous: bool = False,
        session_expiry_s: int | None = DEFAULT_SESSION_EXPIRY_S,
        project: str | None = None,
        sweep_s: float = DEFAULT_SWEEP_S,
        leeway_s: float = 5.0,
    ) -> None:
        if auth is not None and secret is not None:
            raise ValueError("give the embedded broker auth= or secret=, not both")
        config = as_auth(auth if auth is not None else secret)
        if config is None and not allow_anonymous:
            raise ValueError(
                "the embedded broker needs a JWT secret or keys (auth=AuthConfig(...) or "
                "secret=..., e.g. from edgefl.auth.tokens.generate_secret()), or "
                "allow_anonymous=True for an explicitly INSECURE development broker"
            )
        if not sweep_s > 0:
            raise ValueError(f"sweep_s must be positive, not {sweep_s!r}")
        if config is not None:
            # bad material (a short secret, unreadable keys) fails here, not in the broker thread
            config.verifier(project=project, leeway_s=leeway_s)
            if allow_anonymous:
                log.info("embedded broker: auth is set, so allow_anonymous is ignored")
        self.host = host
        self.port = port
        self.auth = config
        self.secret = config.secret if config is not None else None
        self.project = project
        self.sweep_s = sweep_s
        self.leeway_s = leeway_s
        self.allow_anonymous = config is None
        self.session_expiry_s = session_expiry_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: _EdgeflBroker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._last_stats: dict[str, int] = {}

    @property
    def url(self) -> str:
        """``mqtt://host:port`` for clients (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        """amqtt's config: plain data only (the plug-ins build their verifier from it)."""
        a = self.auth
        rev = a.revocations_path() if a is not None else None
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "timeout_disconnect_delay": 0,
            "session_expiry_interval": self.session_expiry_s,
            # replaces amqtt's default plug-ins (which include anonymous auth and $SYS)
            "plugins": {
                _JWT_PLUGIN: {
                    "secret": a.secret if a else None,
                    "keys": a.keys if a else None,
                    "revocations": str(rev) if rev is not None else None,
                    "project": self.project,
                    "sweep_s": self.sweep_s,
                    "leeway_s": self.leeway_s,
                    "allow_anonymous": self.allow_anonymous,
                },
                _ACL_PLUGIN: {"enforce": a is not None},
            },
        }

    def stats(self) -> dict[str, int]:
        """Counters: ``refused_connect`` (bad token), ``refused_client_id``, ``refused_will``,
        ``denied_publish``, ``denied_subscribe``, ``disconnected_revoked``,
        ``disconnected_expired``. After ``stop`` the last values stay readable.
        """
        broker = self._broker
        if broker is not None:
            self._last_stats = broker.stats()
        return dict(self._last_stats) or dict.fromkeys(
            (*BROKER_COUNTERS, "denied_publish", "denied_subscribe"), 0
        )

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start and return once the listener accepts connections.

        Raises ``RuntimeError`` if it is already running, fails to bind (the cause chained),
        or is not listening within ``timeout`` seconds.
        """
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the embedded broker is already running")
        if self.allow_anonymous:
            log.warning(
                "INSECURE: the embedded broker on %s accepts any client without "
                "authentication, and any client may connect and publish or subscribe to "
                "any topic (development mode, allow_anonymous=True)",
                self.host,
            )
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="edgefl-amqtt", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(
                f"embedded broker did not start on {self.host}:{self.port} within {timeout} s"
            )
        if self._error is not None:
            raise RuntimeError(
                f"embedded broker failed to start on {self.host}:{self.port}: {self._error}"
            ) from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            broker = _EdgeflBroker(self._config(), loop=loop)
            loop.run_until_complete(broker.start())
            # port 0: the OS picked one; read it back from the listening socket
            server = broker._servers["default"].instance
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._loop, self._broker = loop, broker
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        """Shut down cleanly, waiting up to 10 s; safe to call twice or after a failed start.

        Persistent sessions and retained messages live in memory and are lost.
        """
        loop, broker, thread = self._loop, self._broker, self._thread
        if broker is not None:
            self._last_stats = broker.stats()
        self._loop = self._broker = None
        if loop is not None and broker is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                fut.result(timeout=10)
            except Exception:  # shutdown must not mask the caller's error
                log.exception("embedded broker shutdown failed")
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
