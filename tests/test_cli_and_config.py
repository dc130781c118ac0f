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
    "keys",
    "keys init",
    "keys rotate",
    "keys retire",
    "keys list",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--" in result.output


def test_server_commands_refuse_to_run_without_secret(monkeypatch) -> None:
    monkeypatch.delenv("EDGEFL_JWT_SECRET", raising=False)
    monkeypatch.delenv("EDGEFL_JWT_KEYS", raising=False)
    result = CliRunner().invoke(app, ["combiner", "--region", "r0"])
    assert result.exit_code != 0
    assert "EDGEFL_JWT_SECRET" in result.output and "--insecure" in result.output


def test_token_command_signs_with_the_active_key(monkeypatch, tmp_path) -> None:
    import jwt

    from edgefl.auth.keys import KeyDir
    from edgefl.auth.tokens import AuthConfig, Role

    keys = KeyDir(tmp_path / "keys")
    kid = keys.init("ES256")
    monkeypatch.delenv("EDGEFL_JWT_SECRET", raising=False)
    monkeypatch.setenv("EDGEFL_JWT_KEYS", str(keys.path))
    args = ["token", "--subject", "controller", "--role", "controller", "--project", "p"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert jwt.get_unverified_header(token)["kid"] == kid
    claims = AuthConfig(keys=str(keys.jwks_path)).verifier(project="p").verify(token)
    assert (claims.subject, claims.role) == ("controller", Role.controller)
    # both set is ambiguous: refused, naming the variables
    monkeypatch.setenv("EDGEFL_JWT_SECRET", "s" * 48)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "EDGEFL_JWT_KEYS" in " ".join(result.output.split())


def test_keys_commands(tmp_path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "k")
    assert runner.invoke(app, ["keys", "init", d, "--alg", "RS256"]).exit_code == 1
    first = runner.invoke(app, ["keys", "init", d])
    assert first.exit_code == 0, first.output
    assert runner.invoke(app, ["keys", "init", d]).exit_code == 1  # never overwrites
    assert runner.invoke(app, ["keys", "rotate", d]).exit_code == 0
    from edgefl.auth.keys import KeyDir

    old, new = KeyDir(d).key_ids()
    retire_active = runner.invoke(app, ["keys", "retire", d, new])
    assert retire_active.exit_code == 1 and "active" in retire_active.output
    assert runner.invoke(app, ["keys", "retire", d, old]).exit_code == 0
    listing = runner.invoke(app, ["keys", "list", d])
    assert listing.exit_code == 0
    assert new in listing.output and old not in listing.output and "EdDSA" in listing.output


def test_token_command_issues_a_verifiable_jwt(monkeypatch) -> None:
    from edgefl.auth.tokens import Role, TokenVerifier

    secret = "s" * 48
    monkeypatch.setenv("EDGEFL_JWT_SECRET", secret)
    monkeypatch.delenv("EDGEFL_JWT_KEYS", raising=False)
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
