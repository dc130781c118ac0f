"""Faults a fleet really has: flaky links, vanished devices, bad updates, a crashed controller."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import cbor2
import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl.protocol import encode, split_payload
from edgefl.protocol.tensors import encode_tensors
from edgefl.store import make_store
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url
from tests.harness import CuttingProxy, Deployment, RogueDevice, completed_accuracies

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` leaves them out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_cut_mid_upload_resumes(deployment) -> None:
    """One device's link drops in the middle of its chunked upload; it reconnects and the
    combiner completes the transfer from the chunks it already had plus the resent ones."""
    dep = deployment
    dep.start_combiners(1)
    n = 10
    fleet = dep.start_fleet(n - 1, partition_size=n)  # devices 0..8 connect directly
    addr = parse_broker_url(dep.url)
    marker = f"{dep.project}/region-0/dev/dev-0009/update".encode()
    proxy = CuttingProxy(addr.host, addr.port, marker, cut_after=6000)
    dep.own(proxy)
    X, y = digits.device_data(n, 9)
    cfg = AgentConfig(
        broker_url=f"mqtt://127.0.0.1:{proxy.port}",
        project=dep.project,
        region="region-0",
        device_id="dev-0009",
        seed=9,
        max_chunk_size=1024,
        min_backoff_s=0.2,
        max_backoff_s=1.0,
    )
    flaky = DeviceAgent(cfg, NumpyTrainer(X, y)).start()
    dep.own(flaky)
    ctl = dep.controller()
    # MLP updates are ~20 KB: with 1 KiB chunks the cut lands mid-upload
    _, rounds = dep.run_session(
        ctl,
        rounds=3,
        min_devices=n,
        round_timeout_s=30,
        chunk_size=1024,
        train={"model": "mlp", "lr": 0.2, "batch_size": 32},
    )
    assert proxy.cuts == 1
    assert flaky.conn.connect_count >= 2, "the device never had to reconnect"
    assert [r.status for r in rounds] == ["completed"] * 3
    assert all("dev-0009" in {p["device"] for p in r.participants} for r in rounds)
    assert completed_accuracies(rounds) == pytest.approx(
        digits.reference_run(n, 3, "mlp", lr=0.2), abs=1e-9
    )
    assert fleet.completed_tasks == 3 * (n - 1)


def test_vanished_device_does_not_stall_round(deployment) -> None:
    """A selected device that never answers, or only sends line noise, holds its round only
    until the deadline; then the round completes with everyone else."""
    dep = deployment
    dep.start_combiners(2)
    dep.start_fleet(10)
    ghost = dep.own(RogueDevice(dep.url, dep.project, "region-1", "ghost", mode="silent"))

    def respond(rogue: RogueDevice, task: dict) -> None:
        for payload in _bad_update(rogue.mode, task, rogue.device):
            rogue.client.publish(rogue.topics.device(rogue.region, rogue.device, "update"), payload)

    noisy = RogueDevice(dep.url, dep.project, "region-0", "noisy", "garbage-chunk", respond)
    dep.own(noisy)
    ctl = dep.controller()
    timeout = 2.0
    _, rounds = dep.run_session(
        ctl, rounds=3, min_devices=10, round_timeout_s=timeout, close_grace_s=2.0
    )
    assert [r.status for r in rounds] == ["completed"] * 3
    for rec in rounds:
        assert {"ghost", "noisy"} <= set(rec.devices)
        assert not {"ghost", "noisy"} & {p["device"] for p in rec.participants}
        # a garbage chunk may be line noise (a resend could still succeed): so it is
        # recorded, but the round waits for the deadline rather than closing early
        assert [(r["device"], r["reason"][:9]) for r in rec.rejected] == [("noisy", "bad chunk")]
        assert rec.finished - rec.started >= timeout * 0.9
    assert len(ghost.tasks) == 3 and len(noisy.tasks) == 3
    # neither contributed anything, so the result is the 10-device reference exactly
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(10, 3), abs=1e-9)


def _bad_update(mode: str, task: dict, device: str) -> bytes | list[bytes]:
    """Build one misbehaving upload (the chunk messages to publish)."""

    def chunks_of(payload: bytes) -> list[bytes]:
        return [
            c.to_bytes() for c in split_payload(payload, 4096, meta={"task_id": task["task_id"]})
        ]

    good = {"W": np.zeros((64, 10)), "b": np.zeros(10)}
    if mode == "garbage-chunk":
        return [b"\xff\x00 definitely not cbor"]
    if mode == "garbage-update":
        return chunks_of(b"\x9f\x01\x02 truncated cbor")
    if mode == "oversized":
        return chunks_of(os.urandom(2 * 1024 * 1024))
    if mode == "wrong-shape":
        tensors = {"W": np.zeros((10, 64)), "b": np.zeros(10)}
    elif mode == "nan":
        tensors = dict(good, b=np.full(10, np.nan))
    elif mode == "wrong-dtype":
        tensors = {"W": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
    elif mode in ("missing-tensor", "corrupted"):
        tensors = {"W": good["W"]} if mode == "missing-tensor" else good
    else:
        raise ValueError(mode)
    msg = encode(
        "update",
        task_id=task["task_id"],
        device=device,
        model_version=task["model_version"],
        num_examples=50,
        metrics={},
        tensors=encode_tensors(tensors),
    )
    if mode == "corrupted":  # every chunk well formed, the whole not what the digest says
        chunks = split_payload(msg, 4096, meta={"task_id": task["task_id"]})
        last = chunks[-1]
        flipped = bytes([last.data[0] ^ 0xFF]) + last.data[1:]
        chunks[-1] = dataclasses.replace(last, data=flipped)
        return [c.to_bytes() for c in chunks]
    return chunks_of(msg)


# each hostile upload, and the words its rejection must give as the reason
REJECTION_REASONS = {
    "garbage-update": "bad update message",
    "oversized": "transfer refused: payload of",
    "wrong-shape": "tensor 'W': shape (10, 64), expected (64, 10)",
    "nan": "tensor 'b' holds NaN",
    "wrong-dtype": "dtype float32, expected float64",
    "missing-tensor": "missing ['b']",
    "corrupted": "digest mismatch",  # final: the round does not wait for a resend
}


def test_bad_updates_are_rejected_and_round_goes_on(broker_url, tmp_path) -> None:
    """Every hostile update is refused for its own reason; the round closes as soon as every
    selected device has answered, and the honest ones give exactly the reference result."""
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(2, max_update_bytes=1024 * 1024)
        dep.start_fleet(10)
        modes = list(REJECTION_REASONS)
        rogues = []
        for i, mode in enumerate(modes):

            def respond(rogue: RogueDevice, task: dict) -> None:
                for payload in _bad_update(rogue.mode, task, rogue.device):
                    rogue.client.publish(
                        rogue.topics.device(rogue.region, rogue.device, "update"), payload, qos=1
                    )

            rogue = RogueDevice(
                dep.url, dep.project, f"region-{i % 2}", f"rogue-{i}", mode, on_task=respond
            )
            rogues.append(rogue)
            dep.own(rogue)
        ctl = dep.controller()
        # no buffer_size: the round closes when all 16 selected devices have answered, so
        # every rogue's update is judged on its content, never as "late"
        timeout = 60
        _, rounds = dep.run_session(ctl, rounds=3, min_devices=10, round_timeout_s=timeout)
        assert [r.status for r in rounds] == ["completed"] * 3
        for rec in rounds:
            assert {p["device"] for p in rec.participants} == {f"dev-{k:04d}" for k in range(10)}
            got = {r["device"]: r["reason"] for r in rec.rejected}
            assert set(got) == {f"rogue-{i}" for i in range(len(modes))}
            for i, mode in enumerate(modes):
                assert REJECTION_REASONS[mode] in got[f"rogue-{i}"], (mode, got[f"rogue-{i}"])
            assert rec.metrics["rejected"] == len(modes)
            assert rec.finished - rec.started < timeout / 2, "the round waited for its deadline"
        assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(10, 3), abs=1e-9)
    finally:
        dep.close()


def test_malformed_control_messages_do_not_crash_components(deployment) -> None:
    """Junk on every control topic reaches the combiner, the devices and the controller; each
    refuses it, and a session afterwards runs exactly as it would have without it."""
    dep = deployment
    dep.start_combiners(1)
    dep.start_fleet(4)
    ctl = dep.controller()  # subscribed before the junk is sent: it must really receive it
    rogue = RogueDevice(dep.url, dep.project, "region-0", "noisy", mode="noise")
    dep.own(rogue)
    t = dep.combiners[0].topics
    junks = (
        b"",
        b"\x00\x01",
        cbor2.dumps({"v": 1, "type": "round"}),
        cbor2.dumps({"v": 99, "type": "task"}),
    )
    for topic in (
        t.combiner("region-0", "round"),
        t.device("region-0", "dev-0000", "task"),
        t.combiner("region-0", "partial"),
        t.combiner("region-0", "progress"),
    ):
        for junk in junks:
            rogue.client.publish(topic, junk, qos=1).wait_for_publish(5)
    deadline = time.time() + 20
    while ctl.inbox.refused != {"partial": len(junks), "progress": len(junks)}:
        assert time.time() < deadline, f"the controller saw only {ctl.inbox.refused}"
        time.sleep(0.02)
    # the noisy client looks like a device but never trains: buffer_size closes the round
    _, rounds = dep.run_session(ctl, rounds=2, min_devices=4, buffer_size=4, round_timeout_s=20)
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(4, 2), abs=1e-9)


def test_controller_killed_mid_session_resumes(deployment) -> None:
    """SIGKILL the controller process mid-round; a new one resumes from the stored state and
    the session ends exactly where an uninterrupted one would."""
    dep = deployment
    dep.start_combiners(2)
    dep.start_fleet(10)
    cmd = [
        sys.executable,
        "-m",
        "edgefl.cli.main",
        "controller",
        "--broker",
        dep.url,
        "--project",
        dep.project,
        "--state",
        dep.state_url,
        "--models",
        str(dep.workdir / "models"),
        "--insecure",
        "--lease-ttl",
        "2",  # the resumed controller waits out the killed one's lease: keep it short
        "--log-level",
        "warning",
    ]
    first = subprocess.Popen(
        [
            *cmd,
            *("--session-id", "crashy", "--rounds", "12"),
            *("--min-devices", "10", "--round-timeout", "30"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    store = make_store(dep.state_url)
    dep.own(store)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            rounds = store.list_rounds("crashy") if store.get_session("crashy") else []
            if any(r.round >= 5 and r.status == "running" for r in rounds):
                break
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.002)
        else:
            pytest.fail("controller never reached round 5")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    before = store.get_session("crashy")
    assert before.status == "running" and 4 <= before.current_round < 12
    second = subprocess.run(
        [*cmd, "--resume", "crashy"], cwd=ROOT, capture_output=True, timeout=120
    )
    assert second.returncode == 0, second.stderr.decode()
    after = store.get_session("crashy")
    assert after.status == "completed" and after.current_round == 12
    rounds = store.list_rounds("crashy")
    interrupted = [r for r in rounds if r.status == "failed"]
    assert interrupted and all(r.reason == "controller restarted" for r in interrupted)
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(10, 12), abs=1e-9)
    # the broker keeps only the newest versions retained, including what the crashed
    # controller had left there
    retained = _retained_model_versions(dep.url, dep.project)
    assert after.model_version in retained and len(retained) <= 2, retained


def _retained_model_versions(url: str, project: str) -> set[str]:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefl.protocol import Topics

    topics = Topics(project)
    seen: set[str] = set()
    addr = parse_broker_url(url)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"peek-{project}", protocol=paho.MQTTv311
    )
    client.on_message = lambda _c, _u, m: (
        m.payload and seen.add(topics.parse_model_chunk(m.topic)[0])
    )
    client.connect(addr.host, addr.port)
    client.loop_start()
    client.subscribe(f"{topics.base}/model/+/+", qos=1)
    time.sleep(1.0)
    client.disconnect()
    client.loop_stop()
    return seen


def test_combiner_stops_promptly_under_a_flood(tmp_path) -> None:
    """Stopping while devices flood the combiner must not deadlock on its bounded inbox.

    It runs on a broker of its own: the flood must not slow the brokers other tests share.
    """
    import threading

    from edgefl.broker.mosquitto import MosquittoProcess

    with MosquittoProcess() as mq:
        dep = Deployment(mq.url, tmp_path)
        try:
            comb = dep.start_combiners(1)[0]
            flood = RogueDevice(dep.url, dep.project, "region-0", "flood", mode="noise")
            dep.own(flood)
            junk = [c.to_bytes() for c in split_payload(os.urandom(1024 * 1024), 65536)]
            topic = flood.topics.device("region-0", "flood", "update")
            flooding = threading.Event()
            flooding.set()

            def pump() -> None:
                end = time.time() + 20
                while flooding.is_set() and time.time() < end:
                    for c in junk:
                        flood.client.publish(topic, c, qos=0)
                    time.sleep(0.02)

            pumper = threading.Thread(target=pump, daemon=True)
            pumper.start()
            time.sleep(1.0)  # the combiner's inbox fills and its network thread waits
            stopper = threading.Thread(target=comb.stop, daemon=True)
            stopper.start()
            stopper.join(20)
            flooding.clear()
            pumper.join(10)
            assert not stopper.is_alive(), "combiner.stop() hung"
        finally:
            dep.close()
