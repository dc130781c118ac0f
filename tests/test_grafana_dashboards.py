"""Every query of the Grafana dashboards in dashboards/ runs on a real InfluxDB after a session.

Grafana is not installable here, so the test does what Grafana's InfluxDB datasource does with
a raw InfluxQL target: substitute the template variables, send the query to ``/query``, and
read back series. Each panel query must parse and return well-formed, non-empty series; each
template variable query must list values.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.system_metrics import SystemMetrics
from edgefl.controller import SessionConfig
from edgefl.tasks import digits
from tests.harness import Deployment
from tests.influx import InfluxProcess

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


def panel_targets() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, query) for every query target of every panel."""
    found = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["refId"], target["query"]))
    return found


def variable_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] == "query":
                found.append((path.name, var["name"], var["query"]))
    return found


def substitute(query: str, project: str) -> str:
    """What Grafana sends: its macros and this dashboard's variables filled in."""
    values = {
        "$timeFilter": "time > now() - 1h",
        "$__interval_ms": "1000",  # before $__interval, which it starts with
        "$__interval": "1s",
        "$project": re.escape(project),
        "$session": ".*",  # the variables' "All" value
        "$device": ".*",
    }
    for key, value in values.items():
        query = query.replace(key, value)
    assert not re.search(r"\$\{?[A-Za-z_]", query), f"unsubstituted variable in {query!r}"
    return query


@pytest.fixture(scope="module")
def session_data(embedded_broker, influxdb, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """One session's telemetry in a database of its own: 4 devices, 2 regions, 4 rounds.

    Device 0 reads a thermal zone laid out as /sys/class/thermal is (this machine has none),
    so the temperature panel has data as on a Raspberry Pi or Jetson.
    """
    tmp = tmp_path_factory.mktemp("dash")
    zone = tmp / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("47500\n")
    db = f"g{uuid.uuid4().hex[:8]}"
    dep = Deployment(embedded_broker.url, tmp)
    try:
        sink = dep.open_sink(f"influxdb://127.0.0.1:{influxdb.http_port}/{db}?flush_interval=0.2")
        dep.start_combiners(2)
        fleet = dep.start_fleet(4)
        fleet.agents[0].system_metrics = SystemMetrics(thermal_root=str(tmp / "thermal"))
        ctl = dep.start_controller(evaluator=digits.evaluator, sink=sink)
        config = SessionConfig(
            rounds=4, min_devices=4, round_timeout_s=30, train={"lr": 0.1, "batch_size": 32}
        )
        ctl.create_session(config, digits.initial_weights("softmax"))
        ctl.run(config.session_id)
        deadline = time.monotonic() + 15
        while ctl.telemetry.accepted < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.flush(10)
        yield {"db": db, "project": dep.project, "session": config.session_id}
    finally:
        dep.close()


def test_dashboards_exist_and_use_the_provisioned_datasource() -> None:
    assert DASHBOARDS, "no dashboard JSON in dashboards/"
    provisioned = (ROOT / "dashboards/provisioning/datasources/edgefl-influxdb.yaml").read_text()
    assert re.search(r"^\s+uid: edgefl-influxdb$", provisioned, re.M)
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        ds = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
        assert ds["query"] == "influxdb" and ds["current"]["value"] == "edgefl-influxdb"
        titles = {p["title"] for p in dash["panels"]}
        assert {"Devices reporting", "Current round", "Accuracy", "Loss", "CPU", "Memory used",
                "Temperature", "Transfer rate (devices)", "Update and model sizes"} <= titles
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                assert target["rawQuery"] and target["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize(
    ("dashboard", "panel", "ref", "query"), panel_targets(), ids=lambda v: str(v)[:40]
)
def test_panel_query_returns_series(
    influxdb: InfluxProcess, session_data, dashboard, panel, ref, query
) -> None:
    q = substitute(query, session_data["project"])
    result = influxdb.query(q, session_data["db"])["results"][0]
    series = result.get("series", [])
    assert series, f"{dashboard} / {panel} / {ref}: no series for {q}"
    for s in series:
        assert isinstance(s["name"], str) and s["columns"][0] == "time"
        assert all(len(row) == len(s["columns"]) for row in s["values"])
        numbers = [v for row in s["values"] for v in row[1:] if isinstance(v, (int, float))]
        assert numbers, f"{panel}: only empty values in {s}"


def test_panels_show_the_sessions_figures(influxdb: InfluxProcess, session_data) -> None:
    """Not only non-empty: the key panels carry this session's values."""
    targets = {(p, r): q for _, p, r, q in panel_targets()}

    def values(panel: str, ref: str = "A") -> list[list[Any]]:
        q = substitute(targets[(panel, ref)], session_data["project"])
        return [v for s in influxdb.query(q, session_data["db"])["results"][0]["series"]
                for v in s["values"]]

    assert values("Devices reporting")[0][1] == 4
    assert values("Current round")[0][1] == 4
    assert max(v[1] for v in values("Devices reporting over time")) == 4
    temps = [v[1] for v in values("Temperature") if v[1] is not None]
    assert 47.5 in temps


@pytest.mark.parametrize(("dashboard", "name", "query"), variable_queries())
def test_template_variable_lists_values(
    influxdb: InfluxProcess, session_data, dashboard, name, query
) -> None:
    q = substitute(query, session_data["project"])
    series = influxdb.query(q, session_data["db"])["results"][0].get("series", [])
    listed = {row[1] for s in series for row in s["values"]}
    expected = {
        "project": session_data["project"],
        "session": session_data["session"],
        "device": "dev-0003",
    }[name]
    assert expected in listed, f"{dashboard}: ${name} lists {listed}"
