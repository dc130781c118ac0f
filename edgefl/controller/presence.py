"""Who is online: devices and combiners, from retained status messages and last wills."""

from __future__ import annotations

import logging
import threading

from edgefl.protocol import MessageError, TopicError, Topics, decode

log = logging.getLogger(__name__)


class Presence:
    """Who is online, from retained status messages and last wills; thread-safe.

    Status callbacks run on the network thread; ``wait_for`` blocks the session loop until
    enough devices are eligible (online, in a region whose combiner is online).
    """

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self._devices: dict[tuple[str, str], str] = {}  # (region, device) -> state
        self._combiners: dict[str, str] = {}  # region -> state
        self.changed = threading.Condition(self._lock)
        self.refused = 0  # malformed statuses dropped (one must not mark a device offline)

    def on_device_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        try:
            region, device, _ = self.topics.parse_device_topic(topic)
            msg = decode(payload, "status")
            _check_state(msg["state"])
        except (TopicError, MessageError) as exc:
            self.refused += 1
            log.warning("ignoring bad device status on %s: %s", topic, exc)
            return
        with self._lock:
            self._devices[(region, device)] = msg["state"]
            self.changed.notify_all()

    def on_combiner_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            region, _ = self.topics.parse_combiner_topic(topic)
            msg = decode(payload, "status")
            _check_state(msg["state"])
        except (TopicError, MessageError) as exc:
            self.refused += 1
            log.warning("ignoring bad combiner status on %s: %s", topic, exc)
            return
        with self._lock:
            self._combiners[region] = msg["state"]
            self.changed.notify_all()

    def eligible(self) -> dict[str, str]:
        """Online devices in regions that have an online combiner: device -> region."""
        with self._lock:
            return self._eligible_locked()

    def wait_for(self, n: int, timeout: float) -> dict[str, str]:
        with self.changed:
            self.changed.wait_for(lambda: len(self._eligible_locked()) >= n, timeout=timeout)
            return self._eligible_locked()

    def _eligible_locked(self) -> dict[str, str]:
        regions = {r for r, s in self._combiners.items() if s == "online"}
        return {d: r for (r, d), s in self._devices.items() if s == "online" and r in regions}

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            devices = {f"{r}/{d}": s for (r, d), s in self._devices.items()}
            return {"devices": devices, "combiners": dict(self._combiners)}


def _check_state(state: str) -> None:
    if state not in ("online", "offline"):
        raise MessageError(f"unknown presence state {state[:32]!r}")
