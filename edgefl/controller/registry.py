"""The controller's view of the device registry: who is provisioned, in which region, revoked.

A status topic's region level is only as trustworthy as the broker's ACL. With a registry the
controller checks every status against the region the device was provisioned in, so one
broker misconfiguration cannot make it plan a device where the device never gets its task.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# The format ``edgefl.fleet.provision.Registry`` writes (read here without importing the
# provisioning side, which the controller does not otherwise need).
REGISTRY_FILE = "fleet.json"
REGISTRY_VERSION = 1
REVOKED = "revoked"


class DeviceRegistry(Protocol):
    """What the controller asks of a device registry; calls must be cheap and thread-safe."""

    def region_of(self, device: str) -> str | None:
        """The device's registered region, or None if it is not registered."""
        ...

    def is_revoked(self, device: str) -> bool:
        """True if the device was registered and has been revoked."""
        ...


class FleetRegistry:
    """``DIR/fleet.json`` (written by ``edgefl fleet provision``/``revoke``), kept fresh.

    The file is re-read when its mtime (or size) changes, checked at most once per
    ``check_interval_s``, so ``edgefl fleet revoke DEV`` takes effect at a running controller
    within about a second. Provisioning replaces the file atomically; should a read still
    fail, the last good copy stays in force (and the failure is logged), since forgetting
    every device would stop the session. A missing or unreadable file at construction is an
    error: the operator named it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        p = Path(path)
        self.path = p / REGISTRY_FILE if p.is_dir() else p
        self.check_interval_s = check_interval_s
        self.reloads = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._regions: dict[str, str] = {}
        self._revoked: set[str] = set()
        self._load(os.stat(self.path))

    def region_of(self, device: str) -> str | None:
        self._refresh()
        return self._regions.get(device)

    def is_revoked(self, device: str) -> bool:
        self._refresh()
        return device in self._revoked

    def _refresh(self) -> None:
        with self._lock:
            now = self._clock()
            if now - self._checked < self.check_interval_s:
                return
            self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) != self._stamp:
                    self._load(st)
            except (OSError, ValueError) as exc:
                log.error(
                    "fleet registry %s unreadable (%s); keeping the last good copy", self.path, exc
                )

    def _load(self, st: os.stat_result) -> None:
        """Parse the file; raise ValueError (naming the file) if it is not a registry."""
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != REGISTRY_VERSION:
            raise ValueError(f"{self.path}: not a version-{REGISTRY_VERSION} fleet registry")
        devices = data.get("devices")
        if not isinstance(devices, dict):
            raise ValueError(f"{self.path}: no devices map")
        regions: dict[str, str] = {}
        revoked: set[str] = set()
        for dev, rec in devices.items():
            if not isinstance(rec, dict) or not isinstance(rec.get("region"), str):
                raise ValueError(f"{self.path}: device {str(dev)[:64]!r} has no region")
            regions[str(dev)] = rec["region"]
            if rec.get("status") == REVOKED:
                revoked.add(str(dev))
        newly = revoked - self._revoked
        self._regions, self._revoked, self._stamp = regions, revoked, (st.st_mtime_ns, st.st_size)
        self.reloads += 1
        news = f" (newly revoked: {', '.join(sorted(newly)[:10])})" if self.reloads > 1 else ""
        log.info(
            "fleet registry %s loaded: %d devices, %d revoked%s",
            self.path,
            len(regions),
            len(revoked),
            news if newly else "",
        )
