"""Telemetry into a real InfluxDB 1.6 (the Debian ``influxd``, started by tests/influx.py).

A real session's device and server points must land with the right values; an InfluxDB
outage in the middle of a session must cost no point; a full buffer must count exactly what
it dropped; and a device must not be able to write another device's points.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from typing import Any

import cbor2
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.system_metrics import SystemMetrics
from edgefl import deploy
from edgefl.auth.tokens import Role
from edgefl.controller import Controller, SessionConfig
from edgefl.protocol import Topics, encode
from edgefl.tasks import digits
from edgefl.telemetry import Point, open_sink
from edgefl.telemetry.influx import InfluxV1Sink
from edgefl.transport import parse_broker_url
from tests.harness import Deployment
from tests.influx import InfluxProcess

DEVICE_FIELDS = {
    "cpu_percent", "mem_used_percent", "mem_available_bytes", "uptime_s", "rss_bytes",
    "train_s", "examples", "update_bytes", "bytes_sent", "bytes_received", "train_loss",
}  # fmt: skip


def sink_url(influx: InfluxProcess, db: str, **params: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"flush_interval": 0.2, **params}.items())
    return f"influxdb://127.0.0.1:{influx.http_port}/{db}?{query}"


def wait_for(cond: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_session(
    dep: deploy.Deployment, sink: Any, *, devices: int = 4, rounds: int = 3, on_round: Any = None
) -> tuple[Controller, str]:
    """A digits session on 2 regions; returns once every device's telemetry was forwarded."""
    dep.start_combiners(2)
    dep.start_fleet(devices)
    ctl = dep.start_controller(evaluator=digits.evaluator, sink=sink)
    config = SessionConfig(
        rounds=rounds,
        min_devices=devices,
        round_timeout_s=30,
        train={"lr": 0.1, "batch_size": 32},
    )
    ctl.create_session(config, digits.initial_weights("softmax"))
    ctl.run(config.session_id, on_round=on_round)
    # device telemetry is QoS 0 and follows the upload: the last round's may trail the session
    wait_for(lambda: ctl.telemetry.accepted >= rounds * devices, what="device telemetry")
    return ctl, config.session_id


def db_points(influx: InfluxProcess, db: str) -> dict[str, int]:
    """Points per measurement, counted on a field every point of it carries."""
    counts = {}
    for m, f in (("device", "train_s"), ("round", "round"), ("round_region", "participants")):
        rows = influx.rows(f'SELECT count("{f}") FROM "{m}"', db)
        counts[m] = int(rows[0]["count"]) if rows else 0
    return counts


def test_session_telemetry_lands_in_influxdb(embedded_broker, influxdb, tmp_path) -> None:
    db = f"s{uuid.uuid4().hex[:8]}"
    dep = Deployment(embedded_broker.url, tmp_path)
    try:
        sink = dep.open_sink(sink_url(influxdb, db))
        assert isinstance(sink, InfluxV1Sink)
        ctl, sid = run_session(dep, sink, devices=4, rounds=3)
        assert sink.flush(10), sink.stats()
        rounds = ctl.store.list_rounds(sid)
        # server round metrics: one point per round, the last one the session's final accuracy
        server = influxdb.rows(f"SELECT * FROM \"round\" WHERE \"session\" = '{sid}'", db)
        assert [r["round"] for r in server] == [1, 2, 3]
        assert server[-1]["accuracy"] == pytest.approx(rounds[-1].metrics["accuracy"], abs=1e-12)
        assert server[-1]["loss"] == pytest.approx(rounds[-1].metrics["loss"], abs=1e-12)
        for row, rec in zip(server, rounds):
            assert row["participants"] == 4 and row["selected"] == 4 and row["rejected"] == 0
            assert row["regions"] == 2 and row["project"] == dep.project
            assert row["duration_s"] == pytest.approx(rec.finished - rec.started, abs=1e-6)
            assert row["model_bytes"] == ctl.store.get_model(rec.model_out).size
        per_region = influxdb.rows('SELECT sum("participants") FROM "round_region"', db)
        assert per_region[0]["sum"] == 12
        # device telemetry: every device, every round, system and training figures
        device = influxdb.rows('SELECT * FROM "device"', db)
        assert len(device) == 12
        assert {r["device"] for r in device} == {f"dev-{k:04d}" for k in range(4)}
        assert {(r["device"], r["region"]) for r in device} == {
            (f"dev-{k:04d}", f"region-{k % 2}") for k in range(4)
        }
        for row in device:
            missing = {f for f in DEVICE_FIELDS if row.get(f) is None}
            assert not missing, (row["device"], missing)
            assert 0 <= row["cpu_percent"] <= 100 and 0 < row["mem_used_percent"] < 100
            assert row["bytes_sent"] > row["update_bytes"] > 0  # chunk envelopes on top
            assert row["examples"] == len(digits.device_data(4, int(row["device"][4:]))[1])
        # the first round downloads the model; later rounds download the new version each time
        assert all(r["bytes_received"] > 0 for r in device)
        # nothing lost: every point handed to the sink is in the database
        stats = sink.stats()
        assert stats["dropped"] == stats["rejected"] == stats["pending"] == 0
        assert sum(db_points(influxdb, db).values()) == stats["written"] == stats["sent"]
    finally:
        dep.close()


