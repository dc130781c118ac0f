"""The embedded broker: amqtt inside the edgefl process, for the zero-setup run.

Secure by default: it needs a JWT secret, or the explicit ``allow_anonymous`` flag, which is
logged as INSECURE. It binds to loopback unless told otherwise (amqtt's own default is
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
* When a client's message loop ends without a handled DISCONNECT (e.g. it published to a
  ``$`` topic) the session stayed "connected" with an open socket. We close it and mark it
  disconnected, so a persistent session queues again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
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

from edgefl.broker.amqtt_plugins import session_claims

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

    async def _vet_connect(self, incoming: Session) -> str | None:
        """Why this CONNECT must be refused, or None. Runs before any session is touched."""
        if not await super()._authenticate(incoming, None):
            return "authentication failed"
        existing = self._sessions.get(incoming.client_id)
        if existing is not None:
            old = existing[0]
            held = old.transitions.is_connected() or not old.clean_session
            if held and _identity(old) != _identity(incoming):
                return f"client id {incoming.client_id!r} is held by another identity"
        if incoming.will_flag and not await self._topic_filtering(
            incoming, incoming.will_topic or "", Action.PUBLISH
        ):
            return f"last will topic {incoming.will_topic!r} is not allowed"
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

        reason = await self._vet_connect(incoming)
        if reason is not None:
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
    Refuses to build an unauthenticated broker unless ``allow_anonymous`` says so; raises
    ``ValueError`` for a missing or too short secret before any thread starts. Call
    ``start``/``stop`` from one thread; the broker itself serves clients concurrently.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str | None = None,
        allow_anonymous: bool = False,
        session_expiry_s: int | None = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        if secret is None and not allow_anonymous:
            raise ValueError(
                "the embedded broker needs a JWT secret (secret=..., e.g. from "
                "edgefl.auth.tokens.generate_secret()), or allow_anonymous=True for an "
                "explicitly INSECURE development broker"
            )
        if secret is not None:
            from edgefl.auth.tokens import TokenVerifier

            TokenVerifier(secret)  # a short secret fails here, not in the broker thread
            if allow_anonymous:
                log.info("embedded broker: a secret is set, so allow_anonymous is ignored")
        self.host = host
        self.port = port
        self.secret = secret
        self.allow_anonymous = secret is None
        self.session_expiry_s = session_expiry_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` for clients (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "timeout_disconnect_delay": 0,
            "session_expiry_interval": self.session_expiry_s,
            # replaces amqtt's default plug-ins (which include anonymous auth and $SYS)
            "plugins": {
                "edgefl.broker.amqtt_plugins.JwtAuthPlugin": {
                    "secret": self.secret,
                    "allow_anonymous": self.allow_anonymous,
                },
                "edgefl.broker.amqtt_plugins.AclTopicPlugin": {"enforce": self.secret is not None},
            },
        }

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
