"""Every server command has --help and refuses to run insecurely by accident."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgefl.cli.main import app

COMMANDS = [
    "demo",
    "broker",
    "combiner",
    "simulate",
    "controller",
    "dashboard",
    "token",
    "package",
    "fleet",
    "ca",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--" in result.output


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
