"""The device agent against a real broker, with the test playing the server side by hand.

This pins the wire contract from the device's point of view (docs/protocol.md): presence with
a last will, tasks over QoS 1 persistent sessions, chunked model download, chunked update.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl.models.numpy_models import init_weights, train_epochs
from edgefl.protocol import Reassembler, Topics, decode, encode, split_payload
from edgefl.protocol.tensors import decode_tensors, dumps_tensors
from edgefl.transport import parse_broker_url

PROJECT = "agenttest"


def _local_data() -> tuple[np.ndarray, np.ndarray]:
    """A device's private data set: 150 samples of 64 features, 10 classes.

    Synthetic on purpose: these tests also run on the device Pythons with the base install
    only, where scikit-learn (and so the digits task) is not available.
    """
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 150)
    X = rng.normal(size=(150, 64)) + y[:, None] * 0.3
    return X, y


def _initial_weights() -> dict[str, np.ndarray]:
    return init_weights("softmax", 64, 10)


class ServerSide:
    """A raw paho client acting as controller + combiner."""

    def __init__(self, url: str) -> None:
        addr = parse_broker_url(url)
        self.topics = Topics(PROJECT)
        self.updates = Reassembler()
        self.completed: list[dict] = []
        self.declined: list[dict] = []
        self.statuses: list[dict] = []
        self.got = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="server-side", protocol=paho.MQTTv311
        )
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        self.client.subscribe(self.topics.device_wildcard(None, "update"), qos=1)
        self.client.subscribe(self.topics.device_wildcard(None, "status"), qos=1)
        time.sleep(0.3)

    def _on_message(self, _c, _u, msg) -> None:
        _, device, channel = self.topics.parse_device_topic(msg.topic)
        if channel == "status":
            if msg.payload:
                self.statuses.append(decode(msg.payload, "status"))
            return
        done = self.updates.feed(device, msg.payload)
        if done is None:
            return
        answer = decode(done.payload, ("update", "decline"))
        if answer["type"] == "decline":
            self.declined.append(answer)
            return
        self.completed.append(answer)
        self.got.set()

    def publish_model(self, version: str, weights: dict) -> bytes:
        blob = dumps_tensors(weights)
        for c in split_payload(blob, 1024, transfer=version):
            self.client.publish(
                self.topics.model_chunk(version, c.index), c.to_bytes(), qos=1, retain=True
            ).wait_for_publish(5)
        return hashlib.sha256(blob).digest()

    def send_task(
        self,
        region: str,
        device: str,
        version: str,
        digest: bytes,
        rnd: int,
        attempt: int = 0,
        **extra: object,
    ) -> None:
        task = encode(
            "task",
            **extra,
            task_id=f"s:{rnd}:{attempt}",
            session="s",
            round=rnd,
            model_version=version,
            model_digest=digest,
            deadline=time.time() + 60,
            train={"lr": 0.1, "batch_size": 32},
            chunk_size=2048,
        )
        self.client.publish(
            self.topics.device(region, device, "task"), task, qos=1
        ).wait_for_publish(5)

    def wait_online(self, device: str, timeout: float = 10.0) -> None:
        """Block until ``device`` announced itself, as a controller does before planning it.

        The agent announces after subscribing to its task topic, and the broker handles one
        client's packets in order: from here on a task reaches the device (a task sent
        earlier, to a fresh session with no subscription yet, could be lost).
        """
        deadline = time.time() + timeout
        while not any(
            s.get("device") == device and s["state"] == "online" for s in list(self.statuses)
        ):
            assert time.time() < deadline, f"{device} never announced itself online"
            time.sleep(0.02)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def server(broker_url):
    s = ServerSide(broker_url)
    yield s
    s.stop()


def _agent(url: str, device: str) -> DeviceAgent:
    X, y = _local_data()
    cfg = AgentConfig(
        broker_url=url,
        project=PROJECT,
        region="r1",
        device_id=device,
        seed=3,
        min_backoff_s=0.2,
        max_backoff_s=1.0,
    )
    return DeviceAgent(cfg, NumpyTrainer(X, y))


def test_task_published_while_offline_is_delivered_on_return(broker_url, server) -> None:
    device = f"off-{time.time_ns() % 10**9}"
    agent = _agent(broker_url, device).start()
    try:
        weights = _initial_weights()
        digest = server.publish_model("v-off", weights)
        # the device goes away (clean DISCONNECT keeps its persistent session on the broker)
        agent.conn.client.disconnect()
        agent.conn.client.loop_stop()
        time.sleep(0.3)
        server.send_task("r1", device, "v-off", digest, rnd=4)
        time.sleep(0.3)
        assert not server.completed
        agent.conn.client.reconnect()
        agent.conn.client.loop_start()
        assert server.got.wait(15), "the queued task never reached the returning device"
    finally:
        agent.stop()
    update = server.completed[0]
    X, y = _local_data()
    expected = train_epochs(weights, X, y, round_=4, seed=3)
    got = decode_tensors(update["tensors"])
    assert update["task_id"] == "s:4:0" and update["num_examples"] == len(y)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert update["metrics"]["train_loss"] > 0


def test_presence_online_then_last_will(broker_url, server) -> None:
    device = f"lw-{time.time_ns() % 10**9}"
    agent = _agent(broker_url, device).start()
    deadline = time.time() + 5
    while not any(s.get("device") == device and s["state"] == "online" for s in server.statuses):
        assert time.time() < deadline, server.statuses
        time.sleep(0.05)
    agent.conn.client.loop_stop()  # crash: no DISCONNECT, the broker must send the will
    agent.conn.drop()
    deadline = time.time() + 60  # keepalive 30 s * 1.5 is the worst case; a closed socket is quick
    while not any(s.get("device") == device and s["state"] == "offline" for s in server.statuses):
        assert time.time() < deadline, "no last will"
        time.sleep(0.05)


def test_model_digest_mismatch_is_refused(broker_url, server) -> None:
    device = f"dig-{time.time_ns() % 10**9}"
    agent = _agent(broker_url, device).start()
    try:
        server.publish_model("v-dig", _initial_weights())
        server.wait_online(device)
        server.send_task("r1", device, "v-dig", b"\x00" * 32, rnd=1)
        deadline = time.time() + 10
        while agent.last_error is None:
            assert time.time() < deadline, f"no error after 10 s ({agent.completed} tasks done)"
            time.sleep(0.05)
        assert "digest" in agent.last_error
        assert not server.completed
    finally:
        agent.stop()


def test_stale_and_replayed_tasks_are_dropped(broker_url, server) -> None:
    """Tasks of a session only move forward in (fence, round, attempt): an older round's task
    replayed, or a task from a controller that lost the session, is never trained."""
    device = f"fence-{time.time_ns() % 10**9}"
    agent = _agent(broker_url, device).start()
    try:
        digest = server.publish_model("v-fence", _initial_weights())
        server.wait_online(device)
        server.send_task("r1", device, "v-fence", digest, rnd=3, fence=2)
        assert server.got.wait(15), "the current task was not trained"
        server.got.clear()
        server.send_task("r1", device, "v-fence", digest, rnd=4, fence=1)  # stale controller
        server.send_task("r1", device, "v-fence", digest, rnd=2, fence=2)  # an old round
        server.send_task("r1", device, "v-fence", digest, rnd=3, attempt=0, fence=2)  # replay
        deadline = time.time() + 10
        while agent.stale_tasks < 2:
            assert time.time() < deadline, f"only {agent.stale_tasks} stale tasks dropped"
            time.sleep(0.02)
        server.send_task("r1", device, "v-fence", digest, rnd=4, fence=2)  # the next round
        assert server.got.wait(15), "the next task was not trained"
    finally:
        agent.stop()
    assert [u["task_id"] for u in server.completed] == ["s:3:0", "s:4:0"]
    assert agent.stale_tasks == 2 and agent.completed == 2


def test_a_task_for_a_model_that_never_comes_yields_to_the_next(broker_url, server) -> None:
    """A corrupted task (a model version nobody has) must not block the device until its
    deadline: the next task takes over, and the device asks for the missing model meanwhile."""
    device = f"flip-{time.time_ns() % 10**9}"
    agent = _agent(broker_url, device).start()
    requests: list[bytes] = []
    server.client.message_callback_add(
        server.topics.device("r1", device, "request"), lambda _c, _u, m: requests.append(m.payload)
    )
    server.client.subscribe(server.topics.device("r1", device, "request"), qos=1)
    try:
        digest = server.publish_model("v-real", _initial_weights())
        server.wait_online(device)
        server.send_task("r1", device, "v-gone", digest, rnd=1)
        time.sleep(agent.config.fetch_after_s + 1.0)  # long enough to ask for v-gone once
        t0 = time.time()
        server.send_task("r1", device, "v-real", digest, rnd=2)
        assert server.got.wait(15), "the device stayed blocked on the missing model"
        assert time.time() - t0 < 10
    finally:
        agent.stop()
    assert [u["task_id"] for u in server.completed] == ["s:2:0"]
    assert [d["task_id"] for d in server.declined] == ["s:1:0"]
    assert "newer task" in server.declined[0]["reason"]
    assert any(decode(p, "fetch")["version"] == "v-gone" for p in requests)
