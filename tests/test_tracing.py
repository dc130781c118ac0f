"""OpenTelemetry traces across tiers: one digits round on a real broker is ONE connected trace
(controller round -> combiner region -> device task -> download/train/upload), the trace
context travels in the plans, tasks and updates on the wire, and with tracing off messages
carry no ``trace`` field. Spans are read back with the SDK's in-memory exporter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.observability.tracing import configure_tracing, shutdown_tracing, trace_field
from edgefl.protocol import Topics, decode
from edgefl.protocol.chunking import Reassembler, parse_chunk
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url
from tests.harness import Deployment, completed_accuracies

DEVICES, REGIONS = 4, 2


class Sniffer:
    """A raw MQTT client that records the plans, tasks and (reassembled) updates of a project."""

    def __init__(self, url: str, project: str) -> None:
        topics = Topics(project)
        self.messages: dict[str, list[tuple[str, dict[str, Any]]]] = {
            "round": [],
            "task": [],
            "update": [],
        }
        self._lock = threading.Lock()
        self._updates = Reassembler(zero_copy=False)
        addr = parse_broker_url(url)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sniff-{project}", protocol=paho.MQTTv311
        )
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        for flt in (
            topics.combiner_wildcard("round"),
            topics.device_wildcard(None, "task"),
            topics.device_wildcard(None, "update"),
        ):
            self.client.subscribe(flt, qos=1)
        time.sleep(0.3)  # the subscriptions are in place before the round starts

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            if msg.topic.endswith("/update"):
                done = self._updates.feed_chunk(msg.topic, parse_chunk(bytes(msg.payload)))
                if done is not None:
                    self.messages["update"].append(
                        (msg.topic, decode(bytes(done.payload), ("update", "decline")))
                    )
                return
            body = decode(bytes(msg.payload))
            if body["type"] in self.messages:
                self.messages[body["type"]].append((msg.topic, body))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert configure_tracing(exporter=exporter, service_name="edgefl-test")
    yield exporter
    shutdown_tracing()


def _one_round(broker_url: str, tmp_path: Path) -> tuple[Sniffer, list[Any], str]:
    """A one-round digits session over 2 regions and 4 devices, its messages sniffed."""
    dep = Deployment(broker_url, tmp_path)
    sniffer = Sniffer(broker_url, dep.project)
    try:
        dep.start_combiners(REGIONS)
        dep.start_fleet(DEVICES)
        ctl = dep.controller()
        _, rounds = dep.run_session(ctl, rounds=1, min_devices=DEVICES)
        # learning is untouched by tracing: the same FedAvg as the single-process reference
        assert completed_accuracies(rounds) == pytest.approx(
            digits.reference_run(DEVICES, 1), abs=1e-9
        )
        end = time.monotonic() + 10  # the last update's chunks reach the sniffer too
        while len(sniffer.messages["update"]) < DEVICES and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        dep.close()
        sniffer.stop()
    return sniffer, rounds, dep.project


def _parent_of(traceparent: str) -> tuple[int, int]:
    """(trace id, span id) of a W3C traceparent ``00-<trace>-<span>-<flags>``."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1, traceparent  # sampled
    return int(trace_id, 16), int(span_id, 16)


def test_one_round_is_one_connected_trace(
    broker_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    sniffer, rounds, project = _one_round(broker_url, tmp_path)
    end = time.monotonic() + 10  # devices end their task spans after their last PUBACK
    while time.monotonic() < end:
        done = spans.get_finished_spans()
        if sum(s.name == "edgefl.device.task" for s in done) >= DEVICES:
            break
        time.sleep(0.05)
    finished = list(spans.get_finished_spans())
    by_name: dict[str, list[Any]] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)

    # the controller's round span is the root, and every span is in its trace
    (root,) = by_name["edgefl.controller.round"]
    assert root.parent is None
    trace_id = root.context.trace_id
    assert {s.context.trace_id for s in finished} == {trace_id}
    rec = rounds[0]
    assert dict(root.attributes) == {
        "edgefl.project": project,
        "edgefl.session": rec.session_id,
        "edgefl.round": 1,
        "edgefl.attempt": 0,
        "edgefl.task_id": rec.task_id,
        "edgefl.devices": DEVICES,
        "edgefl.regions": ("region-0", "region-1"),
        "edgefl.outcome": "completed",
    }

    # one region span per combiner, children of the round
    regions = {s.attributes["edgefl.region"]: s for s in by_name["edgefl.combiner.region"]}
    assert sorted(regions) == ["region-0", "region-1"]
    for name, region in regions.items():
        assert region.parent.span_id == root.context.span_id
        assert region.parent.is_remote  # it came over MQTT, in the plan
        assert region.attributes["edgefl.combiner"] == f"combiner-{name}"
        assert region.attributes["edgefl.accepted"] == DEVICES // REGIONS
        assert region.attributes["edgefl.rejected"] == 0
        assert region.attributes["edgefl.close_reason"] == "all devices reported"
    region_of_span = {s.context.span_id: n for n, s in regions.items()}

    # each device's task span is a child of its own region's span, with its transfers inside
    tasks = {s.attributes["edgefl.device"]: s for s in by_name["edgefl.device.task"]}
    assert sorted(tasks) == [f"dev-{k:04d}" for k in range(DEVICES)]
    children: dict[int, list[str]] = {}
    for s in finished:
        if s.parent is not None:
            children.setdefault(s.parent.span_id, []).append(s.name)
    for k, (device, task) in enumerate(sorted(tasks.items())):
        assert region_of_span[task.parent.span_id] == f"region-{k % REGIONS}"
        assert task.attributes["edgefl.task_id"] == rec.task_id
        assert sorted(children[task.context.span_id]) == [
            "edgefl.device.download",
            "edgefl.device.train",
            "edgefl.device.upload",
        ], device
    uploads = {s.parent.span_id: s for s in by_name["edgefl.device.upload"]}
    for task in tasks.values():
        upload = uploads[task.context.span_id]
        assert upload.attributes["edgefl.transfer"] == rec.task_id
        assert upload.attributes["edgefl.sent"] >= upload.attributes["edgefl.bytes"] > 0

    # the combiner's handling of each update: a child of the region span, accepted
    handled = by_name["edgefl.combiner.update"]
    assert sorted(s.attributes["edgefl.device"] for s in handled) == sorted(tasks)
    for s in handled:
        assert s.parent.span_id in region_of_span
        assert s.attributes["edgefl.outcome"] == "accepted"

    # on the wire: plans name the round span, tasks their region's span, updates the upload
    plans = [m for _, m in sniffer.messages["round"]]
    assert len(plans) == REGIONS
    for plan in plans:
        assert _parent_of(plan["trace"]["traceparent"]) == (trace_id, root.context.span_id)
    assert len(sniffer.messages["task"]) == DEVICES
    for topic, task_msg in sniffer.messages["task"]:
        device = topic.split("/")[-2]
        assert _parent_of(task_msg["trace"]["traceparent"]) == (
            trace_id,
            tasks[device].parent.span_id,
        )
    assert len(sniffer.messages["update"]) == DEVICES
    for topic, update in sniffer.messages["update"]:
        device = topic.split("/")[-2]
        upload = uploads[tasks[device].context.span_id]
        assert _parent_of(update["trace"]["traceparent"]) == (trace_id, upload.context.span_id)


