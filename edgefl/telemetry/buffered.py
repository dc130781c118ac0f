"""Batching, retrying, bounded buffering: what every network sink needs, in one place.

``write`` only appends to an in-memory buffer and returns: a background thread sends batches
(when ``batch_size`` points are waiting, or every ``flush_interval_s``) and retries failed
sends with capped exponential backoff, so a database outage costs no points until the buffer
holds ``max_buffer`` of them. Past that bound the oldest points are dropped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgefl.telemetry.base import Point

log = logging.getLogger(__name__)


class WriteRejected(Exception):
    """The backend refused the batch itself (bad data): retrying would fail the same way."""


class BufferedSink:
    """Base of the network sinks: subclasses implement ``_send(points)``.

    ``_send`` raises ``WriteRejected`` when the backend refuses the data (those points are
    counted in ``rejected`` and not retried) and any other exception for a failure worth
    retrying (connection refused, timeout, 5xx). Counters, under one lock:

    - ``written``: points handed to ``write``;
    - ``sent``: points the backend acknowledged;
    - ``dropped``: points discarded because the buffer was full (or left unsent at ``close``);
    - ``rejected``: points the backend refused;
    - ``failures``: failed send attempts (each retried later).

    At any moment ``written == sent + dropped + rejected + pending``.
    """

    def __init__(
        self,
        *,
        batch_size: int = 1000,
        flush_interval_s: float = 1.0,
        max_buffer: int = 100_000,
        retry_min_s: float = 0.2,
        retry_max_s: float = 10.0,
        close_timeout_s: float = 10.0,
        name: str = "telemetry",
    ) -> None:
        if max_buffer < 1 or batch_size < 1:
            raise ValueError("max_buffer and batch_size must be at least 1")
        self.batch_size = min(batch_size, max_buffer)
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.close_timeout_s = close_timeout_s
        self.name = name
        self.written = self.sent = self.dropped = self.rejected = self.failures = 0
        self.last_error = ""
        self._buf: deque[Point] = deque()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._flush_now = False
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-flusher", daemon=True)
        self._thread.start()

    # the caller's side: never blocks on the backend ------------------------------------
    def write(self, points: list[Point]) -> None:
        """Queue ``points``; drop (and count) the oldest queued ones past ``max_buffer``."""
        if not points:
            return
        with self._cond:
            self.written += len(points)
            if self._closed:
                self.dropped += len(points)
                return
            self._buf.extend(points)
            over = len(self._buf) + self._in_flight - self.max_buffer
            if over > 0:
                for _ in range(min(over, len(self._buf))):
                    self._buf.popleft()
                self.dropped += over
                log.warning(
                    "%s: buffer full (%d points): dropped %d (%d so far)",
                    self.name, self.max_buffer, over, self.dropped,
                )
            if len(self._buf) >= self.batch_size:
                self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Points not yet acknowledged: queued plus the batch being sent."""
        with self._cond:
            return len(self._buf) + self._in_flight

    def stats(self) -> dict[str, Any]:
        """The counters, for logs, tests and health endpoints."""
        with self._cond:
            return {
                "written": self.written,
                "sent": self.sent,
                "dropped": self.dropped,
                "rejected": self.rejected,
                "failures": self.failures,
                "pending": len(self._buf) + self._in_flight,
                "last_error": self.last_error,
            }

    def flush(self, timeout: float = 10.0) -> bool:
        """Ask for an immediate send and wait until nothing is pending; False on timeout."""
        with self._cond:
            self._flush_now = True
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: not self._buf and not self._in_flight, timeout=timeout
            )

    def close(self) -> None:
        """Send what is pending (for up to ``close_timeout_s``), then stop the flusher.

        Points still unsent then are counted in ``dropped`` and logged.
        """
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.close_timeout_s + 5.0)
        with self._cond:
            self._closed = True
            left = len(self._buf) + self._in_flight
            if left:
                self.dropped += left
                self._buf.clear()
                self._in_flight = 0
                log.error("%s: closed with %d points unsent (dropped)", self.name, left)
            self._cond.notify_all()
        self._close_backend()

    # the flusher thread ----------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        next_flush = time.monotonic() + self.flush_interval_s
        give_up_at: float | None = None
        while True:
            with self._cond:
                while not self._closing and not self._flush_now and (
                    len(self._buf) < self.batch_size and time.monotonic() < next_flush
                ):
                    self._cond.wait(max(0.0, next_flush - time.monotonic()))
                if self._closing and give_up_at is None:
                    give_up_at = time.monotonic() + self.close_timeout_s
                if not self._buf:
                    self._flush_now = False
                    next_flush = time.monotonic() + self.flush_interval_s
                    self._cond.notify_all()
                    if self._closing:
                        return
                    continue
                batch = [self._buf.popleft() for _ in range(min(self.batch_size, len(self._buf)))]
                self._in_flight = len(batch)
            ok = self._attempt(batch)
            with self._cond:
                self._in_flight = 0
                if not ok:
                    self._buf.extendleft(reversed(batch))  # oldest first, as before
                self._cond.notify_all()
            if ok:
                backoff = 0.0
                continue
            if give_up_at is not None and time.monotonic() >= give_up_at:
                return  # close() counts what is left
            backoff = min(self.retry_max_s, max(self.retry_min_s, backoff * 2))
            wait = backoff if give_up_at is None else min(backoff, give_up_at - time.monotonic())
            with self._cond:
                # a close() wakes this wait; new points and flush() do not shorten the backoff
                self._cond.wait_for(self._closing_started(give_up_at), max(0.0, wait))

    def _closing_started(self, give_up_at: float | None) -> Callable[[], bool]:
        """Wake a backoff wait when close() is called during it (not when already closing)."""
        return lambda: self._closing and give_up_at is None

    def _attempt(self, batch: list[Point]) -> bool:
        """Send one batch; True when it is settled (acknowledged or refused for good)."""
        try:
            self._send(batch)
        except WriteRejected as exc:
            with self._cond:
                self.rejected += len(batch)
                self.last_error = str(exc)
            log.error("%s: backend refused %d points: %s", self.name, len(batch), exc)
            return True
        except Exception as exc:
            with self._cond:
                self.failures += 1
                first = self.failures == 1 or self.last_error != str(exc)
                self.last_error = str(exc)
            (log.warning if first else log.debug)(
                "%s: write of %d points failed (kept, retrying): %s", self.name, len(batch), exc
            )
            return False
        with self._cond:
            self.sent += len(batch)
        return True

    # for subclasses --------------------------------------------------------------------
    def _send(self, points: list[Point]) -> None:
        raise NotImplementedError

    def _close_backend(self) -> None:
        """Release connections; called once, after the flusher stopped."""
