"""Fleet provisioning (edgefl fleet) against a real Mosquitto using the generated files.

One broker with two listeners, as broker_config/mosquitto.conf sets it up: the server
listener (controller, combiners; client ids free) and the device listener with
``use_username_as_clientid true``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_agent.config import load_config
from edgefl.auth.acl import allowed, mosquitto_device_block, mosquitto_fleet_acl
from edgefl.auth.revocation import revoke_subject
from edgefl.auth.tokens import Claims, Role, TokenVerifier, generate_secret
from edgefl.broker.mosquitto import MosquittoProcess, _free_port
from edgefl.cli.fleet import fleet_app
from edgefl.fleet.provision import (
    ProvisionError,
    Registry,
    fleet_records,
    provision,
    read_devices_csv,
    revoke,
    sync,
)
from edgefl.protocol import Topics, decode
from edgefl.transport import MqttConnection

P = "p"
T = Topics(P)


def write_csv(path: Path, rows: list[tuple[str, str]], extra: str = "") -> Path:
    head = "device_id,region" + (",notes" if extra else "")
    body = [f"{d},{r}" + (f",{extra}" if extra else "") for d, r in rows]
    path.write_text("\n".join([head, *body]) + "\n")
    return path


def bundle(out: Path, dev: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((out / "devices" / dev / "agent.json").read_text())
    return data


def server_login(out: Path, name: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((out / "servers" / f"{name}.json").read_text())
    return data


def passwd_users(out: Path) -> list[str]:
    return [line.split(":", 1)[0] for line in (out / "broker" / "passwd").read_text().splitlines()]


class Fleet:
    """A provisioned fleet folder and a Mosquitto reading its passwd and acl.conf."""

    def __init__(self, tmp: Path, mq: MosquittoProcess, device_port: int) -> None:
        self.tmp = tmp
        self.out = tmp / "fleet"
        self.mq = mq
        self.device_url = f"mqtt://127.0.0.1:{device_port}"
        self.conns: list[MqttConnection] = []

    def device(
        self, dev: str, client_id: str | None = None, url: str | None = None
    ) -> MqttConnection:
        b = bundle(self.out, dev)
        c = MqttConnection(
            url or self.device_url,
            client_id or f"edgefl-{P}-{dev}",
            username=b["username"],
            password=b["password"],
            clean_session=True,
            min_backoff_s=0.1,
            max_backoff_s=0.5,
        )
        self.conns.append(c)
        return c.start(5)

    def controller(self) -> MqttConnection:
        login = server_login(self.out, "controller")
        c = MqttConnection(
            self.mq.url,
            f"ctl-{len(self.conns)}",
            username=login["username"],
            password=login["password"],
            clean_session=True,
        )
        self.conns.append(c)
        return c.start(5)

    def reload(self) -> None:
        assert self.mq.proc is not None
        self.mq.proc.send_signal(1)  # SIGHUP: Mosquitto re-reads passwd and acl.conf


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    out = tmp / "fleet"
    rows = [("dev-a", "r1"), ("dev-b", "r1"), ("dev-c", "r2")]
    provision(write_csv(tmp / "devices.csv", rows), P, out)
    device_port = _free_port()
    extra = (
        f"password_file {out / 'broker' / 'passwd'}\n"
        f"acl_file {out / 'broker' / 'acl.conf'}\n"
        f"listener {device_port} 127.0.0.1\n"
        "use_username_as_clientid true\n"
    )
    with MosquittoProcess(config_extra=extra, workdir=tmp / "mq", allow_anonymous=False) as mq:
        f = Fleet(tmp, mq, device_port)
        try:
            yield f
        finally:
            for c in f.conns:
                c.stop()


class Collector:
    """Topics received by a subscription, with a sentinel to know everything before it came."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel
        self.topics: list[str] = []
        self.done = threading.Event()

    def __call__(self, topic: str, payload: bytes) -> None:
        if topic == self.sentinel and payload == b"END":
            self.done.set()
        else:
            self.topics.append(topic)


def sample_topics() -> list[str]:
    """Concrete protocol topics: dev-a's own, dev-a's under another region, others', servers'."""
    topics = []
    for region, dev in (("r1", "dev-a"), ("r2", "dev-a"), ("r1", "dev-b"), ("r2", "dev-c")):
        topics += [T.device(region, dev, ch) for ch in ("task", "update", "status", "request")]
    topics += [T.device("r1", "dev-a", "telemetry"), T.model_chunk("v7", 0), T.model_chunk("v7", 3)]
    topics += [T.combiner("r1", "round"), T.combiner("r1", "partial"), T.controller_status()]
    topics += ["edgefl/v1/other/r1/dev/dev-a/update", "edgefl/v1/p/x"]
    return topics


