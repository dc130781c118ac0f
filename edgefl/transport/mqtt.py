"""A thin, reconnecting wrapper around paho-mqtt.

Why a wrapper: every tier needs the same things from its connection — persistent sessions,
re-subscription after a reconnect, backoff, a last will, per-filter handlers, and MQTT 3.1.1 by
default (amqtt and most microcontroller clients speak nothing newer).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls = parsed.scheme in ("mqtts", "ssl")
    return BrokerAddress(
        host=parsed.hostname,
        port=parsed.port or (8883 if tls else 1883),
        username=unquote(parsed.username) if parsed.username else None,
        password=unquote(parsed.password) if parsed.password else None,
        tls=tls,
    )


class MqttConnection:
    """One MQTT client with remembered subscriptions and automatic reconnects.

    Handlers run on paho's network thread; they must be quick or hand work to a queue.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = False,
        will: tuple[str, bytes, int, bool] | None = None,
        keepalive: int = 30,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
        max_inflight: int = 64,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        self.client_id = client_id
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._on_connect_cb = on_connect
        self._closing = False
        self.connect_count = 0
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        user = username if username is not None else self.address.username
        pwd = password if password is not None else self.address.password
        if user is not None:
            client.username_pw_set(user, pwd)
        if self.address.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            topic, payload, qos, retain = will
            client.will_set(topic, payload, qos=qos, retain=retain)
        client.reconnect_delay_set(min_delay=min_backoff_s, max_delay=max_backoff_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._keepalive = keepalive
        self.client = client
        self.last_refusal: str | None = None

    # lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> MqttConnection:
        """Connect in the background; with a timeout, wait for the first CONNACK."""
        self.client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        self.client.loop_start()
        if timeout is not None and not self.connected.wait(timeout):
            reason = self.last_refusal or "no CONNACK"
            self.stop()
            raise ConnectionError(
                f"{self.client_id}: could not connect to {self.address.url} within {timeout}s"
                f" ({reason})"
            )
        return self

    def stop(self, publish_first: tuple[str, bytes, int, bool] | None = None) -> None:
        """Disconnect cleanly (no last will); optionally publish one last message first."""
        self._closing = True
        if publish_first is not None and self.connected.is_set():
            topic, payload, qos, retain = publish_first
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def drop(self) -> None:
        """Cut the socket without DISCONNECT, as a crash would: the broker sends the will."""
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    # pub/sub ---------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        def _cb(_client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
            try:
                handler(msg.topic, msg.payload)
            except Exception:  # a bad message must never kill the network thread
                log.exception("%s: handler for %s failed", self.client_id, msg.topic)

        self.client.message_callback_add(topic_filter, _cb)
        with self._lock:
            self._subs[topic_filter] = qos
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        self.client.message_callback_remove(topic_filter)
        if self.connected.is_set():
            self.client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        """Publish; with QoS 1 paho keeps the message and resends it after a reconnect."""
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    # callbacks -------------------------------------------------------------------------
    def _on_connect(self, client, _userdata, _flags, reason_code, _props=None) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self.last_refusal = str(reason_code)
            log.error("%s: broker refused connection: %s", self.client_id, reason_code)
            return
        self.connect_count += 1
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # Small control messages must not wait for Nagle + delayed ACK (~40 ms each hop).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            client.subscribe(subs)
        self.connected.set()
        if self.connect_count > 1:
            log.info("%s: reconnected to %s", self.client_id, self.address.url)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("%s: on_connect hook failed", self.client_id)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props=None) -> None:  # noqa: ANN001
        self.connected.clear()
        if not self._closing:
            log.warning(
                "%s: disconnected (%s); reconnecting with backoff", self.client_id, reason_code
            )
