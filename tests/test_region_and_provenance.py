"""Identity over live sessions on real brokers: regions, the fleet registry, update provenance.

The brokers here are anonymous, so a raw client can publish anything anywhere, as one broker
misconfiguration (an ACL with ``+`` in the region level) would allow: the controller and the
combiners themselves must refuse what does not add up, count it, and finish the session on
the FedAvg of exactly the devices that really trained.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.controller import SessionConfig
from edgefl.controller.registry import FleetRegistry
from edgefl.fleet.provision import provision, revoke
from edgefl.fleet.simulate import device_name
from edgefl.models.numpy_models import train_epochs
from edgefl.protocol import Topics, decode, encode
from edgefl.protocol.chunking import parse_chunk, split_payload
from edgefl.protocol.tensors import encode_tensors
from edgefl.store.base import RoundRecord
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url
from tests.harness import RogueDevice, completed_accuracies

N = 6  # devices dev-0000..dev-0005; dev-k lives in region-(k % 2)
TRAIN = {"lr": 0.1, "batch_size": 32}


def raw_client(url: str) -> paho.Client:
    """An anonymous MQTT client: the broker lets it publish on any topic."""
    addr = parse_broker_url(url)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv311
    )
    client.connect(addr.host, addr.port)
    client.loop_start()
    return client


def publish(client: paho.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


def status(state: str = "online") -> bytes:
    return encode("status", state=state, ts=time.time())


def wait_until(what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def run(dep, ctl, on_round=None, **cfg) -> list[RoundRecord]:
    config = SessionConfig(train=TRAIN, **cfg)
    ctl.create_session(config, digits.initial_weights())
    sess = ctl.run(config.session_id, on_round=on_round)
    assert sess.status == "completed"
    return ctl.store.list_rounds(config.session_id)


def replayed_accuracies(rounds: list[RoundRecord], partition: int) -> list[float]:
    """The digits FedAvg loop over each round's recorded participants: what learning must give.

    Fails if a participant is not a simulated device or claims another's example count.
    """
    d = digits.load()
    parts = digits.partition(d.ytr, partition)
    index = {device_name(k): k for k in range(partition)}
    w = digits.initial_weights()
    out = []
    for rec in rounds:
        ks = sorted(index[p["device"]] for p in rec.participants)
        for p in rec.participants:
            assert p["n"] == len(parts[index[p["device"]]]), (rec.round, p)
        new = [
            train_epochs(w, d.Xtr[parts[k]], d.ytr[parts[k]], round_=rec.round, seed=k, **TRAIN)
            for k in ks
        ]
        sizes = [float(len(parts[k])) for k in ks]
        w = {n: sum(s * u[n] for s, u in zip(sizes, new, strict=True)) / sum(sizes) for n in w}
        out.append(digits.evaluator(w)["accuracy"])
    return out


def devices_of(rec: RoundRecord) -> list[str]:
    return sorted(p["device"] for p in rec.participants)


def test_a_status_under_another_region_is_ignored_and_counted(deployment, caplog) -> None:
    """dev-0001 (region-1) is announced online in region-0 mid-session: without the check the
    controller plans it there, it never gets its task, and every later round misses quorum."""
    deployment.start_combiners(2)
    deployment.start_fleet(N)
    ctl = deployment.controller()
    topics = Topics(deployment.project)
    rogue = raw_client(deployment.url)
    forged = topics.device("region-0", "dev-0001", "status")

    def after(rec: RoundRecord, _sess: object) -> None:
        if rec.round == 1:
            publish(rogue, forged, status(), retain=True)
            wait_until("the status to be ignored", lambda: ctl.presence.ignored["wrong_region"])

    try:
        with caplog.at_level(logging.WARNING, logger="edgefl.controller.presence"):
            rounds = run(
                deployment, ctl, after, rounds=3, min_devices=N, round_timeout_s=20, max_attempts=1
            )
    finally:
        publish(rogue, forged, b"", retain=True)
        rogue.disconnect()
        rogue.loop_stop()
    assert [r.status for r in rounds] == ["completed"] * 3  # no attempt failed
    assert all(devices_of(r) == [device_name(k) for k in range(N)] for r in rounds)
    assert {p["region"] for p in rounds[1].participants if p["device"] == "dev-0001"} == {
        "region-1"
    }
    assert ctl.presence.snapshot()["ignored"]["wrong_region"] >= 1
    assert rounds[1].metrics["status_ignored_wrong_region"] >= 1
    assert "status_ignored_wrong_region" not in rounds[0].metrics
    warned = [r.getMessage() for r in caplog.records if "dev-0001" in r.getMessage()]
    assert any("region region-0" in m and "region region-1" in m for m in warned), warned
    accs = completed_accuracies(rounds)
    assert accs == pytest.approx(digits.reference_run(N, 3), abs=1e-9)
    assert accs[-1] > 0.85


def test_the_fleet_registry_refuses_strangers_and_revocation_applies_live(
    deployment, tmp_path: Path
) -> None:
    """Registered: dev-0000..dev-0005. An unregistered device online in region-0 is never
    planned; dev-0005, revoked after round 2 by rewriting fleet.json, is in no later round,
    and its fresh status is refused, all without restarting the controller."""
    fleet_dir = tmp_path / "fleet"
    csv = tmp_path / "devices.csv"
    csv.write_text(
        "device_id,region\n" + "".join(f"{device_name(k)},region-{k % 2}\n" for k in range(N))
    )
    provision(csv, deployment.project, fleet_dir)
    registry = FleetRegistry(fleet_dir)
    deployment.start_combiners(2)
    deployment.start_fleet(N)
    stranger = RogueDevice(deployment.url, deployment.project, "region-0", "dev-0099", "silent")
    ctl = deployment.controller(registry=registry)
    wait_until("the stranger to be refused", lambda: ctl.presence.ignored["unregistered"] >= 1)
    rogue = raw_client(deployment.url)
    revoked_status = Topics(deployment.project).device("region-1", "dev-0005", "status")
    wait_until("the fleet online", lambda: len(ctl.presence.eligible()) == N)

    def after(rec: RoundRecord, _sess: object) -> None:
        if rec.round == 2:
            revoke(fleet_dir, "dev-0005")  # what `edgefl fleet revoke` does
            wait_until("the registry to reload", lambda: registry.is_revoked("dev-0005"), 3)
            publish(rogue, revoked_status, status(), retain=True)
            wait_until("the revoked status", lambda: ctl.presence.ignored["revoked"] >= 1)

    try:
        rounds = run(deployment, ctl, after, rounds=4, min_devices=N - 1, round_timeout_s=20)
    finally:
        publish(rogue, revoked_status, b"", retain=True)
        rogue.disconnect()
        rogue.loop_stop()
        stranger.stop()
    assert [r.status for r in rounds] == ["completed"] * 4
    everyone = [device_name(k) for k in range(N)]
    assert [sorted(r.devices) for r in rounds] == [everyone] * 2 + [everyone[:-1]] * 2
    assert [devices_of(r) for r in rounds] == [everyone] * 2 + [everyone[:-1]] * 2
    assert stranger.tasks == []  # never planned
    snap = ctl.presence.snapshot()
    assert snap["revoked_dropped"] == 1 and snap["ignored"]["revoked"] >= 1
    assert rounds[2].metrics["revoked_dropped"] == 1
    accs = completed_accuracies(rounds)
    assert accs == pytest.approx(replayed_accuracies(rounds, N), abs=1e-9)
    assert accs[:2] == pytest.approx(digits.reference_run(N, 2), abs=1e-9)
    assert accs[-1] > 0.85


class UpdateTap:
    """A raw subscriber that records a device's update chunks and the region's round plans,
    and calls ``on_plan(plan)`` from a thread of its own (publishing inside a paho callback
    would stall its network loop)."""

    def __init__(self, url: str, project: str, region: str, device: str, on_plan) -> None:
        self.topics = Topics(project)
        self.update_topic = self.topics.device(region, device, "update")
        self.chunks: dict[str, list[bytes]] = {}  # task_id -> raw chunk messages, in order
        self.on_plan = on_plan
        self.client = raw_client(url)
        self.client.on_message = self._on_message
        for t in (self.update_topic, self.topics.combiner(region, "round")):
            self.client.subscribe(t, qos=1)
        time.sleep(0.3)

    def _on_message(self, _c, _u, msg) -> None:
        if msg.topic == self.update_topic:
            task_id = parse_chunk(msg.payload).meta["task_id"]
            self.chunks.setdefault(str(task_id), []).append(bytes(msg.payload))
            return
        plan = decode(msg.payload, ("round", "close"))
        if plan["type"] == "round":
            threading.Thread(target=self.on_plan, args=(plan,), daemon=True).start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
def test_replayed_misattributed_and_unbound_updates_are_rejected_and_counted(deployment) -> None:
    """Round 2: dev-0001's round-1 update is republished on its topic (a replay). Round 3:
    dev-0001's genuine round-3 update is republished on a selected silent device's topic
    (another device's update), and the silent device sends an update whose transfer names
    another task (unbound). Each is refused, counted and recorded in the round; the model is
    the FedAvg of exactly the six real devices in every round."""
    combiners = deployment.start_combiners(2)
    region1 = combiners[1]
    deployment.start_fleet(N)
    silent = RogueDevice(deployment.url, deployment.project, "region-1", "silent-1", "silent")
    done = threading.Event()
    errors: list[BaseException] = []

    def on_plan(plan: dict) -> None:
        try:
            if plan["round"] == 2:  # the replay, while round 2 is open
                r1 = next(t for t in tap.chunks if t.split(":")[1] == "1")
                for raw in list(tap.chunks[r1]):  # a copy: the tap hears its own replay too
                    publish(tap.client, tap.update_topic, raw)
            elif plan["round"] == 3:
                wait_until("dev-0001's round-3 update", lambda: plan["task_id"] in tap.chunks)
                for raw in list(
                    tap.chunks[plan["task_id"]]
                ):  # dev-0001's update, on silent-1's topic
                    silent.publish_update(raw)
                zeros = {k: np.zeros_like(v) for k, v in digits.initial_weights().items()}
                forged = encode(
                    "update",
                    task_id=plan["task_id"],
                    device="silent-1",
                    model_version=plan["model_version"],
                    num_examples=1000,
                    metrics={},
                    tensors=encode_tensors(zeros),
                )
                for ch in split_payload(forged, 1 << 20, meta={"task_id": "someone:else:0"}):
                    silent.publish_update(ch.to_bytes())
                done.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    tap = UpdateTap(deployment.url, deployment.project, "region-1", "dev-0001", on_plan)
    ctl = deployment.controller()
    wait_until("the fleet online", lambda: len(ctl.presence.eligible()) == N + 1)
    try:
        # silent-1 never answers its tasks: each round stays open until its deadline
        rounds = run(deployment, ctl, rounds=3, min_devices=N, round_timeout_s=3, max_attempts=1)
    finally:
        tap.stop()
        silent.stop()
    assert not errors, errors
    assert done.is_set()
    assert [r.status for r in rounds] == ["completed"] * 3
    everyone = [device_name(k) for k in range(N)]
    assert all(devices_of(r) == everyone for r in rounds)  # silent-1 credited with nothing
    assert rounds[0].rejected == []
    assert [(r["device"], r["reason"].split(":")[0]) for r in rounds[1].rejected] == [
        ("dev-0001", "replayed update")
    ]
    reasons = {r["reason"] for r in rounds[2].rejected}
    assert {r["device"] for r in rounds[2].rejected} == {"silent-1"}
    assert any("names device 'dev-0001', not the sender" in r for r in reasons), reasons
    assert any("sent in a transfer for someone:else:0" in r for r in reasons), reasons
    assert [r.metrics["rejected"] for r in rounds] == [0.0, 1.0, 2.0]
    stats = region1.stats
    assert (stats["rejected_replayed"], stats["rejected_wrong_sender"]) == (1, 1)
    assert stats["rejected_unbound"] == 1
    accs = completed_accuracies(rounds)
    assert accs == pytest.approx(digits.reference_run(N, 3), abs=1e-9)
    assert accs[-1] > 0.85


def test_a_partial_crediting_a_device_not_planned_in_its_region_is_refused(deployment) -> None:
    """A forged partial for region-0 credits dev-0001 (planned in region-1) and arrives before
    region-0's genuine one: the controller refuses it, still takes the genuine partial, and the
    round is the FedAvg of exactly the real updates."""
    deployment.start_combiners(2)
    deployment.start_fleet(N)
    topics = Topics(deployment.project)
    forged_at: list[str] = []
    errors: list[BaseException] = []

    def on_plan(plan: dict) -> None:
        if plan["round"] != 2:
            return
        try:
            zeros = {k: np.zeros_like(v) for k, v in digits.initial_weights().items()}
            partial = encode(
                "partial",
                task_id=plan["task_id"],
                region="region-0",
                combiner="combiner-region-0",
                count=1,
                weight=1000.0,
                devices=[{"device": "dev-0001", "region": "region-0", "n": 1000, "metrics": {}}],
                rejected=[],
                sums=encode_tensors(zeros),
            )
            for ch in split_payload(partial, 1 << 20, meta={"task_id": plan["task_id"]}):
                publish(tap.client, topics.combiner("region-0", "partial"), ch.to_bytes())
            forged_at.append(plan["task_id"])
        except BaseException as exc:
            errors.append(exc)

    tap = UpdateTap(deployment.url, deployment.project, "region-0", "dev-0000", on_plan)
    ctl = deployment.controller()
    wait_until("the fleet online", lambda: len(ctl.presence.eligible()) == N)
    try:
        rounds = run(deployment, ctl, rounds=3, min_devices=N, round_timeout_s=20, max_attempts=1)
    finally:
        tap.stop()
    assert not errors, errors
    assert forged_at == [rounds[1].task_id]
    assert [r.status for r in rounds] == ["completed"] * 3
    everyone = [device_name(k) for k in range(N)]
    assert all(devices_of(r) == everyone for r in rounds)
    assert rounds[1].metrics["partials_refused"] == 1.0
    assert [r["device"] for r in rounds[1].rejected] == ["dev-0001"]
    assert "not planned" in rounds[1].rejected[0]["reason"]
    assert ctl.rounds.refused_partials == 1
    accs = completed_accuracies(rounds)
    assert accs == pytest.approx(digits.reference_run(N, 3), abs=1e-9)
    assert accs[-1] > 0.85
