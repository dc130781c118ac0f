"""A thin ``umqtt.simple`` for CPython, over paho: lets the MicroPython device run in tests.

Debian's stable release ships no MicroPython, so tests/test_firmware_micropython.py runs
firmware_examples/micropython/edgefl_device.py under CPython with this module installed as
``umqtt.simple``. It keeps umqtt.simple's API and semantics where the device depends on them:
blocking ``connect`` (raises on refusal), QoS 1 ``publish`` and ``subscribe`` that block
until acknowledged, incoming messages delivered only inside ``check_msg``/``wait_msg`` on the
caller's thread, ``OSError`` once the link is down, no automatic reconnect, no
``unsubscribe`` (umqtt.simple has none), and no outbox kept across connections.
"""

from __future__ import annotations

import queue
import sys
import threading
import types
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class MQTTException(Exception):
    """umqtt.simple's error for a refused connection."""


class MQTTClient:
    """The subset of umqtt.simple.MQTTClient the MicroPython device uses."""

    def __init__(
        self,
        client_id: str,
        server: str,
        port: int = 0,
        user: str | None = None,
        password: str | None = None,
        keepalive: int = 0,
        ssl: bool = False,
    ) -> None:
        self.client_id, self.server, self.port = client_id, server, port or 1883
        self.user, self.pswd, self.keepalive = user, password, keepalive
        self.cb: Callable[[bytes, bytes], None] | None = None
        self.lw: tuple[str, bytes, bool, int] | None = None
        self._c: paho.Client | None = None
        self._inbox: queue.Queue[tuple[bytes, bytes]] = queue.Queue()
        self._up = threading.Event()
        self._rc: Any = None

    def set_callback(self, f: Callable[[bytes, bytes], None]) -> None:
        self.cb = f

    def set_last_will(self, topic: str, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        self.lw = (topic, msg, retain, qos)

    def connect(self, clean_session: bool = True) -> int:
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        if self.user is not None:
            c.username_pw_set(self.user, self.pswd)
        if self.lw is not None:
            topic, msg, retain, qos = self.lw
            c.will_set(topic, msg, qos, retain)
        # umqtt never reconnects by itself: the device does. paho's loop would, so its retry
        # is put off for an hour, and the loop is stopped once the link is found down.
        c.reconnect_delay_set(3600, 3600)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_a: self._up.clear()
        c.on_message = lambda _c, _u, m: self._inbox.put((m.topic.encode(), m.payload))
        self._up.clear()
        self._rc = None
        try:
            c.connect(self.server, self.port, self.keepalive or 60)
        except OSError:
            raise
        except Exception as exc:  # paho's own errors look like a dead socket to umqtt
            raise OSError(str(exc)) from exc
        c.loop_start()
        self._c = c
        for _ in range(100):
            if self._up.wait(0.1) or self._rc is not None:
                break
        if not self._up.is_set():
            self._close()
            raise MQTTException(self._rc if self._rc is not None else "no CONNACK")
        return 0

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self._rc = rc
        if not rc.is_failure:
            self._up.set()

    def _close(self) -> None:
        if self._c is not None:
            self._c.loop_stop()
            self._c = None

    def _live(self) -> paho.Client:
        if self._c is None or not self._up.is_set():
            self._close()
            raise OSError(-1, "not connected")
        return self._c

    def disconnect(self) -> None:
        c = self._live()
        c.disconnect()
        self._close()

    def ping(self) -> None:
        self._live()

    def publish(self, topic: str, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        info = self._live().publish(topic, msg, qos, retain)
        if qos == 0:
            return
        while not info.is_published():  # umqtt.simple waits for the PUBACK
            info.wait_for_publish(0.1)
            self._live()

    def subscribe(self, topic: str, qos: int = 0) -> None:
        done = threading.Event()
        c = self._live()
        c.on_subscribe = lambda *_a: done.set()
        c.subscribe(topic, qos)
        while not done.wait(0.1):
            self._live()

    def wait_msg(self) -> int | None:
        while True:
            try:
                topic, payload = self._inbox.get(timeout=0.1)
                break
            except queue.Empty:
                self._live()
        if self.cb is not None:
            self.cb(topic, payload)
        return None

    def check_msg(self) -> int | None:
        self._live()
        try:
            topic, payload = self._inbox.get_nowait()
        except queue.Empty:
            return None
        if self.cb is not None:
            self.cb(topic, payload)
        return None


def install() -> None:
    """Make ``from umqtt.simple import MQTTClient`` resolve to this shim."""
    pkg = types.ModuleType("umqtt")
    simple = types.ModuleType("umqtt.simple")
    simple.MQTTClient = MQTTClient  # type: ignore[attr-defined]
    simple.MQTTException = MQTTException  # type: ignore[attr-defined]
    pkg.simple = simple  # type: ignore[attr-defined]
    sys.modules["umqtt"] = pkg
    sys.modules["umqtt.simple"] = simple