def test_device_block_on_mosquitto_equals_allowed(fleet: Fleet) -> None:
    """For a sample of topics, what Mosquitto lets dev-a publish and read is what allowed() says."""
    claims = Claims("dev-a", Role.device, P, "r1", 0.0)
    sample = sample_topics()
    ctl = fleet.controller()
    dev = fleet.device("dev-a")
    # publish: the controller sees only what the broker let through
    sentinel = T.device("r1", "dev-a", "telemetry")
    got = Collector(sentinel)
    ctl.subscribe("edgefl/#", got)
    time.sleep(0.3)
    for topic in sample:
        dev.publish(topic, b"x").wait_for_publish(5)
    dev.publish(sentinel, b"END").wait_for_publish(5)
    assert got.done.wait(5)
    expected = [t for t in sample if allowed(claims, t, "publish") and T.base in t]
    assert sorted(got.topics) == sorted(expected)
    assert T.device("r2", "dev-a", "status") not in got.topics  # the measured problem
    ctl.unsubscribe("edgefl/#")
    # read: Mosquitto checks reads at delivery, so subscribe to everything and see what comes
    sentinel = T.device("r1", "dev-a", "task")
    seen = Collector(sentinel)
    dev.subscribe("edgefl/#", seen)
    time.sleep(0.3)
    for topic in sample:
        ctl.publish(topic, b"x").wait_for_publish(5)
    ctl.publish(sentinel, b"END").wait_for_publish(5)
    assert seen.done.wait(5)
    expected = [t for t in sample if allowed(claims, t, "subscribe")]
    assert sorted(seen.topics) == sorted(expected)
    assert expected  # the sample covers allowed reads (own task, model chunks)
    dev.stop()
    ctl.stop()


def test_retained_status_under_another_region_is_not_delivered(fleet: Fleet) -> None:
    dev = fleet.device("dev-b")
    for region in ("r2", "r1"):
        dev.publish(T.device(region, "dev-b", "status"), b"online", retain=True).wait_for_publish(5)
    dev.stop()
    ctl = fleet.controller()
    got: list[str] = []
    ctl.subscribe(T.device_wildcard(None, "status"), lambda t, _p: got.append(t))
    time.sleep(0.8)
    assert T.device("r1", "dev-b", "status") in got  # its own region's status is kept
    assert T.device("r2", "dev-b", "status") not in got
    ctl.stop()


def test_client_id_takeover_is_refused_on_the_device_listener(fleet: Fleet) -> None:
    a = fleet.device("dev-a")
    b = fleet.device("dev-b", client_id=f"edgefl-{P}-dev-a")  # dev-b claims dev-a's client id
    ctl = fleet.controller()
    got = threading.Event()
    ctl.subscribe(T.device("r1", "dev-a", "update"), lambda _t, _p: got.set())
    time.sleep(1.0)
    assert a.connected.is_set()
    assert a.connect_count == 1
    assert b.connected.is_set()
    a.publish(T.device("r1", "dev-a", "update"), b"still here").wait_for_publish(5)
    assert got.wait(5)
    b.stop()
    a.stop()
    # the same attempt on the server listener (no binding) does kick the victim off: this is
    # why devices must only reach listeners with use_username_as_clientid
    victim = fleet.device("dev-a", url=fleet.mq.url)
    thief = fleet.device("dev-b", client_id=f"edgefl-{P}-dev-a", url=fleet.mq.url)
    end = time.monotonic() + 5
    while victim.connect_count < 2 and time.monotonic() < end:
        time.sleep(0.05)
    assert victim.connect_count >= 2
    thief.stop()
    victim.stop()
    ctl.stop()