def test_influxdb_outage_mid_session_loses_no_point(embedded_broker, private_influxdb, tmp_path):
    """influxd is stopped after round 2 and started again after round 5 (same data, port)."""
    influx, db = private_influxdb, "outage"
    dep = Deployment(embedded_broker.url, tmp_path)
    events: dict[str, Any] = {}
    try:
        sink = dep.open_sink(sink_url(influx, db, retry_max=0.5))

        def on_round(rec, _sess) -> None:
            if rec.round == 2:
                assert sink.flush(10)
                events["before"] = sink.stats()
                influx.stop()
            elif rec.round == 5:
                time.sleep(0.5)  # let the flusher hit the closed port at least once more
                events["during"] = sink.stats()
                influx.start()
                events["restarted"] = time.monotonic()

        ctl, sid = run_session(dep, sink, devices=4, rounds=7, on_round=on_round)
        assert sink.flush(30), sink.stats()
        flushed_s = time.monotonic() - events["restarted"]
        during, stats = events["during"], sink.stats()
        # the outage was real: writes failed and points waited in the buffer
        assert during["failures"] > 0 and during["pending"] > 0
        assert during["sent"] == events["before"]["sent"]
        counts = db_points(influx, db)
        print(f"\noutage: before={events['before']} during={during} after={stats} db={counts} "
              f"flushed {flushed_s:.2f}s after the restart")
        assert stats["dropped"] == 0 and stats["rejected"] == 0 and stats["pending"] == 0
        assert sum(counts.values()) == stats["written"] == stats["sent"]
        assert counts["round"] == 7 and counts["device"] == 28
        last = influx.rows('SELECT last("accuracy") FROM "round"', db)[0]["last"]
        assert last == pytest.approx(ctl.store.list_rounds(sid)[-1].metrics["accuracy"], abs=1e-12)
    finally:
        dep.close()


def test_full_buffer_counts_exactly_what_it_dropped(private_influxdb) -> None:
    """With the database down, a 10-point buffer keeps the newest 10 and counts the rest."""
    influx, db = private_influxdb, "bounded"
    influx.stop()
    sink = open_sink(sink_url(influx, db, max_buffer=10, batch_size=4, retry_max=0.3))
    assert isinstance(sink, InfluxV1Sink)
    try:
        t0 = time.time()
        for i in range(25):  # 25 single writes, as a busy controller would make them
            sink.write([Point("probe", {"i": float(i)}, {"src": "test"}, t0 + i * 0.001)])
        wait_for(lambda: sink.stats()["failures"] > 0, what="a failed write")
        assert sink.stats()["dropped"] == 15 and sink.pending == 10
        influx.start()
        assert sink.flush(20), sink.stats()
        stats = sink.stats()
        stored = [r["i"] for r in influx.rows('SELECT "i" FROM "probe"', db)]
        assert stored == list(range(15, 25))  # the oldest went first
        assert stats["dropped"] == 15 == stats["written"] - len(stored)
        assert stats["sent"] == len(stored) and stats["rejected"] == 0
    finally:
        sink.close()


