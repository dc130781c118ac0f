"""Many MQTT connections on one network thread: the simulated fleet's transport.

A ``MqttConnection`` normally owns paho's network thread, which is right for one device on a
Pi and wrong for 10,000 simulated ones (10,000 threads, and paho's ``select()`` fails past
file descriptor 1023). Given a ``SharedLoop``, a connection hands its paho client to that
loop instead: one thread waits on every socket with epoll (``selectors``) and calls paho's
``loop_read``, ``loop_write`` and ``loop_misc``, the external-loop API paho documents. Each
connection is still a full MQTT client of its own: its client id, credentials, persistent
session, last will, subscriptions and QoS 1 state, so a simulated device speaks exactly the
protocol a real one does.

What the loop adds over paho's own thread:
- **Paced connects.** At most ``max_connecting`` connections wait for their CONNACK at once, so
  a fleet of 10,000 never overflows the broker's listen backlog (Mosquitto's is 100): a dropped
  SYN would cost a second of TCP retransmission timeout each.
- **Reconnects with backoff** between the connection's ``min_backoff_s`` and ``max_backoff_s``.
- **Keepalive** for every connection, from one timer.

The TCP connect itself is paho's (blocking, ``connect_timeout``): on a LAN or loopback it takes
well under a millisecond, but a far broker stalls the loop for a round trip per connect.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefl.transport.mqtt import MqttConnection

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0  # keepalive checks (paho's loop_misc) for every connection
CONNACK_TIMEOUT_S = 30.0  # a dialled connection with no CONNACK by then is dropped and retried


class _Slot:
    """The loop's bookkeeping for one attached connection."""

    __slots__ = ("backoff", "conn", "dialled_at", "fd", "write_watched")

    def __init__(self, conn: MqttConnection) -> None:
        self.conn = conn
        self.fd = -1
        self.write_watched = False
        self.dialled_at: float | None = None
        self.backoff = conn.min_backoff_s


