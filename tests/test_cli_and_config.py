"""Every command has --help; the agent's configuration merges file, environment and flags."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from device_agent.cli import main as agent_main
from device_agent.config import load_config
from edgefl.cli.main import app

COMMANDS = ["demo", "broker", "combiner", "simulate", "controller", "dashboard", "token"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--" in result.output


def test_agent_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--broker-url" in out.stdout and "EDGEFL_" in out.stdout


def test_server_commands_refuse_to_run_without_secret(monkeypatch) -> None:
    monkeypatch.delenv("EDGEFL_JWT_SECRET", raising=False)
    result = CliRunner().invoke(app, ["combiner", "--region", "r0"])
    assert result.exit_code != 0
    assert "EDGEFL_JWT_SECRET" in result.output and "--insecure" in result.output


def test_token_command_issues_a_verifiable_jwt(monkeypatch) -> None:
    from edgefl.auth.tokens import Role, TokenVerifier

    secret = "s" * 48
    monkeypatch.setenv("EDGEFL_JWT_SECRET", secret)
    result = CliRunner().invoke(
        app, ["token", "--subject", "dev-7", "--role", "device", "--project", "p", "--region", "eu"]
    )
    assert result.exit_code == 0, result.output
    claims = TokenVerifier(secret).verify(result.output.strip())
    assert (claims.subject, claims.role, claims.project, claims.region) == (
        "dev-7",
        Role.device,
        "p",
        "eu",
    )


def test_agent_config_precedence(tmp_path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps(
            {
                "device_id": "pi-1",
                "region": "file-region",
                "broker_url": "mqtt://file:1883",
                "seed": 3,
            }
        )
    )
    env = {"EDGEFL_REGION": "env-region", "EDGEFL_PASSWORD": "tok", "EDGEFL_SEED": "5"}
    cfg = load_config(path, env=env, broker_url="mqtt://flag:1883")
    assert cfg.device_id == "pi-1"
    assert cfg.region == "env-region"  # env beats file
    assert cfg.broker_url == "mqtt://flag:1883"  # flags beat both
    assert cfg.seed == 5 and isinstance(cfg.seed, int)
    assert cfg.username == "pi-1"  # username defaults to the device id
    assert cfg.redacted()["password"] == "***"


def test_agent_config_toml_and_errors(tmp_path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "jetson-2"\nmax_chunk_size = 65536\n')
    cfg = load_config(path, env={})
    assert cfg.device_id == "jetson-2" and cfg.max_chunk_size == 65536
    assert cfg.seed is not None  # derived from the id, stable
    assert load_config(path, env={}).seed == cfg.seed
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device_id": "x", "colour": "blue"}))
    with pytest.raises(ValueError, match="colour"):
        load_config(bad, env={})
    with pytest.raises(ValueError, match="device_id"):
        load_config(None, env={})


def test_agent_cli_reports_config_errors(capsys) -> None:
    assert agent_main(["--broker-url", "mqtt://127.0.0.1:1"]) == 2
    assert "device_id" in capsys.readouterr().err
