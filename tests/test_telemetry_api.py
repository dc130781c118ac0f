"""``GET /api/telemetry`` answering history queries from a real InfluxDB 1.6 (tests/influx.py)
after a real session, and from the store when none is configured.

The queries are built from what a caller sends, so an injection attempt in ``device=`` must
come back empty and leave the database as it was.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from edgefl.api.routes.telemetry import SOURCE_HEADER, use_history
from edgefl.api.server import DashboardServer
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.cli.main import app as cli
from edgefl.telemetry import open_history
from edgefl.telemetry.influxql import device_query, quote_ident, quote_literal
from tests.harness import Deployment
from tests.influx import InfluxProcess
from tests.test_telemetry_influx import run_session, sink_url, wait_for

DEVICES, ROUNDS = 4, 3
PROBLEM = "application/problem+json"


@dataclass
class Served:
    url: str
    auth: AuthConfig
    dep: Deployment
    influx: InfluxProcess
    db: str
    server: DashboardServer

    def http(self, role: Role = Role.viewer) -> httpx.Client:
        token = self.auth.issuer().issue("ann", role, self.dep.project)
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def count(self) -> int:
        rows = self.influx.rows('SELECT count("train_s") FROM "device"', self.db)
        return int(rows[0]["count"]) if rows else 0


@pytest.fixture(scope="module")
def served(embedded_broker, influxdb, tmp_path_factory) -> Iterator[Served]:
    db = f"h{uuid.uuid4().hex[:8]}"
    dep = Deployment(embedded_broker.url, tmp_path_factory.mktemp("history"))
    auth = AuthConfig(secret=generate_secret())
    try:
        url = sink_url(influxdb, db)
        sink = dep.open_sink(url)
        run_session(dep, sink, devices=DEVICES, rounds=ROUNDS)
        assert sink.flush(10), sink.stats()  # type: ignore[attr-defined]
        server = DashboardServer(dep.store, port=0, auth=auth, project=dep.project).start()
        dep.own(server)
        use_history(server.app, open_history(url))  # what edgefl dashboard --telemetry does
        yield Served(server.url.rstrip("/"), auth, dep, influxdb, db, server)
    finally:
        dep.close()


def _get(http: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    res = http.get("/api/telemetry", params=params)
    assert res.status_code == 200, res.text
    assert res.headers[SOURCE_HEADER] == "influxdb"
    return list(res.json())


def test_history_comes_back_from_influxdb_with_every_filter(served: Served) -> None:
    stored = served.count()
    assert stored == DEVICES * ROUNDS
    with served.http() as http:
        everything = _get(http, limit=1000)
        assert len(everything) == stored
        assert all(p["source"] == "influxdb" for p in everything)
        assert [p["ts"] for p in everything] == sorted((p["ts"] for p in everything), reverse=True)
        assert {p["device"] for p in everything} == {f"dev-{k:04d}" for k in range(DEVICES)}
        assert {(p["device"], p["region"]) for p in everything} == {
            (f"dev-{k:04d}", f"region-{k % 2}") for k in range(DEVICES)
        }
        raw = served.influx.rows('SELECT * FROM "device" WHERE "device" = \'dev-0001\'', served.db)
        one = _get(http, device="dev-0001")
        assert len(one) == ROUNDS and {p["device"] for p in one} == {"dev-0001"}
        newest = max(raw, key=lambda r: r["time"])
        assert one[0]["ts"] == pytest.approx(newest["time"] / 1e9, abs=1e-6)
        assert one[0]["metrics"]["train_s"] == newest["train_s"]
        assert one[0]["metrics"]["cpu_percent"] == newest["cpu_percent"]
        # one metric: only that field, for every point that has it
        loss = _get(http, device="dev-0001", metric="train_loss")
        assert [set(p["metrics"]) for p in loss] == [{"train_loss"}] * ROUNDS
        assert sorted(p["metrics"]["train_loss"] for p in loss) == sorted(
            r["train_loss"] for r in raw
        )
        # time windows (unix seconds, ages) and limits
        times = sorted(p["ts"] for p in one)
        assert [p["ts"] for p in _get(http, device="dev-0001", since=times[1])] == [
            times[2],
            times[1],
        ]
        assert [p["ts"] for p in _get(http, device="dev-0001", until=times[0])] == [times[0]]
        assert len(_get(http, since="10m", limit=1000)) == stored
        assert _get(http, until="10m") == []  # all of it is newer than ten minutes
        assert len(_get(http, limit=5)) == 5
        assert _get(http, device="dev-9999") == []
        assert _get(http, metric="no_such_metric") == []
        bad = http.get("/api/telemetry", params={"since": "yesterday-ish"})
        assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM
        weird = http.get("/api/telemetry", params={"metric": 'x" FROM y'})
        assert weird.status_code == 422


INJECTIONS = [
    "dev-0001' OR device =~ /.*/ OR device = '",
    'dev-0001\'; DROP DATABASE "{db}"; --',
    "x\\' OR '1'='1",
    'dev-0001" OR "device" =~ /.*/',
    "dev-0001'\nDROP MEASUREMENT device",
    "\\",
]


def test_an_injection_attempt_in_device_returns_nothing_and_breaks_nothing(
    served: Served,
) -> None:
    before = served.count()
    with served.http() as http:
        for attempt in INJECTIONS:
            got = http.get("/api/telemetry", params={"device": attempt.format(db=served.db)})
            assert got.status_code == 200, (attempt, got.text)
            assert got.json() == [], attempt
        assert len(_get(http, limit=1000)) == before  # still there, still answering
    assert served.count() == before
    names = served.influx.query("SHOW DATABASES")["results"][0]["series"][0]["values"]
    assert [served.db] in names
    # the query really holds the whole attempt as one literal
    q = device_query(device=INJECTIONS[0], limit=3)
    assert q == (
        'SELECT * FROM "device" WHERE "device" = '
        "'dev-0001\\' OR device =~ /.*/ OR device = \\'' ORDER BY time DESC LIMIT 3"
    )
    assert quote_literal("a\\'b\nc") == "'a\\\\\\'b\\nc'"
    assert quote_ident('we"ird\\') == '"we\\"ird\\\\"'


def test_cli_reads_the_history(served: Served) -> None:
    token = served.auth.issuer().issue("ann", Role.viewer, served.dep.project)
    env = {"EDGEFL_API": served.url, "EDGEFL_TOKEN": token, "COLUMNS": "200"}
    out = CliRunner().invoke(
        cli,
        ["telemetry", "--device", "dev-0002", "--metric", "train_loss", "--since", "10m"],
        env=env,
    )
    assert out.exit_code == 0, out.output
    assert f"telemetry ({ROUNDS} points, source influxdb)" in out.output
    assert out.output.count("dev-0002") == ROUNDS and "train_loss=" in out.output
    assert "cpu_percent" not in out.output


def test_without_influxdb_the_store_answers_and_says_so(served: Served) -> None:
    def flushed() -> bool:  # the controllers write the device table about every second
        rows = served.dep.store.list_devices(served.dep.project)
        return len(rows) == DEVICES and all("train_s" in d.telemetry for d in rows)

    wait_for(flushed, 15, "the device table")
    use_history(served.server.app, None)
    try:
        with served.http() as http:
            res = http.get("/api/telemetry", params={"limit": 1000})
            assert res.status_code == 200 and res.headers[SOURCE_HEADER] == "store"
            points = res.json()
            # one point per device: its last, as the controllers recorded it
            assert sorted(p["device"] for p in points) == [f"dev-{k:04d}" for k in range(DEVICES)]
            assert all(p["source"] == "store" for p in points)
            one = http.get(
                "/api/telemetry", params={"device": "dev-0000", "metric": "train_s"}
            ).json()
            recorded = served.dep.store.get_device(served.dep.project, "dev-0000")
            assert recorded is not None
            assert one == [
                {
                    "device": "dev-0000",
                    "region": "region-0",
                    "ts": recorded.telemetry_at,
                    "metrics": {"train_s": recorded.telemetry["train_s"]},
                    "source": "store",
                }
            ]
    finally:
        use_history(served.server.app, open_history(sink_url(served.influx, served.db)))


def test_an_unreachable_influxdb_is_a_502_problem(served: Served, tmp_path) -> None:
    down = InfluxProcess(tmp_path / "down")  # never started: nothing listens on its port
    use_history(served.server.app, open_history(f"influxdb://127.0.0.1:{down.http_port}/x"))
    try:
        with served.http() as http:
            res = http.get("/api/telemetry")
            assert res.status_code == 502 and res.headers["content-type"] == PROBLEM
            assert "telemetry history" in res.json()["detail"]
    finally:
        use_history(served.server.app, open_history(sink_url(served.influx, served.db)))


def test_open_history_takes_only_influxdb_1x_urls() -> None:
    reader = open_history("influxdb://u:p%40ss@db.example:9999/tele?rp=week&flush_interval=1")
    assert reader.describe() == "http://db.example:9999/tele" and reader.retention_policy == "week"
    for url in ("telemetry.jsonl", "influxdb2://h/b", "none", "influxdb://h"):
        with pytest.raises(ValueError):
            open_history(url)
