"""A thin, reconnecting wrapper around paho-mqtt.

Why a wrapper: every tier needs the same things from its connection — persistent sessions,
re-subscription after a reconnect, backoff, a last will, per-filter handlers, and MQTT 3.1.1 by
default (amqtt and most microcontroller clients speak nothing newer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefl.transport.compat import BrokerQuirks, broker_quirks, check_topic

if TYPE_CHECKING:
    from edgefl.transport.multiplex import SharedLoop

log = logging.getLogger(__name__)

# TLS files for ``mqtts://`` connections that are not given their own (set by the CLI's
# ``--ca-cert``, ``--client-cert`` and ``--client-key``)
CA_CERT_ENV = "EDGEFL_CA_CERT"
CLIENT_CERT_ENV = "EDGEFL_CLIENT_CERT"
CLIENT_KEY_ENV = "EDGEFL_CLIENT_KEY"

Handler = Callable[[str, bytes], None]
"""A message handler: called with (topic, payload) on paho's network thread."""

WINDOW_BYTES = 8 * 1024 * 1024
"""Bytes a ``publish_stream`` keeps unacknowledged: enough to keep loopback and LAN links
busy, small enough that a 40 MB upload never sits whole in paho's queue."""
# topic filters per SUBSCRIBE/UNSUBSCRIBE packet: a pool member's hundreds of exact update
# topics go in a few packets, each well under any broker's packet size limit
_FILTERS_PER_PACKET = 256


