"""Presence trusts only well-formed statuses: one corrupted status must not take a device
offline (and so fail a round's quorum)."""

from __future__ import annotations

import time

import pytest

from edgefl.controller.presence import Presence
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
