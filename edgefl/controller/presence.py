"""Who is online: devices and combiners, from retained status messages and last wills.

The region level of a status topic is not taken on trust: one broker misconfiguration (an
ACL with ``+`` in the region level) would let a device announce itself in another region,
where the controller would plan it and it would never get its task. With a device registry,
a status counts only from a registered, unrevoked device under its registered region;
without one, the first region a device is seen online in pins it for the controller's
lifetime. Everything refused is logged and counted (``ignored``, in ``snapshot``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edgefl.controller.registry import DeviceRegistry
from edgefl.protocol import MessageError, TopicError, Topics, decode

log = logging.getLogger(__name__)

IGNORED_KINDS = ("wrong_region", "unregistered", "revoked")
WARN_INTERVAL_S = 10.0  # one warning per (device, region, kind) per interval; the rest at debug
MAX_WARN_KEYS = 4096


class Presence:
    """Who is online, from retained status messages and last wills; thread-safe.

    Status callbacks run on the network thread; ``wait_for`` blocks the session loop until
    enough devices are eligible (online, in a region whose combiner is online, and, with a
    registry, registered there and not revoked: checked again at every ``eligible`` call, so
    a device revoked while online drops out at the next round).

    Cost per status is O(1): online devices are counted per region as statuses arrive, so
    ``wait_for`` re-checks a count, not the whole fleet, on each of 10,000 arriving statuses
    (that scan made bringing 10,000 devices online quadratic). The full scan runs once the
    count says enough devices may be eligible.
    """

    def __init__(
        self,
        topics: Topics,
        registry: DeviceRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.registry = registry
        self._lock = threading.Lock()
        self._devices: dict[tuple[str, str], str] = {}  # (region, device) -> state
        self._combiners: dict[str, str] = {}  # region -> state
        self._members: dict[str, dict[str, str]] = {}  # region -> pool member -> state
        self._pinned: dict[str, str] = {}  # device -> region (without a registry)
        self._dropped: set[str] = set()  # online devices left out at a check (revoked, moved)
        self._online_in: Counter[str] = Counter()  # region -> devices online there
        self.changed = threading.Condition(self._lock)
        self.refused = 0  # malformed statuses dropped (one must not mark a device offline)
        # well-formed statuses refused for who sent them, by kind (IGNORED_KINDS)
        self.ignored: Counter[str] = Counter(dict.fromkeys(IGNORED_KINDS, 0))
        self.revoked_dropped = 0  # devices online when revoked, dropped from eligibility
        self._clock = clock
        self._warned: dict[tuple[str, str, str], float] = {}
        # observer of accepted statuses: (kind "device"|"combiner", region, name, message),
        # called under the lock, so it must only note the change (the fleet recorder does)
        self.on_change: Callable[[str, str, str, dict[str, Any]], None] | None = None

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
            why = self._refusal_locked(region, device, msg["state"])
            if why is not None:
                kind, text = why
                self.ignored[kind] += 1
                self._warn(device, region, kind, f"ignoring {msg['state']} status of {text}")
                return
            if self.registry is None and msg["state"] == "online":
                self._pinned.setdefault(device, region)
            was = self._devices.get((region, device))
            if was != msg["state"]:
                self._online_in[region] += 1 if msg["state"] == "online" else 0
                self._online_in[region] -= 1 if was == "online" else 0
            self._devices[(region, device)] = msg["state"]
            self._dropped.discard(device)
            self.changed.notify_all()
            if self.on_change is not None:
                self.on_change("device", region, device, msg)

    def _refusal_locked(self, region: str, device: str, state: str) -> tuple[str, str] | None:
        """Why a status from ``device`` under ``region`` must not count, or None if it may."""
        if self.registry is None:
            pinned = self._pinned.get(device)
            if pinned is not None and pinned != region:
                return "wrong_region", (
                    f"device {device} under region {region}: it was first seen online in "
                    f"region {pinned}"
                )
            return None
        registered = self.registry.region_of(device)
        if registered is None:
            return "unregistered", f"device {device} under region {region}: not registered"
        if self.registry.is_revoked(device):
            return "revoked", f"device {device} under region {region}: revoked"
        if registered != region:
            return "wrong_region", (
                f"device {device} under region {region}: it is registered in region {registered}"
            )
        return None

    def _warn(self, device: str, region: str, kind: str, text: str) -> None:
        """WARNING once per (device, region, kind) per interval: retained floods stay quiet."""
        now = self._clock()
        key = (device, region, kind)
        last = self._warned.get(key)
        if last is not None and now - last < WARN_INTERVAL_S:
            log.debug("%s", text)
            return
        self._warned.pop(key, None)
        self._warned[key] = now
        while len(self._warned) > MAX_WARN_KEYS:
            self._warned.pop(next(iter(self._warned)))
        log.warning("%s", text)

    def on_combiner_status(self, topic: str, payload: bytes) -> None:
        """A region's only combiner's status, on ``{region}/comb/status``."""
        got = self._combiner_message(topic, payload, self.topics.parse_combiner_topic)
        if got is None:
            return
        (region, _), msg = got
        with self._lock:
            self._combiners[region] = msg["state"]
            self._changed_combiner(region, str(msg.get("combiner", "")), msg)

    def on_pool_member_status(self, topic: str, payload: bytes) -> None:
        """A combiner pool member's status: the region is served while any member is up."""
        got = self._combiner_message(topic, payload, self.topics.parse_pool_member_status)
        if got is None:
            return
        (region, member), msg = got
        with self._lock:
            members = self._members.setdefault(region, {})
            if members.get(member) != msg["state"]:
                log.info("combiner pool of %s: %s is %s", region, member, msg["state"])
            members[member] = msg["state"]
            self._changed_combiner(region, member, msg)

    def _combiner_message(
        self, topic: str, payload: bytes, parse: Callable[[str], tuple[str, str]]
    ) -> tuple[tuple[str, str], dict[str, Any]] | None:
        """The parsed topic and status message of a combiner or pool member; None (counted
        and logged) for a malformed one, and for a cleared retained status."""
        if not payload:
            return None
        try:
            where = parse(topic)
            msg = decode(payload, "status")
            _check_state(msg["state"])
        except (TopicError, MessageError) as exc:
            self.refused += 1
            log.warning("ignoring bad combiner status on %s: %s", topic, exc)
            return None
        return where, msg

    def _changed_combiner(self, region: str, name: str, msg: dict[str, Any]) -> None:
        """Under the lock: wake the session loop, tell the observer."""
        self.changed.notify_all()
        if self.on_change is not None:
            self.on_change("combiner", region, name, msg)

    def pool_members(self, region: str) -> list[str]:
        """The online members of ``region``'s combiner pool, sorted (empty: no pool there)."""
        with self._lock:
            members = self._members.get(region, {})
            return sorted(m for m, s in members.items() if s == "online")

    def member_online(self, region: str, member: str) -> bool:
        with self._lock:
            return self._members.get(region, {}).get(member) == "online"

    def _served_regions_locked(self) -> set[str]:
        """Regions with an online combiner, or at least one online pool member."""
        served = {r for r, s in self._combiners.items() if s == "online"}
        served.update(r for r, m in self._members.items() if "online" in m.values())
        return served

    def eligible(self) -> dict[str, str]:
        """Online devices in regions that have an online combiner: device -> region."""
        with self._lock:
            return self._eligible_locked()

    def wait_for(self, n: int, timeout: float) -> dict[str, str]:
        with self.changed:
            self.changed.wait_for(
                lambda: self._online_count_locked() >= n and len(self._eligible_locked()) >= n,
                timeout=timeout,
            )
            return self._eligible_locked()

    def online_count(self) -> int:
        """Online devices in regions with an online combiner, before registry checks: O(regions)."""
        with self._lock:
            return self._online_count_locked()

    def _online_count_locked(self) -> int:
        return sum(self._online_in[r] for r in self._served_regions_locked())

    def _eligible_locked(self) -> dict[str, str]:
        regions = self._served_regions_locked()
        out = {d: r for (r, d), s in self._devices.items() if s == "online" and r in regions}
        if self.registry is None:
            return out
        for dev, region in list(out.items()):
            revoked = self.registry.is_revoked(dev)
            if not revoked and self.registry.region_of(dev) == region:
                continue
            del out[dev]
            if dev not in self._dropped:  # once per device, not on every check
                self._dropped.add(dev)
                if revoked:
                    self.revoked_dropped += 1
                log.warning(
                    "device %s (online in region %s) is no longer eligible: %s",
                    dev,
                    region,
                    "revoked" if revoked else "its registered region changed",
                )
        return out

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            devices = {f"{r}/{d}": s for (r, d), s in self._devices.items()}
            return {
                "devices": devices,
                "combiners": dict(self._combiners),
                "pools": {r: dict(m) for r, m in self._members.items()},
                "refused": self.refused,
                "ignored": dict(self.ignored),
                "revoked_dropped": self.revoked_dropped,
            }

    def counters(self) -> dict[str, int]:
        """Flat counters for metrics: ``status_refused``, ``status_ignored_<kind>``, ..."""
        with self._lock:
            out = {"status_refused": self.refused, "revoked_dropped": self.revoked_dropped}
            out.update({f"status_ignored_{k}": v for k, v in self.ignored.items()})
            return out


def _check_state(state: str) -> None:
    if state not in ("online", "offline"):
        raise MessageError(f"unknown presence state {state[:32]!r}")
