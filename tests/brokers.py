"""Broker helpers for the test suite: free ports and a small synchronous paho probe.

The probe speaks MQTT 3.1.1 (amqtt has no v5) with paho's VERSION2 callbacks and records
the CONNACK, SUBACK codes and every message, so tests can assert on what a broker did.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (good enough for loopback test brokers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# paho's v5 reason code for each MQTT 3.1.1 CONNACK return code
_V3_CONNACK = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
NOT_AUTHORIZED = 5


class Probe:
    """A paho client that remembers what the broker sent it."""

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:8]}"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
            clean_session=clean_session,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.connack: int | None = None  # MQTT 3.1.1 return code (0 = accepted)
        self.session_present = False
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subacks: dict[int, list[int]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # callbacks (paho's network thread) ------------------------------------------------
    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            # paho reports v3 return codes as v5 reason codes; keep the v3 number
            self.connack = 0 if not reason.is_failure else _V3_CONNACK.get(reason.value, 255)
            self.session_present = bool(flags.session_present)
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = [c.value for c in codes]
            self._cond.notify_all()

    # synchronous API ------------------------------------------------------------------
    def connect(self, timeout: float = 5.0) -> int:
        """Connect and return the CONNACK return code (0 accepted, 5 not authorized)."""
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.connack is not None, timeout):
                raise TimeoutError(f"no CONNACK from {self.host}:{self.port}")
        return self.connack  # type: ignore[return-value]

    def subscribe(self, *topics: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and return the SUBACK codes (the granted QoS, or 0x80 refused)."""
        _, mid = self.client.subscribe([(t, qos) for t in topics])
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topics}")
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def wait_messages(self, n: int, timeout: float = 5.0) -> list[paho.MQTTMessage]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def settle(seconds: float = 0.3) -> None:
    """Let a broker finish routing (amqtt acknowledges before it broadcasts)."""
    time.sleep(seconds)