def test_a_queued_task_survives_a_takeover_attempt(fleet: Fleet) -> None:
    """dev-a's persistent session keeps a task queued while dev-b connects with its client id."""
    task = T.device("r1", "dev-a", "task")
    b = bundle(fleet.out, "dev-a")

    def persistent() -> tuple[MqttConnection, list[bytes]]:
        got: list[bytes] = []
        c = MqttConnection(
            fleet.device_url,
            f"edgefl-{P}-dev-a",
            username=b["username"],
            password=b["password"],
            clean_session=False,
        )
        c.subscribe(task, lambda _t, p: got.append(p))
        return c.start(5), got

    a, _ = persistent()
    time.sleep(0.3)
    a.stop()  # offline; its session (client id = username) keeps the subscription
    thief = fleet.device("dev-b", client_id=f"edgefl-{P}-dev-a", url=fleet.device_url)
    ctl = fleet.controller()
    ctl.publish(task, b"round-1").wait_for_publish(5)
    time.sleep(0.3)
    thief.stop()
    a, got = persistent()
    end = time.monotonic() + 5
    while not got and time.monotonic() < end:
        time.sleep(0.05)
    assert got == [b"round-1"]
    a.stop()
    ctl.stop()


def test_revoke_and_reprovision_on_a_live_broker(fleet: Fleet) -> None:
    c = fleet.device("dev-c")
    a = fleet.device("dev-a")
    assert fleet.mq.proc is not None
    revoke(fleet.out, "dev-c", reload_pid=fleet.mq.proc.pid)
    end = time.monotonic() + 5
    while c.connected.is_set() and time.monotonic() < end:
        time.sleep(0.05)
    assert not c.connected.is_set()  # the reload disconnected it
    time.sleep(0.5)
    assert not c.connected.is_set()  # and it cannot come back
    assert c.last_refusal is not None
    assert "authori" in c.last_refusal.lower()
    assert a.connected.is_set()
    assert a.connect_count == 1
    # a new device, provisioned while the broker runs, connects after a reload
    rows = [("dev-a", "r1"), ("dev-b", "r1"), ("dev-c", "r2"), ("dev-d", "r3")]
    report = provision(write_csv(fleet.tmp / "more.csv", rows), P, fleet.out)
    assert report.added == ["dev-d"]
    assert report.skipped_revoked == ["dev-c"]
    fleet.reload()
    time.sleep(0.5)
    d = fleet.device("dev-d")
    assert d.connected.is_set()
    guess = MqttConnection(fleet.device_url, "x", username="dev-c", password="guess")
    with pytest.raises(ConnectionError):
        guess.start(2)
    d.stop()
    a.stop()
    c.stop()


def test_provisioning_is_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    rows = [(f"dev-{i}", f"r{i % 2}") for i in range(6)]
    first = provision(write_csv(tmp_path / "a.csv", rows, extra="ignored"), P, out)
    assert first.added == [d for d, _ in rows]
    assert sorted(first.servers_added) == ["combiner-r0", "combiner-r1", "controller"]
    before = {d: bundle(out, d)["password"] for d, _ in rows}
    passwd_before = (out / "broker" / "passwd").read_text()
    again = provision(write_csv(tmp_path / "b.csv", [*rows, ("dev-new", "r2")]), P, out)
    assert again.kept == [d for d, _ in rows]
    assert again.added == ["dev-new"]
    assert again.servers_added == ["combiner-r2"]
    assert {d: bundle(out, d)["password"] for d, _ in rows} == before
    users = passwd_users(out)
    assert len(users) == len(set(users)) == len(rows) + 1 + 4
    for line in passwd_before.splitlines():  # existing hashes are kept byte for byte
        assert line in (out / "broker" / "passwd").read_text()
    acl = (out / "broker" / "acl.conf").read_text()
    assert acl.count("user dev-0\n") == 1
    assert "pattern" not in acl.replace("'pattern'", "")
    # a deleted bundle is re-issued with a new password; the old one stops working
    (out / "devices" / "dev-1" / "agent.json").unlink()
    third = provision(tmp_path / "b.csv", P, out)
    assert third.rotated == ["dev-1"]
    assert bundle(out, "dev-1")["password"] != before["dev-1"]
    # a revoked device stays revoked; a region change or another project is refused
    revoke(out, "dev-2")
    assert "dev-2" not in passwd_users(out)
    assert "user dev-2\n" not in (out / "broker" / "acl.conf").read_text()
    assert not (out / "devices" / "dev-2").exists()
    assert provision(tmp_path / "b.csv", P, out).skipped_revoked == ["dev-2"]
    assert "dev-2" not in passwd_users(out)
    status = {r["device"]: r["status"] for r in fleet_records(out)}
    assert status["dev-2"] == "revoked"
    assert status["dev-3"] == "active"
    with pytest.raises(ProvisionError, match="registered in region 'r1'"):
        provision(write_csv(tmp_path / "c.csv", [("dev-3", "r9")]), P, out)
    with pytest.raises(ProvisionError, match="project 'p'"):
        provision(tmp_path / "b.csv", "other", out)
    with pytest.raises(ProvisionError, match="not in the registry"):
        revoke(out, "nobody")
    registry = Registry.path(out).read_text()
    assert bundle(out, "dev-0")["password"] not in registry  # the registry holds hashes only
    assert (out / "fleet.json").stat().st_mode & 0o077 == 0
    assert (out / "devices" / "dev-0" / "agent.json").stat().st_mode & 0o077 == 0


