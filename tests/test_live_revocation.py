"""Revocation, expiry, key rotation and client-id binding on live connections.

Real embedded brokers with EdDSA keys, real paho clients, the real CLI (typer's CliRunner):
a revoked device is cut off within the sweep bound and cannot come back with its token,
while the rest of the fleet keeps working.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from typer.testing import CliRunner

from edgefl.auth.keys import KeyDir
from edgefl.auth.tokens import AuthConfig, Role
from edgefl.broker.embedded import EmbeddedBroker
from edgefl.cli.common import require_auth
from edgefl.cli.main import app
from edgefl.deploy import Deployment
from edgefl.protocol import Topics
from tests.brokers import NOT_AUTHORIZED, Probe, settle

P = "p"
T = Topics(P)
SWEEP_S = 1.0
AUTH_ENV = ("EDGEFL_JWT_KEYS", "EDGEFL_JWT_SECRET", "EDGEFL_REVOCATIONS")


class Watched(Probe):
    """A probe that records when the broker dropped its connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped = threading.Event()
        self.dropped_at: float | None = None
        self.client.on_disconnect = self._on_disconnect

    def _on_disconnect(self, *_a: Any) -> None:
        self.dropped_at = time.monotonic()
        self.dropped.set()


def _device(url: str, auth: AuthConfig, name: str, token: str | None = None, **kw: Any) -> Watched:
    token = token or auth.issuer().issue(name, Role.device, P, region="r1")
    client_id = kw.pop("client_id", f"edgefl-{P}-{name}")
    return Watched(url, client_id, username=name, password=token, **kw)


def _controller(url: str, auth: AuthConfig, suffix: str) -> Probe:
    token = auth.issuer().issue("controller", Role.controller, P)
    return Probe(url, f"edgefl-{P}-controller-{suffix}", username="controller", password=token)


