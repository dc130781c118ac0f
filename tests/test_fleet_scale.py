"""Large simulated fleets: many real protocol devices sharing a few threads.

Each simulated device keeps its own MQTT connection (client id, persistent session, will,
subscriptions, QoS 1 uploads); only threads are shared (``edgefl.transport.multiplex``). Run
on Mosquitto: the embedded amqtt broker is not meant for thousands of connections.
Learning is checked exactly: with the canonical partition generalised to N, FedAvg over the
devices that hold data must equal the single-process reference, round by round.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.controller.presence import Presence
from edgefl.deploy import region_names
from edgefl.fleet.simulate import start_fleet
from edgefl.protocol import Topics
from edgefl.tasks import digits
from edgefl.transport import MqttConnection
from edgefl.transport.multiplex import SharedLoop
from tests.harness import Deployment, completed_accuracies


def _session(mosquitto, tmp_path, n: int, rounds: int) -> tuple[list, list, int]:
    """Run ``rounds`` of digits on n shared-mode devices; (round records, reference, threads)."""
    dep = Deployment(mosquitto.url, tmp_path)
    try:
        dep.start_combiners(2)
        # before the fleet: paho's own network thread uses select(), which cannot watch a
        # file descriptor above 1023, and a 1,000-device fleet takes the low ones
        ctl = dep.controller()
        fleet = dep.start_fleet(n)
        assert fleet.shared  # large fleets share threads by default
        threads = threading.active_count()
        _, recs = dep.run_session(
            ctl, rounds=rounds, min_devices=digits.devices_with_data(n), round_timeout_s=60
        )
        return recs, digits.reference_run(n, rounds), threads
    finally:
        dep.close()


def test_300_devices_with_empty_ones_train_to_the_reference(mosquitto, tmp_path) -> None:
    """The issue's crash: 300 devices, 5 of them without data, now a normal session."""
    recs, reference, threads = _session(mosquitto, tmp_path, 300, 3)
    assert completed_accuracies(recs) == pytest.approx(reference, abs=1e-9)
    for rec in recs:
        assert len(rec.participants) == 295
        assert len(rec.rejected) == 5
        assert all(r["reason"] == "device declined: no local data" for r in rec.rejected)
    assert threads < 150  # not 2 threads per device


@pytest.mark.slow
def test_1000_devices_per_round(mosquitto, tmp_path) -> None:
    """1,000 devices a round (231 of them empty) in one process, within seconds a round."""
    recs, reference, threads = _session(mosquitto, tmp_path, 1000, 3)
    assert completed_accuracies(recs) == pytest.approx(reference, abs=1e-9)
    for rec in recs:
        assert len(rec.devices) == 1000
        assert len(rec.participants) == 769 and len(rec.rejected) == 231
        # issue 10's target is 3 s on a quiet 2-core machine; CI machines get headroom
        assert (rec.finished or 0) - rec.started < 15
    assert threads < 150


def test_1500_connections_past_select_limit_and_their_wills(mosquitto) -> None:
    """More sockets than select() can take (fd 1024), presence sees them all, and when the
    simulator dies without a goodbye the broker's wills take every device offline."""
    project = "scale-wills"
    topics = Topics(project)
    presence = Presence(topics)
    watcher = MqttConnection(mosquitto.url, "watcher-scale", clean_session=True)
    watcher.subscribe(topics.device_wildcard(None, "status"), presence.on_device_status)
    watcher.subscribe(topics.combiner_wildcard("status"), presence.on_combiner_status)
    watcher.start()
    n = 1500
    fleet = start_fleet(mosquitto.url, n, region_names(1), project=project, shared=True)
    try:
        assert fleet.online() == n
        deadline = time.monotonic() + 30
        while len(_online(presence)) < n:
            assert time.monotonic() < deadline, f"presence saw {len(_online(presence))} of {n}"
            time.sleep(0.05)
        for loop in fleet.loops:  # a crash: sockets closed, no DISCONNECT, no offline status
            loop.stop()
        deadline = time.monotonic() + 30
        while _online(presence):
            assert time.monotonic() < deadline, f"{len(_online(presence))} devices still online"
            time.sleep(0.05)
    finally:
        if fleet.executor is not None:
            fleet.executor.shutdown(wait=False)
        fleet.loops.clear()
        fleet.executor = None
        fleet.agents.clear()
        watcher.stop()


def _online(presence: Presence) -> list[str]:
    devices = presence.snapshot()["devices"]
    assert isinstance(devices, dict)
    return [d for d, s in devices.items() if s == "online"]


def test_shared_connection_reconnects_and_keeps_its_session(mosquitto) -> None:
    """Kicked off by a client taking its id, a shared-loop connection comes back (backoff),
    and a QoS 1 message published while it was away reaches it: the broker kept its
    persistent session (the thief, too, connected with clean_session False)."""
    loop = SharedLoop("test-loop").start()
    got: list[bytes] = []
    conn = MqttConnection(
        mosquitto.url, "shared-reconnect", loop=loop, min_backoff_s=0.5, max_backoff_s=1.0
    )
    conn.subscribe("scale/reconnect/t", lambda _t, p: got.append(p))
    try:
        conn.start(timeout=10)
        assert conn.connect_count == 1
        # another client takes the id: the broker drops ours; publish while it is away
        thief = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="shared-reconnect", clean_session=False
        )
        thief.connect(mosquitto.host, mosquitto.port)
        thief.loop_start()
        deadline = time.monotonic() + 10
        while conn.connected.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        thief.disconnect()
        thief.loop_stop()
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="shared-reconnect-pub")
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        pub.publish("scale/reconnect/t", b"while away", qos=1).wait_for_publish(5)
        assert conn.connected.wait(10), conn.last_refusal
        assert conn.connect_count >= 2
        pub.publish("scale/reconnect/t", b"after", qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        deadline = time.monotonic() + 10
        while b"after" not in got or b"while away" not in got:
            assert time.monotonic() < deadline, got
            time.sleep(0.01)
        assert got.count(b"after") == 1
        # an upload's acknowledgements wake wait_published
        infos = [conn.publish("scale/reconnect/u", bytes(100), qos=1) for _ in range(50)]
        assert conn.wait_published(infos, 10)
    finally:
        conn.stop()
        loop.stop()