class SharedLoop:
    """One thread driving many paho clients (see the module docstring).

    ``start`` it before attaching connections (``MqttConnection(..., loop=loop).start()``);
    ``stop`` it after their ``stop``. Thread-safe: connections may be started, stopped and
    used from any thread; everything touching sockets runs on the loop's thread.
    """

    def __init__(self, name: str = "mqtt-shared-loop", max_connecting: int = 64) -> None:
        self.name = name
        self.max_connecting = max_connecting
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._woken = False
        self._calls: deque[Callable[[], None]] = deque()
        self._flush: deque[_Slot] = deque()  # clients with packets queued by other threads
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._slots: dict[int, _Slot] = {}  # id(conn) -> slot
        self._dial_queue: deque[_Slot] = deque()
        self._dialling: set[_Slot] = set()
        self._thread: threading.Thread | None = None
        self._running = False
        self.dials = 0  # TCP connects made (first connects and reconnects)
        self.connected = 0  # connections with a session up right now

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> SharedLoop:
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; connections still attached are closed without DISCONNECT."""
        self._running = False
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        for slot in list(self._slots.values()):
            with contextlib.suppress(Exception):
                sock = slot.conn.client.socket()
                if sock is not None:
                    sock.close()
        self._slots.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def size(self) -> int:
        """Connections attached (connected or trying to)."""
        return len(self._slots)

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread (now, if called from it)."""
        if self.in_loop():
            fn()
            return
        self._calls.append(fn)
        self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), fn))

    # attach / detach (MqttConnection calls these) --------------------------------------
    def attach(self, conn: MqttConnection) -> None:
        """Take over ``conn``'s paho client and dial it (paced)."""
        slot = _Slot(conn)
        client = conn.client
        client.on_socket_open = lambda _c, _u, sock: self._opened(slot, sock)
        client.on_socket_close = lambda _c, _u, sock: self._closed(slot, sock)
        client.on_socket_register_write = lambda _c, _u, _s: self._want_write(slot)
        client.on_socket_unregister_write = lambda _c, _u, _s: self._wrote(slot)

        def add() -> None:
            self._slots[id(conn)] = slot
            self._dial_queue.append(slot)

        self.call(add)

    def detach(self, conn: MqttConnection, timeout: float = 5.0) -> None:
        """Flush what ``conn`` queued (its DISCONNECT), close its socket and forget it."""
        done = threading.Event()

        def remove() -> None:
            slot = self._slots.pop(id(conn), None)
            if slot is not None:
                self._dialling.discard(slot)
                with contextlib.suppress(ValueError):
                    self._dial_queue.remove(slot)
                client = conn.client
                if client.socket() is not None:
                    with contextlib.suppress(Exception):
                        client.loop_write()  # the DISCONNECT: paho closes the socket after it
                if client.socket() is not None:  # nothing left to say: close without DISCONNECT
                    client._sock_close()
                self._unwatch(slot)
            done.set()

        if self._running:
            self.call(remove)
            done.wait(timeout)

    def connack(self, conn: MqttConnection, ok: bool) -> None:
        """Called on the loop's thread when ``conn`` got its CONNACK."""
        slot = self._slots.get(id(conn))
        if slot is None:
            return
        self._dialling.discard(slot)
        slot.dialled_at = None
        if ok:
            slot.backoff = conn.min_backoff_s
            self.connected += 1

    # paho's socket callbacks (any thread) -------------------------------------------------
    def _opened(self, slot: _Slot, sock: Any) -> None:
        fd = sock.fileno()
        stale = self._sel.get_map().get(fd)
        if stale is not None:  # the fd of a socket closed behind our back, now reused
            self._sel.unregister(fd)
        slot.fd = fd
        slot.write_watched = False
        self._sel.register(fd, selectors.EVENT_READ, slot)

    def _closed(self, slot: _Slot, _sock: Any) -> None:
        was_up = slot.conn.connected.is_set()
        self.call(lambda: self._after_close(slot, was_up))

    def _after_close(self, slot: _Slot, was_up: bool) -> None:
        self._unwatch(slot)
        self._dialling.discard(slot)
        slot.dialled_at = None
        if was_up:
            self.connected = max(0, self.connected - 1)
        if self._slots.get(id(slot.conn)) is slot and not slot.conn.closing:
            self._retry_later(slot)

    def _want_write(self, slot: _Slot) -> None:
        if self.in_loop():
            self._flush.append(slot)
        else:
            self._flush.append(slot)
            self._wake()

    def _wrote(self, slot: _Slot) -> None:
        def unwatch_write() -> None:
            if slot.write_watched and slot.fd >= 0:
                slot.write_watched = False
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.modify(slot.fd, selectors.EVENT_READ, slot)
            # paho clears its "registered" flag after its own want_write() check: a packet
            # queued by another thread in between would otherwise wait for the next one
            if slot.conn.client.want_write():
                self._flush.append(slot)

        self.call(unwatch_write)

    def _unwatch(self, slot: _Slot) -> None:
        if slot.fd < 0:
            return
        key = self._sel.get_map().get(slot.fd)
        if key is not None and key.data is slot:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(slot.fd)
        slot.fd = -1
        slot.write_watched = False

    # the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL_S
        while self._running:
            now = time.monotonic()
            timeout = next_misc - now
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - now)
            if self._calls or self._flush or self._can_dial():
                timeout = 0
            try:
                events = self._sel.select(max(0.0, timeout))
            except OSError:  # an fd closed under us (a test's drop()); the map recovers
                log.debug("select failed", exc_info=True)
                events = []
            for key, mask in events:
                slot = key.data
                if slot is None:
                    self._woken = False
                    with contextlib.suppress(BlockingIOError, OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                self._service(slot, mask)
            self._run_calls()
            self._run_flush()
            self._run_timers()
            self._dial_some()
            if time.monotonic() >= next_misc:
                self._misc()
                next_misc = time.monotonic() + MISC_INTERVAL_S

    def _service(self, slot: _Slot, mask: int) -> None:
        client = slot.conn.client
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        except Exception:  # one client's failure must not stop the fleet's loop
            log.exception("%s: network processing failed", slot.conn.client_id)

    def _run_calls(self) -> None:
        for _ in range(len(self._calls)):
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("shared loop call failed")

    def _run_flush(self) -> None:
        for _ in range(len(self._flush)):
            slot = self._flush.popleft()
            client = slot.conn.client
            if client.socket() is None or not client.want_write():
                continue
            try:
                client.loop_write()
            except Exception:
                log.exception("%s: write failed", slot.conn.client_id)
                continue
            if client.want_write() and not slot.write_watched and slot.fd >= 0:
                # the socket buffer is full: wait until it drains
                slot.write_watched = True
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.modify(slot.fd, selectors.EVENT_READ | selectors.EVENT_WRITE, slot)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                log.exception("shared loop timer failed")

    def _can_dial(self) -> bool:
        return bool(self._dial_queue) and len(self._dialling) < self.max_connecting

    def _dial_some(self) -> None:
        while self._can_dial():
            slot = self._dial_queue.popleft()
            if self._slots.get(id(slot.conn)) is not slot or slot.conn.closing:
                continue
            self._dial(slot)

    def _dial(self, slot: _Slot) -> None:
        conn = slot.conn
        self.dials += 1
        try:
            conn.client.reconnect()
        except Exception as exc:  # refused, unreachable, TLS: try again later
            conn.note_connect_failure(exc)
            self._retry_later(slot)
            return
        slot.dialled_at = time.monotonic()
        self._dialling.add(slot)
        self._flush.append(slot)  # the CONNECT packet

    def _retry_later(self, slot: _Slot) -> None:
        delay = slot.backoff
        slot.backoff = min(slot.conn.max_backoff_s, max(slot.backoff * 2, 0.01))

        def requeue() -> None:
            if self._slots.get(id(slot.conn)) is slot and not slot.conn.closing:
                self._dial_queue.append(slot)

        self._at(time.monotonic() + delay, requeue)

    def _misc(self) -> None:
        """Keepalive pings for everyone; drop dials that never got a CONNACK."""
        now = time.monotonic()
        for slot in list(self._slots.values()):
            client = slot.conn.client
            if client.socket() is None:
                continue
            if slot.dialled_at is not None and now - slot.dialled_at > CONNACK_TIMEOUT_S:
                log.warning(
                    "%s: no CONNACK in %.0f s; redialling", slot.conn.client_id, CONNACK_TIMEOUT_S
                )
                client._sock_close()  # paho's own close: our close hook schedules the retry
                continue
            try:
                client.loop_misc()
            except Exception:
                log.exception("%s: keepalive failed", slot.conn.client_id)