class TelemetryClient:
    """A device's own MQTT login, publishing raw telemetry payloads as a hostile device might."""

    def __init__(self, dep: deploy.Deployment, device: str, region: str) -> None:
        self.topics = Topics(dep.project)
        self.device, self.region = device, region
        addr = parse_broker_url(dep.url)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv311
        )
        login = dep.credentials.login(device, Role.device, region)
        self.client.username_pw_set(login["username"], login["password"])
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        wait_for(self.client.is_connected, what="device login")

    def send(self, payload: bytes, device: str | None = None) -> None:
        topic = self.topics.device(self.region, device or self.device, "telemetry")
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_devices_cannot_write_others_points_and_bad_telemetry_is_counted(
    influxdb, tmp_path
) -> None:
    """On the secure embedded broker (JWT + ACLs): identity comes from the topic only."""
    db = f"v{uuid.uuid4().hex[:8]}"
    with deploy.Deployment(tmp_path, project=deploy.random_project()) as dep:
        sink = dep.open_sink(sink_url(influxdb, db))
        ctl = dep.start_controller(sink=sink)
        dev = TelemetryClient(dep, "dev-0001", "region-0")
        now = time.time()

        seq = itertools.count(1)

        def tele(metrics: Any, **extra: Any) -> bytes:
            # a time of its own each: one series' points at one time would merge into one
            return encode("telemetry", ts=now + next(seq) * 1e-3, metrics=metrics, **extra)

        good = [
            tele({"cpu_percent": 12.5, "temp_c": 51.0}),
            tele({"train_s": 0.25}, device="dev-0001"),  # naming itself is fine
        ]
        spoofed = [  # payloads that try to name someone else
            tele({"cpu_percent": 99.0}, device="dev-0002"),
            tele({"cpu_percent": 99.0}, region="region-1"),
            tele({"cpu_percent": 99.0}, tags={"device": "dev-0002"}),
        ]
        malformed = {
            "decode": [b"\xff\x00not cbor", cbor2.dumps({"v": 1, "type": "telemetry", "ts": now})],
            "name": [
                tele({"bad name": 1.0}),
                tele({"device": 1.0}),
                tele({"time": 1.0}),
                tele({"x" * 65: 1.0}),
                tele({f"m{i}": 1.0 for i in range(65)}),
            ],
            "value": [
                tele({"cpu_percent": math.nan}),
                tele({"cpu_percent": math.inf}),
                tele({"up": True}),
                tele({"cpu_percent": "12"}),
                tele({"big": 10**400}),
            ],
            "empty": [tele({})],
            "size": [tele({"pad": 1.0}, junk=b"\0" * 20_000)],
        }
        for payload in good + spoofed + [p for ps in malformed.values() for p in ps]:
            dev.send(payload)
        # the topic of another device: the broker's ACL refuses it before the controller
        dev.send(tele({"cpu_percent": 99.0}), device="dev-0002")
        dev.send(tele({"cpu_percent": 99.0}), device="dev-0003")
        expected = {"identity": len(spoofed), **{k: len(v) for k, v in malformed.items()}}
        wait_for(
            lambda: ctl.telemetry.accepted == len(good)
            and ctl.telemetry.dropped == sum(expected.values()),
            what=f"forwarder counts (now {ctl.telemetry.accepted}, {dict(ctl.telemetry.reasons)})",
        )
        time.sleep(0.5)  # a refused publish would have arrived by now
        assert dict(ctl.telemetry.reasons) == expected
        assert ctl.telemetry.accepted == len(good)
        dev.close()
        assert sink.flush(10)
        rows = influxdb.rows('SELECT * FROM "device"', db)
        assert len(rows) == 2
        assert {(r["device"], r["region"], r["project"]) for r in rows} == {
            ("dev-0001", "region-0", dep.project)
        }
        assert not [r for r in rows if r["cpu_percent"] == 99.0]


