"""Presence trusts only well-formed statuses: one corrupted status must not take a device
offline (and so fail a round's quorum). Nor does it trust the region level of a status
topic: a device counts only in its registered region, or, without a registry, in the first
region it was seen online in."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from edgefl.controller.presence import Presence
from edgefl.controller.registry import FleetRegistry
from edgefl.fleet.provision import Registry
from edgefl.protocol import Topics, encode


@pytest.mark.parametrize(
    "payload",
    [
        encode("status", state="onlinE", ts=time.time()),  # one flipped bit in the state
        encode("status", state="", ts=time.time()),
        encode("status", state="offline " * 100, ts=time.time()),
        b"\xa2\x61v\x01",  # truncated CBOR
    ],
)
def test_a_corrupted_status_changes_nothing(payload: bytes) -> None:
    topics = Topics("p")
    presence = Presence(topics)
    presence.on_combiner_status(
        topics.combiner("r0", "status"), encode("status", state="online", ts=time.time())
    )
    device = topics.device("r0", "d1", "status")
    presence.on_device_status(device, encode("status", state="online", ts=time.time()))
    assert presence.eligible() == {"d1": "r0"}
    presence.on_device_status(device, payload)
    assert presence.eligible() == {"d1": "r0"}
    assert presence.refused == 1
    presence.on_device_status(device, encode("status", state="offline", ts=time.time()))
    assert presence.eligible() == {}  # a real offline status still counts


def _online(presence: Presence, topics: Topics, region: str, device: str, state: str = "online"):
    presence.on_device_status(
        topics.device(region, device, "status"), encode("status", state=state, ts=time.time())
    )


def _combiners(presence: Presence, topics: Topics, *regions: str) -> None:
    for r in regions:
        presence.on_combiner_status(
            topics.combiner(r, "status"), encode("status", state="online", ts=time.time())
        )


def test_without_a_registry_the_first_region_seen_online_pins_a_device(caplog) -> None:
    topics = Topics("p")
    presence = Presence(topics)
    _combiners(presence, topics, "r0", "r1")
    _online(presence, topics, "r1", "d1")
    with caplog.at_level(logging.WARNING, logger="edgefl.controller.presence"):
        _online(presence, topics, "r0", "d1")  # e.g. an ACL with + in the region level
        _online(presence, topics, "r0", "d1", "offline")  # nor can it take d1 offline there
    assert presence.eligible() == {"d1": "r1"}
    assert presence.snapshot()["ignored"] == {"wrong_region": 2, "unregistered": 0, "revoked": 0}
    assert presence.counters()["status_ignored_wrong_region"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited per (device, region, kind)
    assert "d1" in warnings[0] and "region r0" in warnings[0] and "region r1" in warnings[0]
    _online(presence, topics, "r1", "d1", "offline")  # its own region still counts
    assert presence.eligible() == {}


def _fleet(path: Path, devices: dict[str, tuple[str, str]]) -> None:
    """A fleet.json as ``edgefl.fleet.provision.Registry.save`` writes it."""
    reg = Registry("p", "mqtt://127.0.0.1:1883")
    reg.devices = {d: {"region": r, "status": s, "created": "now"} for d, (r, s) in devices.items()}
    reg.save(path)


def test_with_a_registry_only_registered_unrevoked_devices_in_their_region_count(
    tmp_path: Path,
) -> None:
    _fleet(tmp_path, {"d1": ("r0", "active"), "d2": ("r1", "active"), "d3": ("r0", "revoked")})
    registry = FleetRegistry(tmp_path, check_interval_s=0)
    topics = Topics("p")
    presence = Presence(topics, registry)
    _combiners(presence, topics, "r0", "r1")
    _online(presence, topics, "r0", "d1")
    _online(presence, topics, "r0", "d2")  # registered in r1
    _online(presence, topics, "r0", "intruder")  # not registered
    _online(presence, topics, "r0", "d3")  # revoked
    assert presence.eligible() == {"d1": "r0"}
    assert presence.snapshot()["ignored"] == {"wrong_region": 1, "unregistered": 1, "revoked": 1}
    _online(presence, topics, "r1", "d2")
    assert presence.eligible() == {"d1": "r0", "d2": "r1"}
    # revoked while online: gone at the next check, without a new status
    _fleet(tmp_path, {"d1": ("r0", "revoked"), "d2": ("r1", "active"), "d3": ("r0", "revoked")})
    assert presence.eligible() == {"d2": "r1"}
    assert presence.snapshot()["revoked_dropped"] == 1
    assert registry.reloads == 2


def test_the_fleet_registry_rereads_at_most_once_per_interval(tmp_path: Path) -> None:
    _fleet(tmp_path, {"d1": ("r0", "active")})
    now = [0.0]
    registry = FleetRegistry(tmp_path / "fleet.json", clock=lambda: now[0])
    assert registry.region_of("d1") == "r0" and not registry.is_revoked("d1")
    _fleet(tmp_path, {"d1": ("r0", "revoked"), "d2": ("r1", "active")})
    now[0] = 0.5
    assert not registry.is_revoked("d1")  # checked 0.5 s ago: not yet
    now[0] = 1.6
    assert registry.is_revoked("d1") and registry.region_of("d2") == "r1"
    (tmp_path / "fleet.json").write_text("{ half a file")
    now[0] = 3.0
    assert registry.is_revoked("d1")  # an unreadable file keeps the last good copy
    with pytest.raises(ValueError):
        FleetRegistry(tmp_path)
