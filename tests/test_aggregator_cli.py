"""Aggregator parameters at the edges: ``edgefl aggregators``, the REST API's 422 and the
CLI's messages for a bad parameter, and a valid one reaching the session's config."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.auth.tokens import Role
from edgefl.cli.main import app as cli
from tests.serving import Fleet, serving_fleet

PROBLEM = "application/problem+json"


def test_aggregators_command_lists_kinds_params_and_defaults() -> None:
    out = CliRunner().invoke(cli, ["aggregators"], env={"COLUMNS": "220"})
    assert out.exit_code == 0, out.output
    rows = {line.split("│")[1].strip(): line for line in out.output.splitlines() if "│" in line}
    for name in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        assert "splittable (sums)" in rows[name], name
    for name in ("fedmedian", "trimmed_mean", "krum", "multikrum"):
        assert "robust (two-level)" in rows[name], name
    assert "server_lr = 1.0; > 0" in rows["fedavgm"]
    assert "mu = 0.01; > 0, <= 1000.0" in rows["fedprox"]
    assert "beta = 0.1; >= 0, < 0.5" in rows["trimmed_mean"]


@pytest.fixture(scope="module")
def fleet(embedded_broker, tmp_path_factory) -> Iterator[Fleet]:
    with serving_fleet(embedded_broker.url, tmp_path_factory.mktemp("aggcli"), 2, 1) as f:
        yield f


def _cli(fleet: Fleet, *args: str) -> Any:
    env = {"EDGEFL_API": fleet.url, "EDGEFL_TOKEN": fleet.token(Role.operator), "COLUMNS": "200"}
    return CliRunner().invoke(cli, list(args), env=env)


def test_api_refuses_bad_aggregator_parameters_with_422(fleet: Fleet) -> None:
    cases = [
        ({"aggregator": "fedadam", "aggregator_params": {"lr": -1}}, "parameter 'lr'"),
        ({"aggregator": "krum", "aggregator_params": {"k": 2}}, "unknown parameter 'k'"),
        ({"aggregator": "trimmed_mean", "aggregator_params": {"beta": 0.7}}, "beta >= 0, < 0.5"),
    ]
    with fleet.http(Role.operator) as ops:
        for body, says in cases:
            res = ops.post("/api/sessions", json={"session_id": "bad-agg", **body})
            assert res.status_code == 422, res.text
            assert res.headers["content-type"] == PROBLEM and says in res.json()["detail"]
        assert fleet.dep.store.get_session("bad-agg") is None
        ok = ops.post(
            "/api/sessions",
            json={"session_id": "ok-agg", "aggregator": "multikrum", "aggregator_params": {"m": 2}},
        )
        assert ok.status_code == 201, ok.text
    stored = fleet.dep.store.get_session("ok-agg")
    assert stored is not None and stored.config["aggregator_params"] == {"m": 2}


def test_cli_session_create_names_the_bad_parameter(fleet: Fleet) -> None:
    bad = _cli(
        fleet, "session", "create", "--id", "cli-bad", "--aggregator", "fedavgm",
        "--aggregator-param", "beta=1.5",
    )  # fmt: skip
    assert bad.exit_code != 0
    assert "aggregator 'fedavgm': parameter 'beta'" in bad.output
    assert fleet.dep.store.get_session("cli-bad") is None
    good = _cli(
        fleet, "session", "create", "--id", "cli-good", "--aggregator", "fedprox",
        "--aggregator-param", "mu=0.1",
    )  # fmt: skip
    assert good.exit_code == 0, good.output
    stored = fleet.dep.store.get_session("cli-good")
    assert stored is not None and stored.config["aggregator_params"] == {"mu": 0.1}


def test_controller_command_refuses_a_bad_parameter_before_connecting(tmp_path) -> None:
    out = CliRunner().invoke(
        cli,
        [
            "controller", "--broker", "mqtt://127.0.0.1:1", "--insecure",
            "--state", f"sqlite:///{tmp_path}/state.db", "--models", str(tmp_path / "models"),
            "--aggregator", "krum", "--aggregator-param", "f=-2",
        ],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert out.exit_code == 2, out.output
    assert "aggregator 'krum': parameter 'f'" in out.output and "f >= 0" in out.output