def stream_window(message_bytes: int, max_inflight: int = 64) -> int:
    """Messages of ``message_bytes`` a stream keeps in flight: ``WINDOW_BYTES`` worth, at
    least 4 and at most the connection's in-flight limit (so paho never queues any)."""
    return max(4, min(max_inflight, WINDOW_BYTES // max(1, message_bytes)))


class _Client(paho.Client):
    """paho's client, sending large packets from a memoryview.

    paho writes a packet with ``sock.send(packet[pos:])``: on a bytes packet each partial
    send copies the rest of it, which for a 1 MiB chunk meeting a full socket buffer is
    quadratic. A view makes that slice free; nothing else in paho reads the packet.
    """

    def _packet_queue(self, command: int, packet: Any, mid: int, qos: int, info: Any = None) -> Any:
        if len(packet) >= 65536:
            packet = memoryview(packet)
        return super()._packet_queue(command, packet, mid, qos, info)

    def _handle_publish(self) -> Any:
        """A large QoS 0/1 PUBLISH (MQTT 3.1.1) decoded with one copy of its payload.

        paho's decoder cuts the packet with three ``struct.unpack`` calls, each copying the
        rest of it: three extra copies of every 1 MiB chunk. This does what paho does
        (message, callbacks, PUBACK; not the debug log line) from a view; anything else
        (MQTT 5, QoS 2, small packets) is paho's own.
        """
        packet = self._in_packet["packet"]
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol == paho.MQTTv5 or qos > 1 or len(packet) < 65536:
            return super()._handle_publish()
        view = memoryview(packet)
        slen = int.from_bytes(view[:2], "big")
        pos = 2 + slen + (2 if qos else 0)
        if slen == 0 or pos > len(view):
            view.release()
            raise MalformedPacket("PUBLISH with an empty or truncated topic")
        message = paho.MQTTMessage(
            mid=int.from_bytes(view[2 + slen : pos], "big") if qos else 0,
            topic=bytes(view[2 : 2 + slen]),
        )
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = bytes(view[pos:])
        view.release()
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return paho.MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(message.mid)


class PublishStream:
    """Messages published with at most ``window`` of them unacknowledged (QoS 1).

    Made by ``MqttConnection.publish_stream``. Each PUBACK pulls the next message from the
    source on paho's network thread, so a sender holds ``window`` messages, not all of them,
    and the link stays busy without anyone waiting in a loop. Messages are made lazily by
    ``make(key)`` for each key in order; ``unacked`` tells which keys to send again if the
    stream is given up (``wait`` timed out).
    """

    def __init__(
        self,
        keys: Sequence[Any],
        make: Callable[[Any], tuple[str, bytes]],
        qos: int,
        retain: bool,
        window: int,
    ) -> None:
        self.keys = keys
        self.make = make
        self.qos = qos
        self.retain = retain
        self.window = max(1, window)
        self.next = 0  # index in keys of the next message to make
        self.outstanding: dict[int, Any] = {}  # mid -> key
        self.acked = 0
        self.sent_bytes = 0
        self.error: BaseException | None = None
        self.cancelled = False
        self.progress_at = time.monotonic()
        self.done = threading.Event()
        self._cond = threading.Condition()

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def wait(self, stall_s: float) -> bool:
        """Block until every message is acknowledged; False if none was for ``stall_s``.

        Raises what making a message raised. Woken by each acknowledgement, not polling.
        """
        with self._cond:
            while not self.done.is_set():
                left = self.progress_at + stall_s - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        if self.error is not None:
            raise self.error
        return True

    def unacked(self) -> list[Any]:
        """Keys not acknowledged yet (in flight, or never sent), in order."""
        pending = set(self.outstanding.values())
        return [k for k in self.keys[: self.next] if k in pending] + list(self.keys[self.next :])

    def _finish(self) -> None:
        with self._cond:
            self.done.set()
            self._cond.notify_all()

    def _progressed(self) -> None:
        with self._cond:
            self.progress_at = time.monotonic()
            self._cond.notify_all()


@dataclass(frozen=True)
class BrokerAddress:
    """Where and as whom to connect, parsed from a broker URL."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def url(self) -> str:
        """The URL without credentials, safe to log and show in errors."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS).

    ``tcp://`` and ``ssl://`` are accepted as aliases; the port defaults to 1883, or 8883 with
    TLS; percent-escapes in the credentials are decoded. Raises ``ValueError`` naming the URL.
    A query (``?broker=rabbitmq``) names the broker's quirks: ``edgefl.transport.compat``.
    """
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

    It owns a paho client and, between ``start`` and ``stop``, paho's network thread.
    ``publish``, ``subscribe`` and ``unsubscribe`` may be called from any thread and never
    wait for the network. Subscriptions are remembered and renewed after every reconnect,
    and reconnects back off from ``min_backoff_s`` to ``max_backoff_s``. ``connected`` is
    set while a session is up. Handlers run on the network thread: they must be quick or
    hand work to a queue, and an exception in one is logged, never propagated.
    ``on_connect`` runs on the same thread after each (re)connection.

    With ``mqtts://`` the broker's certificate is always verified, and its name checked
    against the URL's host: against ``ca_file`` (the fleet's CA, e.g. from ``edgefl ca``) or,
    when it is None, the system's trusted CAs. ``cert_file``/``key_file`` present a client
    certificate (mutual TLS). ``tls_insecure=True`` turns verification off, for a lab broker
    with a self-signed certificate only, and logs INSECURE. A TLS failure (certificate
    verify failed, hostname mismatch) is logged and kept in ``last_refusal``.

    With ``loop`` (a ``SharedLoop``), the connection has no thread of its own: the shared loop
    drives it with many others (a simulated fleet). Everything else is the same.
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
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        tls_insecure: bool = False,
        loop: SharedLoop | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        # what this broker does differently (from the URL's query), and the workarounds
        self.quirks: BrokerQuirks = broker_quirks(url)
        self._loop = loop
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._acks = threading.Condition()
        tls_context = None
        if self.address.tls:
            # the command's TLS files (``edgefl --ca-cert ...``) unless given here
            ca_file = ca_file or os.environ.get(CA_CERT_ENV) or None
            cert_file = cert_file or os.environ.get(CLIENT_CERT_ENV) or None
            key_file = key_file or os.environ.get(CLIENT_KEY_ENV) or None
            tls_context = tls_client_context(ca_file, cert_file, key_file, tls_insecure)
            if tls_insecure:
                log.warning(
                    "INSECURE: %s: TLS to %s WITHOUT verifying the broker's certificate or name "
                    "(tls_insecure): anyone on the path can impersonate the broker",
                    client_id,
                    self.address.url,
                )
        else:
            given = [
                n
                for n, v in (
                    ("ca_file", ca_file),
                    ("cert_file", cert_file),
                    ("key_file", key_file),
                    ("tls_insecure", tls_insecure or None),
                )
                if v is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} given but the broker URL {self.address.url} is plain "
                    "MQTT: use mqtts://host:8883 for TLS"
                )
        self.last_refusal: str | None = None
        self._logged_failure: str | None = None
        self.client_id = client_id
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._on_connect_cb = on_connect
        self._closing = False
        self.connect_count = 0
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        user = username if username is not None else self.address.username
        pwd = password if password is not None else self.address.password
        if user is not None:
            client.username_pw_set(user, pwd)
        if tls_context is not None:
            client.tls_set_context(tls_context)
        if will is not None:
            topic, payload, qos, retain = will
            client.will_set(topic, payload, qos=qos, retain=retain)
        # paho annotates these as int but sleeps on them as float seconds
        client.reconnect_delay_set(min_delay=min_backoff_s, max_delay=max_backoff_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(max_inflight)
        self.max_inflight = max_inflight
        # publish streams: their messages in flight by mid, and acknowledgements not yet
        # matched (paho may acknowledge a message before publish() has returned its mid)
        self._streams_lock = threading.Lock()
        self._stream_of: dict[int, PublishStream] = {}
        self._streams: set[PublishStream] = set()
        self._acked: deque[int] = deque()
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_log = self._on_log
        client.on_publish = self._on_publish
        self._keepalive = keepalive
        self.client = client

    # lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> MqttConnection:
        """Connect in the background; with a timeout, block until the first CONNACK.

        Raises ``ConnectionError`` (with the broker's refusal reason if it gave one) when no
        session is up within ``timeout``, after stopping the network thread. With
        ``timeout=None`` it returns at once and keeps retrying in the background.
        """
        self.client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        if self._loop is not None:
            self._loop.attach(self)
        else:
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
        """Disconnect cleanly (the broker drops the last will) and stop the network thread.

        ``publish_first`` is sent before disconnecting, waiting at most 2 s for it (e.g. an
        "offline" status that replaces the will). Blocks until the network thread has ended.
        """
        self._closing = True
        if publish_first is not None and self.connected.is_set():
            topic, payload, qos, retain = publish_first
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self.client.disconnect()
        if self._loop is not None:
            self._loop.detach(self)
        else:
            self.client.loop_stop()
        self.connected.clear()

    @property
    def closing(self) -> bool:
        """True once ``stop`` began: no reconnects from then on."""
        return self._closing

    def drop(self) -> None:
        """Cut the socket without DISCONNECT, as a crash would: the broker sends the will.

        For fault-injection tests; paho then reconnects as after any network failure.
        """
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    # pub/sub ---------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``, now and after reconnects.

        Subscribing again to the same filter replaces its handler. Paho delivers a message to
        every handler whose filter matches it, so overlapping filters each see it.
        Raises ``ValueError`` for a filter the broker's quirks forbid (``check_topic``).
        """
        check_topic(self.quirks, topic_filter)
        self.client.message_callback_add(topic_filter, self._callback(handler))
        with self._lock:
            self._subs[topic_filter] = qos
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos=qos)

    def _callback(
        self, handler: Handler
    ) -> Callable[[paho.Client, object, paho.MQTTMessage], None]:
        """A paho message callback calling ``handler(topic, payload)``; it never raises."""

        def _cb(_client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
            # paho decodes PUBLISH payloads with struct.unpack, which always yields bytes
            payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
            try:
                handler(msg.topic, payload)
            except Exception:  # a bad message must never kill the network thread
                log.exception("%s: handler for %s failed", self.client_id, msg.topic)

        return _cb

    def subscribe_many(self, topic_filters: Sequence[str], handler: Handler, qos: int = 1) -> None:
        """``subscribe`` to many filters with one handler, in a few SUBSCRIBE packets.

        A combiner pool member subscribes to the exact update topics of the devices it
        serves each round: one packet per filter would cost a round trip each.
        """
        for f in topic_filters:
            check_topic(self.quirks, f)
        cb = self._callback(handler)
        for f in topic_filters:
            self.client.message_callback_add(f, cb)
        with self._lock:
            for f in topic_filters:
                self._subs[f] = qos
        if self.connected.is_set():
            for i in range(0, len(topic_filters), _FILTERS_PER_PACKET):
                batch = topic_filters[i : i + _FILTERS_PER_PACKET]
                self.client.subscribe([(f, qos) for f in batch])

    def unsubscribe_many(self, topic_filters: Sequence[str]) -> None:
        """``unsubscribe`` from many filters, in a few UNSUBSCRIBE packets."""
        with self._lock:
            for f in topic_filters:
                self._subs.pop(f, None)
        for f in topic_filters:
            self.client.message_callback_remove(f)
        if self.connected.is_set():
            for i in range(0, len(topic_filters), _FILTERS_PER_PACKET):
                self.client.unsubscribe(list(topic_filters[i : i + _FILTERS_PER_PACKET]))

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and forget it, so a reconnect does not renew it."""
        with self._lock:
            self._subs.pop(topic_filter, None)
        self.client.message_callback_remove(topic_filter)
        if self.connected.is_set():
            self.client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        """Queue a message and return at once; wait on the returned info if needed.

        With QoS 1 paho keeps the message and resends it after a reconnect, even one
        published while disconnected; QoS 0 messages published while disconnected are lost.
        Paho raises ``ValueError`` for a topic with wildcards or an oversized payload, and so
        does this for a topic the broker's quirks forbid (``check_topic``).
        """
        check_topic(self.quirks, topic)
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def wait_published(self, infos: Sequence[paho.MQTTMessageInfo], timeout: float) -> bool:
        """Wait until the broker acknowledged every message in ``infos``; False on timeout.

        Woken by each acknowledgement (no polling), and correct across a reconnect: paho
        resends unacknowledged QoS 1 messages and their acknowledgements wake us too.
        """
        end = time.monotonic() + timeout
        with self._acks:
            while not all(i.is_published() for i in infos):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._acks.wait(min(left, 1.0))
        return True

    def publish_stream(
        self,
        keys: Sequence[Any],
        make: Callable[[Any], tuple[str, bytes]],
        *,
        qos: int = 1,
        retain: bool = False,
        window: int | None = None,
    ) -> PublishStream:
        """Publish ``make(key)`` for each key with at most ``window`` messages unacknowledged.

        Returns at once; ``wait`` on the result for the last PUBACK. ``window`` defaults to the
        connection's in-flight limit. Pipelined QoS 1 with bounded memory: the sender holds
        at most ``window`` messages, and paho resends those in flight after a reconnect.
        ``make`` runs on the caller's thread for the first window and then on the network
        thread, one message per PUBACK: it must be quick (cut a chunk, not encode a model).
        """
        if qos != 1:
            raise ValueError("publish_stream needs QoS 1 (acknowledgements clock it)")
        stream = PublishStream(keys, make, qos, retain, window or self.max_inflight)
        if not keys:
            stream._finish()
            return stream
        with self._streams_lock:
            self._streams.add(stream)
            self._pump(stream)
        self._drain_acks()
        return stream

    def cancel_stream(self, stream: PublishStream) -> None:
        """Stop feeding ``stream`` (messages already in flight may still arrive)."""
        with self._streams_lock:
            stream.cancelled = True
            self._streams.discard(stream)
            for mid in [m for m, s in self._stream_of.items() if s is stream]:
                del self._stream_of[mid]
        stream._finish()

    def _pump(self, stream: PublishStream) -> None:
        """Publish from ``stream`` until its window is full (``_streams_lock`` held)."""
        while (
            not stream.cancelled
            and stream.error is None
            and len(stream.outstanding) < stream.window
            and stream.next < len(stream.keys)
        ):
            key = stream.keys[stream.next]
            try:
                topic, payload = stream.make(key)
                check_topic(self.quirks, topic)
                info = self.client.publish(topic, payload, qos=stream.qos, retain=stream.retain)
            except Exception as exc:  # a bad message ends the stream, reported by wait()
                stream.error = exc
                break
            stream.next += 1
            stream.sent_bytes += len(payload)
            stream.outstanding[info.mid] = key
            self._stream_of[info.mid] = stream
        if stream.error is not None or (not stream.outstanding and stream.next >= len(stream.keys)):
            self._streams.discard(stream)
            for mid in list(stream.outstanding):
                self._stream_of.pop(mid, None)
            stream._finish()

    def _drain_acks(self) -> None:
        """Match PUBACKs to streams and refill their windows; never blocks on the lock.

        Called by whoever just released the lock and by the network thread: an ack queued
        while another thread held the lock is handled by that thread right after it.
        """
        while self._acked and self._streams_lock.acquire(blocking=False):
            try:
                touched: list[PublishStream] = []
                while self._acked:
                    mid = self._acked.popleft()
                    stream = self._stream_of.pop(mid, None)
                    if stream is not None and stream.outstanding.pop(mid, None) is not None:
                        stream.acked += 1
                        touched.append(stream)
                for stream in dict.fromkeys(touched):
                    stream._progressed()
                    self._pump(stream)
            finally:
                self._streams_lock.release()

    # callbacks -------------------------------------------------------------------------
    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        _props: Properties | None = None,
    ) -> None:
        if reason_code.is_failure:
            self.last_refusal = str(reason_code)
            log.error("%s: broker refused connection: %s", self.client_id, reason_code)
            if self._loop is not None:
                self._loop.connack(self, ok=False)
            return
        self.connect_count += 1
        # paho formats a log line for every packet while on_log is set; it is needed only to
        # see why a connection fails before its CONNACK (set again on disconnect)
        client.on_log = None
        if self._loop is not None:
            self._loop.connack(self, ok=True)
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # Small control messages must not wait for Nagle + delayed ACK (~40 ms each hop).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            subs = list(self._subs.items())
        for i in range(0, len(subs), _FILTERS_PER_PACKET):
            client.subscribe(subs[i : i + _FILTERS_PER_PACKET])
        self.connected.set()
        if self.connect_count > 1:
            log.info("%s: reconnected to %s", self.client_id, self.address.url)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("%s: on_connect hook failed", self.client_id)

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: object,
        mid: int,
        _reason_code: ReasonCode,
        _props: Properties | None = None,
    ) -> None:
        if self._streams:
            self._acked.append(mid)
            self._drain_acks()
        with self._acks:
            self._acks.notify_all()

    def note_connect_failure(self, exc: BaseException) -> None:
        """A failed dial (refused, unreachable, TLS), as a shared loop reports it."""
        tls = isinstance(exc, ssl.SSLError)
        self._note_failure(f"{'TLS' if tls else 'connect'} failed: {exc}", tls)

    def _on_connect_fail(self, _client: paho.Client, _userdata: object) -> None:
        # paho calls this inside its `except OSError:` and passes no exception: take it from
        # the handler's context, so "certificate verify failed" is not reduced to a timeout.
        exc = sys.exc_info()[1]
        if exc is None:
            return
        tls = isinstance(exc, ssl.SSLError)
        self._note_failure(f"{'TLS' if tls else 'connect'} failed: {exc}", tls)

    def _on_log(self, _client: paho.Client, _userdata: object, level: int, buf: str) -> None:
        # A failure after the TLS handshake but before CONNACK (under TLS 1.3, a broker that
        # rejects the client certificate says so only then) reaches us only as paho's log.
        if (
            level == paho.MQTT_LOG_ERR
            and buf.startswith("failed to receive on socket")
            and not self.connected.is_set()
        ):
            self._note_failure(buf, "SSL" in buf)

    def _note_failure(self, reason: str, tls: bool) -> None:
        self.last_refusal = reason
        if reason != self._logged_failure:  # once per distinct reason, not every retry
            self._logged_failure = reason
            level = logging.ERROR if tls else logging.WARNING
            log.log(level, "%s: %s: %s", self.client_id, self.address.url, reason)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        _props: Properties | None = None,
    ) -> None:
        self.connected.clear()
        self.client.on_log = self._on_log
        if not self._closing:
            log.warning(
                "%s: disconnected (%s); reconnecting with backoff", self.client_id, reason_code
            )


def tls_client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """The TLS settings every edgefl client uses: verify the broker, TLS 1.2 or newer.

    Verification (chain to ``ca_file`` or the system store, and hostname) is on unless
    ``insecure``. ``cert_file`` (with ``key_file``, or a key inside the same PEM) is the
    client certificate for mutual TLS. Raises ``ValueError`` naming the setting and file
    that could not be loaded.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca_file {ca_file!r}: cannot load CA certificates ({exc})") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if key_file is not None and cert_file is None:
        raise ValueError(f"key_file {key_file!r} given without cert_file")
    if cert_file is not None:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cert_file {cert_file!r} / key_file {key_file!r}: cannot load the client "
                f"certificate and key ({exc})"
            ) from exc
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
