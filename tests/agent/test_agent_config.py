"""The agent's command line and configuration: file, then environment, then flags."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from device_agent.cli import main as agent_main
from device_agent.config import load_config


def test_agent_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--broker-url" in out.stdout and "EDGEFL_" in out.stdout


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


def test_relative_paths_in_a_config_file_resolve_next_to_it(tmp_path, monkeypatch) -> None:
    """A provisioning bundle (agent.json beside ca.crt) must work from any working directory."""
    import json

    from device_agent.config import load_config

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (bundle / "agent.json").write_text(
        json.dumps({"device_id": "d1", "ca_file": "ca.crt", "data_path": "/abs/data.npz"})
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(bundle / "agent.json", env={})
    assert cfg.ca_file == str(bundle / "ca.crt")
    assert cfg.data_path == "/abs/data.npz"  # absolute paths are kept as they are