def _cli(args: list[str], keys: Path) -> str:
    result = CliRunner().invoke(app, args, env={"EDGEFL_JWT_KEYS": str(keys)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    _cli(["keys", "init", str(path)], path)
    return path


@pytest.fixture
def broker(keys: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(
        auth=AuthConfig(keys=str(keys)), project=P, sweep_s=SWEEP_S, leeway_s=0.5
    ) as b:
        yield b


def test_fleet_revoke_disconnects_a_live_device_and_spares_the_rest(
    tmp_path: Path, keys: Path, broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text("device_id,region\ndev-a,r1\ndev-b,r1\n")
    out = tmp_path / "fleet"
    _cli(["fleet", "provision", "--csv", str(csv), "-p", P, "--out", str(out)], keys)
    tokens = {
        d: json.loads((out / "devices" / d / "agent.json").read_text())["password"]
        for d in ("dev-a", "dev-b")
    }
    auth = AuthConfig(keys=str(keys))
    a = _device(broker.url, auth, "dev-a", tokens["dev-a"], clean_session=False)
    b = _device(broker.url, auth, "dev-b", tokens["dev-b"], clean_session=False)
    ctl = _controller(broker.url, auth, "rev")
    try:
        assert a.connect() == 0 and b.connect() == 0 and ctl.connect() == 0
        assert a.subscribe(T.device("r1", "dev-a", "task")) == [1]
        assert b.subscribe(T.device("r1", "dev-b", "task")) == [1]
        with caplog.at_level(logging.WARNING):
            start = time.monotonic()
            output = _cli(["fleet", "revoke", "dev-a", "--out", str(out)], keys)
            assert str(keys / "revoked.json") in output.replace("\n", "")
            assert a.dropped.wait(SWEEP_S + 2), "the revoked device is still connected"
        assert a.dropped_at is not None
        elapsed = a.dropped_at - start
        print(f"revocation-to-disconnect: {elapsed:.2f} s (sweep_s={SWEEP_S})")
        assert elapsed <= SWEEP_S + 2
        assert any(
            "dev-a" in r.getMessage() and "revoked" in r.getMessage() for r in caplog.records
        )
        # the same token cannot bring the persistent session back
        again = _device(broker.url, auth, "dev-a", tokens["dev-a"], clean_session=False)
        try:
            assert again.connect() == NOT_AUTHORIZED
        finally:
            again.close()
        # the other device stays connected and keeps receiving its tasks
        ctl.publish(T.device("r1", "dev-b", "task"), b"still here")
        assert [m.payload for m in b.wait_messages(1)] == [b"still here"]
        assert not b.dropped.is_set() and b.client.is_connected()
        stats = broker.stats()
        assert stats["disconnected_revoked"] == 1 and stats["refused_connect"] >= 1
    finally:
        for probe in (a, b, ctl):
            probe.close()


def test_a_token_expiring_while_connected_is_cut_off(keys: Path, broker: EmbeddedBroker) -> None:
    auth = AuthConfig(keys=str(keys))
    short = auth.issuer().issue("dev-t", Role.device, P, region="r1", ttl_s=3)
    exp = float(jwt.decode(short, options={"verify_signature": False})["exp"])
    dev = _device(broker.url, auth, "dev-t", short)
    other = _device(broker.url, auth, "dev-u")
    try:
        assert dev.connect() == 0 and other.connect() == 0
        assert not dev.dropped.wait(max(0.0, exp - time.time() - 0.5))  # valid until expiry
        assert dev.dropped.wait(exp + 0.5 + SWEEP_S + 2 - time.time()), "expired, still on"
        assert dev.dropped_at is not None
        print(f"expiry-to-disconnect: {time.time() - exp:.2f} s after exp (leeway 0.5 s)")
        assert broker.stats()["disconnected_expired"] == 1
        assert other.client.is_connected() and not other.dropped.is_set()
        again = _device(broker.url, auth, "dev-t", short)
        try:
            assert again.connect() == NOT_AUTHORIZED
        finally:
            again.close()
    finally:
        dev.close()
        other.close()


def _connects(url: str, auth: AuthConfig, name: str, token: str, within: float = 3.0) -> int:
    """CONNACK code of a fresh connect, retried while verifiers may still hold old keys."""
    deadline = time.monotonic() + within
    while True:
        probe = _device(url, auth, name, token)
        try:
            code = probe.connect()
        finally:
            probe.close()
        if code == 0 or time.monotonic() > deadline:
            return code
        time.sleep(0.2)


def _refused(url: str, auth: AuthConfig, name: str, token: str, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        probe = _device(url, auth, name, token)
        try:
            if probe.connect() == NOT_AUTHORIZED:
                return True
        finally:
            probe.close()
        time.sleep(0.2)
    return False


def test_key_rotation_and_retirement_on_a_running_broker(
    keys: Path, broker: EmbeddedBroker
) -> None:
    auth = AuthConfig(keys=str(keys))
    old_kid = KeyDir(keys).active_kid()
    old_token = auth.issuer().issue("dev-k", Role.device, P, region="r1")
    assert _connects(broker.url, auth, "dev-k", old_token) == 0
    _cli(["keys", "rotate", str(keys)], keys)
    new_kid = KeyDir(keys).active_kid()
    assert new_kid != old_kid
    listing = _cli(["keys", "list", str(keys)], keys)
    assert old_kid in listing and new_kid in listing and "yes" in listing
    new_token = auth.issuer().issue("dev-k", Role.device, P, region="r1")
    assert new_token != old_token
    # no restart: the broker picks the new key up from jwks.json
    assert _connects(broker.url, auth, "dev-k", new_token) == 0
    # during the overlap the old key still verifies
    assert _connects(broker.url, auth, "dev-k", old_token) == 0
    _cli(["keys", "retire", str(keys), old_kid], keys)
    assert _refused(broker.url, auth, "dev-k", old_token), "a retired key still verifies"
    assert _connects(broker.url, auth, "dev-k", new_token) == 0


def test_client_id_takeover_is_refused_and_the_victim_stays(
    keys: Path, broker: EmbeddedBroker
) -> None:
    auth = AuthConfig(keys=str(keys))
    victim = _device(broker.url, auth, "dev-v", clean_session=False)
    ctl = _controller(broker.url, auth, "take")
    try:
        assert victim.connect() == 0 and ctl.connect() == 0
        assert victim.subscribe(T.device("r1", "dev-v", "task")) == [1]
        before = broker.stats()["refused_client_id"]
        for client_id in (f"edgefl-{P}-dev-v", "dev-v", "anything-else"):
            thief = _device(broker.url, auth, "dev-x", client_id=client_id)
            try:
                assert thief.connect() == NOT_AUTHORIZED, client_id
            finally:
                thief.close()
        assert broker.stats()["refused_client_id"] == before + 3
        settle()
        assert not victim.dropped.is_set()
        ctl.publish(T.device("r1", "dev-v", "task"), b"for the victim")
        assert [m.payload for m in victim.wait_messages(1)] == [b"for the victim"]
        # a device's own id in either documented form is fine
        own = _device(broker.url, auth, "dev-x", client_id="dev-x")
        try:
            assert own.connect() == 0
        finally:
            own.close()
    finally:
        victim.close()
        ctl.close()


def test_services_connect_under_the_binding(tmp_path: Path, keys: Path) -> None:
    """The combiner's and controller's own client ids pass the binding (keys, embedded)."""
    with Deployment(tmp_path, project=P, auth=AuthConfig(keys=str(keys))) as dep:
        assert dep.broker.project == P
        (comb,) = dep.start_combiners(1)
        ctl = dep.start_controller()
        assert comb.conn.client_id == f"edgefl-{P}-combiner-region-0"
        assert ctl.conn.client_id.startswith(f"edgefl-{P}-controller-")
        assert dep.broker.stats()["refused_client_id"] == 0
        assert dep.broker.stats()["refused_connect"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["broker", "--port", "0"],
        ["controller"],
        ["combiner", "--region", "r0"],
        ["simulate"],
        ["dashboard"],
        ["demo", "--broker", "mqtt://127.0.0.1:1", "--no-dashboard"],
    ],
    ids=lambda a: a[0],
)
def test_server_commands_refuse_without_keys_or_secret(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    for name in AUTH_ENV:
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "EDGEFL_JWT_KEYS" in text and "EDGEFL_JWT_SECRET" in text and "--insecure" in text


def test_insecure_is_loud_and_keys_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, keys: Path
) -> None:
    for name in AUTH_ENV:
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING):
        assert require_auth(True) is None
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("EDGEFL_JWT_KEYS", str(keys))
    auth = require_auth(False)
    assert auth is not None and auth.keys == str(keys)
    assert auth.revocations_path() == keys / "revoked.json"