def test_bundle_is_an_agent_config_and_jwt_mode(tmp_path: Path) -> None:
    secret = generate_secret()
    out = tmp_path / "fleet"
    provision(
        write_csv(tmp_path / "d.csv", [("dev-a", "r1")]),
        P,
        out,
        broker_url="mqtts://broker.example:8883",
        secret=secret,
    )
    cfg = load_config(out / "devices" / "dev-a" / "agent.json", env={})
    assert (cfg.device_id, cfg.region, cfg.project, cfg.username) == ("dev-a", "r1", P, "dev-a")
    assert cfg.broker_url == "mqtts://broker.example:8883"
    assert cfg.password is not None
    claims = TokenVerifier(secret).verify(cfg.password)
    assert (claims.subject, claims.role, claims.region) == ("dev-a", Role.device, "r1")
    assert claims.expires > time.time() + 300 * 86400
    comb = TokenVerifier(secret).verify(server_login(out, "combiner-r1")["password"])
    assert (comb.role, comb.region) == (Role.combiner, "r1")


def test_keys_ca_cert_and_the_revocation_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens signed with the active key, the CA copied into bundles, revoke reaches the
    list every verifier reads."""
    import jwt

    from edgefl.auth.ca import cert_pem, make_ca
    from edgefl.auth.keys import KeyDir
    from edgefl.auth.revocation import RevocationList
    from edgefl.auth.tokens import AuthConfig, AuthError

    keys = KeyDir(tmp_path / "keys")
    kid = keys.init()
    auth = AuthConfig(keys=str(keys.path))
    ca = tmp_path / "ca.crt"
    ca.write_bytes(cert_pem(make_ca().cert))
    out = tmp_path / "fleet"
    provision(write_csv(tmp_path / "a.csv", [("dev-a", "r1")]), P, out, auth=auth)
    assert "ca_file" not in bundle(out, "dev-a")
    token = bundle(out, "dev-a")["password"]
    assert jwt.get_unverified_header(token)["kid"] == kid
    assert auth.verifier(project=P).verify(token).subject == "dev-a"
    # adding the CA later: new bundles and kept ones (same password) get it
    csv_ab = write_csv(tmp_path / "ab.csv", [("dev-a", "r1"), ("dev-b", "r1")])
    provision(csv_ab, P, out, auth=auth, ca_cert=ca)
    for dev in ("dev-a", "dev-b"):
        folder = out / "devices" / dev
        assert (folder / "ca.crt").read_bytes() == ca.read_bytes()
        assert bundle(out, dev)["ca_file"] == "ca.crt"
        monkeypatch.chdir(tmp_path)  # resolved next to agent.json, from any folder
        assert load_config(folder / "agent.json", env={}).ca_file == str(folder / "ca.crt")
    assert bundle(out, "dev-a")["password"] == token
    with pytest.raises(ProvisionError, match="PEM"):
        provision(csv_ab, P, out, auth=auth, ca_cert=tmp_path / "a.csv")
    # revoke: the default list is DIR/revoked.json; a verifier reading it refuses the token
    revoke(out, "dev-a")
    listed = RevocationList(out / "revoked.json")
    assert listed.revoked("dev-a", None, time.time() - 1)
    assert not listed.revoked("dev-b", None, time.time() - 1)
    checker = AuthConfig(keys=str(keys.jwks_path), revocations=str(out / "revoked.json"))
    with pytest.raises(AuthError, match="revoked"):
        checker.verifier(project=P).verify(token)
    assert checker.verifier(project=P).verify(bundle(out, "dev-b")["password"])
    # the CLI: --revocations names another list
    other = tmp_path / "elsewhere" / "revoked.json"
    res = CliRunner().invoke(
        fleet_app, ["revoke", "dev-b", "--out", str(out), "--revocations", str(other)], env={}
    )
    assert res.exit_code == 0, res.output
    assert RevocationList(other).revoked("dev-b", None, time.time() - 1)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("device,region\nd1,r1\n", "lacks column"),
        ("device_id,region\nd+1,r1\n", ":2: invalid device_id"),
        ("device_id,region\nd1,r1\n\nd1,r2\n", "already on line 2"),
        ("device_id,region\nd1,\n", "invalid region"),
    ],
)
def test_csv_errors_name_the_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(ProvisionError, match=error):
        read_devices_csv(path)


def test_fleet_acl_refuses_collisions() -> None:
    with pytest.raises(ValueError, match="twice"):
        mosquitto_fleet_acl(P, [("r1", "d1"), ("r2", "d1")])
    with pytest.raises(ValueError, match="server account"):
        mosquitto_fleet_acl(P, [("r1", "controller")])
    with pytest.raises(ValueError, match="region"):
        mosquitto_device_block(P, "+", "d1")


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    for cmd in ("provision", "revoke", "list"):
        res = runner.invoke(fleet_app, [cmd, "--help"])
        assert res.exit_code == 0
        assert "--out" in res.output
    csv_path = write_csv(tmp_path / "d.csv", [("dev-a", "r1"), ("dev-b", "r2")])
    out = str(tmp_path / "fleet")
    res = runner.invoke(fleet_app, ["provision", "--csv", str(csv_path), "-p", P, "--out", out])
    assert res.exit_code == 0, res.output
    assert "2 added" in res.output
    res = runner.invoke(fleet_app, ["revoke", "dev-b", "--out", out])
    assert res.exit_code == 0
    assert "kill -HUP" in res.output
    assert "dev-b" in (tmp_path / "fleet" / "revoked.json").read_text()
    res = runner.invoke(fleet_app, ["list", "--out", out])
    assert res.exit_code == 0
    assert "dev-a" in res.output
    assert "revoked" in res.output
    assert "active" in res.output
    res = runner.invoke(fleet_app, ["revoke", "dev-z", "--out", out])
    assert res.exit_code == 1
    assert "not in the registry" in res.output


def test_combiner_cli_logs_in_with_provisioned_logins(fleet: Fleet) -> None:
    """Mosquitto compares passwords: `edgefl combiner --logins DIR` must use the provisioned
    one (a freshly minted token would be refused)."""
    import subprocess
    import sys

    ctl = fleet.controller()
    online = threading.Event()

    def on_status(_topic: str, payload: bytes) -> None:
        if payload and decode(payload, "status")["state"] == "online":
            online.set()

    ctl.subscribe(T.combiner("r1", "status"), on_status)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}
    cmd = [sys.executable, "-m", "edgefl.cli.main", "combiner", "--region", "r1"]
    cmd += ["--broker", fleet.mq.url, "--project", P, "--logins", str(fleet.out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        came = online.wait(20)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert came, f"the combiner never came online with its login: {out.decode()[-2000:]}"
    assert b"Traceback" not in out, out.decode()


def test_sync_drops_expired_and_listed_accounts(tmp_path: Path) -> None:
    """Mosquitto sees neither expiry nor the revocation list; `fleet sync` carries both."""
    out = tmp_path / "fleet"
    secret = generate_secret()
    provision(write_csv(tmp_path / "a.csv", [("dev-a", "r1")]), P, out, auth=secret)
    provision(write_csv(tmp_path / "b.csv", [("dev-b", "r1")]), P, out, auth=secret, token_ttl_s=60)
    rep = sync(out)
    assert (rep.expired, rep.revoked, rep.changed) == ([], [], False)
    assert set(passwd_users(out)) >= {"dev-a", "dev-b"}
    rep = sync(out, now=time.time() + 3600)  # dev-b's hour-old token has expired
    assert rep.expired == ["dev-b"] and rep.changed
    assert "dev-b" not in passwd_users(out)
    assert "dev-b" not in (out / "broker" / "acl.conf").read_text()
    # the admin API writes only the revocation list; sync carries it to Mosquitto
    revoke_subject(out / "revoked.json", "dev-a")
    rep = sync(out, revocations=out / "revoked.json")
    assert "dev-a" in rep.revoked and rep.changed
    assert "dev-a" not in passwd_users(out)
    assert "controller" in passwd_users(out)
    runner = CliRunner()
    res = runner.invoke(fleet_app, ["sync", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "left out" in res.output
