"""The embedded broker: amqtt inside the edgefl process, for the zero-setup run.

Secure by default: it needs a JWT secret, or the explicit ``allow_anonymous`` flag, which is
logged as INSECURE. It binds to loopback unless told otherwise (amqtt's own default is
0.0.0.0:1883 with anonymous access, which we override). MQTT 3.1.1 only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)


class _SnapshotDict(dict):
    """amqtt iterates its subscription dict across awaits; a subscribe in between raised
    'dictionary changed size during iteration' in Broker._run_broadcast. Iterating over a
    snapshot makes those loops safe without patching amqtt's code."""

    def __iter__(self):  # noqa: ANN204
        return iter(list(super().keys()))

    def items(self):  # noqa: ANN201
        return list(super().items())

    def keys(self):  # noqa: ANN201
        return list(super().keys())

    def values(self):  # noqa: ANN201
        return list(super().values())


def _broker_class() -> type:
    from amqtt.broker import Broker

    class EdgeflBroker(Broker):
        async def _publish_retained_messages_for_subscription(self, subscription, session):  # noqa: ANN001, ANN202
            # amqtt 0.12.1 calls this at CONNECT for *every* client's filters, which sends a
            # client retained messages it never subscribed to (and skips the ACL). Only the
            # session's own subscriptions may trigger retained delivery.
            subs = self._subscriptions.get(subscription[0], [])
            if not any(s.client_id == session.client_id for s, _ in subs):
                return
            await super()._publish_retained_messages_for_subscription(subscription, session)

    return EdgeflBroker


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str | None = None,
        allow_anonymous: bool = False,
    ) -> None:
        if secret is None and not allow_anonymous:
            raise ValueError(
                "the embedded broker needs a JWT secret (secret=...), or allow_anonymous=True "
                "for an explicitly insecure development broker"
            )
        self.host = host
        self.port = port or _free_port(host)
        self.secret = secret
        self.allow_anonymous = secret is None and allow_anonymous
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "timeout_disconnect_delay": 0,
            "plugins": {
                "edgefl.broker.amqtt_plugins.JwtAuthPlugin": {
                    "secret": self.secret,
                    "allow_anonymous": self.allow_anonymous,
                },
                "edgefl.broker.amqtt_plugins.AclTopicPlugin": {"enforce": self.secret is not None},
            },
        }

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self.allow_anonymous:
            log.warning(
                "INSECURE: embedded broker on %s:%d accepts any client without "
                "authentication (development mode)",
                self.host,
                self.port,
            )
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(
                f"embedded broker failed to start on {self.host}:{self.port}: "
                f"{self._error or 'timeout'}"
            )
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._broker = _broker_class()(self._config(), loop=loop)
            self._broker._subscriptions = _SnapshotDict(self._broker._subscriptions)
            loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # report to start(), which raises it
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: BLE001 - shutdown must not mask the caller's error
            log.exception("embedded broker shutdown failed")
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