def test_tracing_off_puts_no_trace_field_on_the_wire(broker_url: str, tmp_path: Path) -> None:
    shutdown_tracing()
    assert trace_field() == {}
    sniffer, _, _ = _one_round(broker_url, tmp_path)
    assert len(sniffer.messages["round"]) == REGIONS
    assert len(sniffer.messages["task"]) == DEVICES
    assert len(sniffer.messages["update"]) == DEVICES
    for kind, got in sniffer.messages.items():
        for topic, msg in got:
            assert "trace" not in msg, (kind, topic)


def test_a_malformed_trace_field_starts_a_new_trace(spans: InMemorySpanExporter) -> None:
    from edgefl.observability.tracing import span

    good = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    for carrier in ({"traceparent": "garbage"}, {"traceparent": 7}, {"tracestate": "x=1"}):
        with span("probe", parent=carrier):
            pass
    with span("child", parent={"traceparent": good, "tracestate": "vendor=1"}):
        pass
    probes = [s for s in spans.get_finished_spans() if s.name == "probe"]
    assert len(probes) == 3 and all(s.parent is None for s in probes)
    (child,) = [s for s in spans.get_finished_spans() if s.name == "child"]
    assert child.parent is not None
    assert child.parent.trace_id == int("ab" * 16, 16) and child.parent.span_id == int("cd" * 8, 16)
    assert child.context.trace_state.get("vendor") == "1"


def test_a_pooled_region_is_one_trace_too(
    mosquitto: MosquittoProcess, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with Deployment(mosquitto.url, tmp_path) as dep:
        dep.start_combiners(["region-0"], pool=2)
        dep.start_fleet(DEVICES)
        ctl = dep.controller()
        _, rounds = dep.run_session(ctl, rounds=1, min_devices=DEVICES)
        assert completed_accuracies(rounds) == pytest.approx(
            digits.reference_run(DEVICES, 1), abs=1e-9
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if sum(s.name == "edgefl.device.task" for s in spans.get_finished_spans()) >= DEVICES:
                break
            time.sleep(0.05)
    finished = spans.get_finished_spans()
    (root,) = [s for s in finished if s.name == "edgefl.controller.round"]
    members = [s for s in finished if s.name == "edgefl.combiner.region"]
    # each member's span is the round's child and covers its own share of the devices
    assert sorted(s.attributes["edgefl.combiner"] for s in members) == [
        "combiner-region-0-0",
        "combiner-region-0-1",
    ]
    assert all(s.parent.span_id == root.context.span_id for s in members)
    assert [s.attributes["edgefl.devices"] for s in members] == [DEVICES // 2] * 2
    assert sum(s.attributes["edgefl.accepted"] for s in members) == DEVICES
    member_ids = {s.context.span_id for s in members}
    tasks = [s for s in finished if s.name == "edgefl.device.task"]
    assert len(tasks) == DEVICES and all(t.parent.span_id in member_ids for t in tasks)
    assert {s.context.trace_id for s in finished} == {root.context.trace_id}


def _sampled(carrier: dict[str, str]) -> bool:
    return bool(int(carrier["traceparent"].rsplit("-", 1)[1], 16) & 1)


def test_an_unsampled_round_is_not_recorded_downstream(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefl.observability.tracing import span

    # what docs/observability.md advises for large fleets, at a ratio of 0: no round sampled
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    controller = InMemorySpanExporter()
    assert configure_tracing(exporter=controller)
    try:
        with span("edgefl.controller.round"):
            carrier = trace_field()["trace"]
    finally:
        shutdown_tracing()
    assert not _sampled(carrier)  # the decision travels with the plan
    monkeypatch.delenv("OTEL_TRACES_SAMPLER")  # a combiner with the default sampler
    combiner = InMemorySpanExporter()
    assert configure_tracing(exporter=combiner)
    try:
        with span("edgefl.combiner.region", parent=carrier):
            assert not _sampled(trace_field()["trace"])
        with span("unrelated"):
            pass
    finally:
        shutdown_tracing()
    assert controller.get_finished_spans() == ()
    assert [s.name for s in combiner.get_finished_spans()] == ["unrelated"]