def test_system_metrics_prefer_the_cpu_thermal_zone(tmp_path) -> None:
    """A board's CPU zone wins over hotter non-CPU zones; no zone at all means no temp_c."""
    for i, (kind, milli) in enumerate([("battery", "61000"), ("cpu-thermal", "48312")]):
        zone = tmp_path / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    board = SystemMetrics(thermal_root=str(tmp_path / "thermal")).sample()
    assert board["temp_c"] == 48.31
    bare = SystemMetrics(thermal_root=str(tmp_path / "none")).sample()
    assert "temp_c" not in bare
    assert bare["mem_total_bytes"] > bare["mem_available_bytes"] > 0 and bare["uptime_s"] > 0


def test_influxdb2_sink_keeps_points_while_the_v2_api_answers_404(influxdb, monkeypatch) -> None:
    """1.6.7 has no /api/v2/write: the 2.x/3.x sink must buffer, not lose or reject, points."""
    monkeypatch.setenv("EDGEFL_INFLUX_TOKEN", "not-checked-by-1.6")
    url = f"influxdb2://127.0.0.1:{influxdb.http_port}/bucket?org=o&flush_interval=0.1"
    sink = open_sink(url + "&retry_max=0.2&close_timeout=0.5")
    try:
        sink.write([Point("probe", {"i": float(i)}, {}, time.time() + i) for i in range(3)])
        wait_for(lambda: sink.stats()["failures"] >= 2, what="two failed v2 writes")
        stats = sink.stats()
        assert stats["sent"] == stats["rejected"] == stats["dropped"] == 0
        assert stats["pending"] == 3 and "404" in stats["last_error"]
    finally:
        sink.close()
    assert sink.stats()["dropped"] == 3  # close() gave up and says so


@pytest.mark.parametrize(
    ("url", "kind", "attrs"),
    [
        ("telemetry.jsonl", "JsonLinesSink", {}),
        ("jsonl://sub/t.jsonl", "JsonLinesSink", {}),
        ("none", "NullSink", {}),
        (
            "influxdb://u:p%40ss@db.example:8087/edgefl?rp=week&batch_size=50&max_buffer=500",
            "InfluxV1Sink",
            {"database": "edgefl", "batch_size": 50, "max_buffer": 500,
             "_write_url": "http://db.example:8087/write?db=edgefl&precision=ns&rp=week"},
        ),
        ("influxdbs://db.example/edgefl", "InfluxV1Sink", {"base_url": "https://db.example:8086"}),
    ],
)
def test_open_sink_by_url(url, kind, attrs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    sink = open_sink(url)
    try:
        assert type(sink).__name__ == kind
        for name, value in attrs.items():
            assert getattr(sink, name) == value
    finally:
        sink.close()


@pytest.mark.parametrize(
    "url",
    ["bogus://x", "influxdb://host", "influxdb://host/db?nope=1", "influxdb2://host/b",
     "influxdb://host/db?batch_size=many"],
)
def test_open_sink_refuses_bad_urls(url, monkeypatch) -> None:
    monkeypatch.delenv("EDGEFL_INFLUX_TOKEN", raising=False)
    monkeypatch.delenv("INFLUX_TOKEN", raising=False)
    with pytest.raises(ValueError):
        open_sink(url)


def test_jsonl_sink_on_a_full_disk_drops_and_closes_cleanly(caplog) -> None:
    """A full disk (``/dev/full`` answers every write with ENOSPC) loses points with a log
    line, never an exception: the chaos suite's disk-full controller must exit cleanly."""
    import logging

    from edgefl.telemetry import JsonLinesSink
    from edgefl.telemetry.base import Point

    sink = JsonLinesSink("/dev/full")
    with caplog.at_level(logging.WARNING, logger="edgefl.telemetry.jsonl"):
        sink.write([Point("round", {"session": "s"}, {"accuracy": 0.5}, 1.0)])
        sink.close()  # the buffered line fails again here; it must not raise
    assert "dropped 1 points" in caplog.text
