"""The brokers' security and delivery guarantees, with real paho clients (MQTT 3.1.1).

JWT at CONNECT, topic ACLs, no silent insecurity on the embedded broker; retained messages
and persistent sessions on both brokers.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from edgefl.auth.tokens import (
    AuthError,
    Role,
    TokenIssuer,
    TokenVerifier,
    generate_secret,
)
from edgefl.broker.embedded import EmbeddedBroker, _SnapshotDict
from edgefl.broker.mosquitto import MosquittoProcess, find_mosquitto
from edgefl.protocol import Topics
from tests.brokers import NOT_AUTHORIZED, Probe, free_port, settle

SECRET = generate_secret()
ISSUER = TokenIssuer(SECRET)
T = Topics("p")


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(secret=SECRET) as broker:
        yield broker


def device(url: str, name: str, region: str = "r1", **kw: object) -> Probe:
    token = ISSUER.issue(name, Role.device, "p", region=region)
    return Probe(url, kw.pop("client_id", name), username=name, password=token, **kw)  # type: ignore[arg-type]


def controller(url: str, suffix: str = "ctl") -> Probe:
    """A controller login; its client id carries an instance suffix, as the real one's does."""
    token = ISSUER.issue("controller", Role.controller, "p")
    return Probe(url, f"edgefl-p-controller-{suffix}", username="controller", password=token)


# tokens -------------------------------------------------------------------------------
def test_token_round_trip_and_refusals() -> None:
    verifier = TokenVerifier(SECRET)
    claims = verifier.verify(ISSUER.issue("d1", Role.device, "p", region="r1"))
    assert (claims.subject, claims.role, claims.project, claims.region) == (
        "d1",
        Role.device,
        "p",
        "r1",
    )
    assert claims.expires > time.time() + 3600
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(ISSUER.issue("d1", Role.device, "p", "r1", ttl_s=-60))
    with pytest.raises(AuthError, match="signature"):
        verifier.verify(TokenIssuer(generate_secret()).issue("d1", Role.device, "p", "r1"))
    now = int(time.time())
    base = {"iss": "edgefl", "sub": "x", "exp": now + 60, "project": "p", "role": "admin"}
    with pytest.raises(AuthError, match="unknown role"):
        verifier.verify(jwt.encode({**base, "role": "root"}, SECRET, algorithm="HS256"))
    with pytest.raises(AuthError, match="project"):
        verifier.verify(jwt.encode({**base, "project": "a/b"}, SECRET, algorithm="HS256"))
    no_role = {k: v for k, v in base.items() if k != "role"}
    with pytest.raises(AuthError, match="'role'"):
        verifier.verify(jwt.encode(no_role, SECRET, algorithm="HS256"))
    no_exp = {k: v for k, v in base.items() if k != "exp"}
    with pytest.raises(AuthError, match="'exp'"):
        verifier.verify(jwt.encode(no_exp, SECRET, algorithm="HS256"))
    with pytest.raises(AuthError, match="no token"):
        verifier.verify(None)


def test_short_secret_and_bad_names_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenIssuer("short")
    with pytest.raises(ValueError, match="32 bytes"):
        TokenVerifier("x" * 31)
    with pytest.raises(ValueError, match="region"):
        ISSUER.issue("d1", Role.device, "p")
    with pytest.raises(ValueError):
        ISSUER.issue("+", Role.device, "p", region="r1")  # would be a topic wildcard
    with pytest.raises(ValueError):
        ISSUER.issue("c", Role.combiner, "p", region="#")
    assert len(generate_secret()) >= 64


# CONNECT ------------------------------------------------------------------------------
def test_valid_device_token_connects(secure_broker: EmbeddedBroker) -> None:
    with device(secure_broker.url, "d1") as d:
        assert d.connect() == 0


@pytest.mark.parametrize(
    "case", ["bad-signature", "expired", "wrong-subject", "no-token", "garbage", "no-username"]
)
def test_bad_credentials_are_refused(secure_broker: EmbeddedBroker, case: str) -> None:
    token = {
        "bad-signature": TokenIssuer(generate_secret()).issue("d1", Role.device, "p", "r1"),
        "expired": ISSUER.issue("d1", Role.device, "p", "r1", ttl_s=-60),
        "wrong-subject": ISSUER.issue("someone-else", Role.device, "p", "r1"),
        "no-token": None,
        "garbage": "not-a-jwt",
        "no-username": None,
    }[case]
    user = None if case == "no-username" else "d1"
    probe = Probe(secure_broker.url, f"bad-{case}", username=user, password=token)
    try:
        assert probe.connect() == NOT_AUTHORIZED
    finally:
        probe.close()


def test_refused_connect_leaves_persistent_session_alone(secure_broker: EmbeddedBroker) -> None:
    """amqtt bound a CONNECT to the stored session before authenticating it."""
    url = secure_broker.url
    dev = device(url, "keep1", clean_session=False)
    assert dev.connect() == 0
    assert dev.subscribe(T.device("r1", "keep1", "task")) == [1]
    dev.close()
    intruder = Probe(url, "keep1", username="keep1", password="wrong", clean_session=False)
    assert intruder.connect() == NOT_AUTHORIZED
    intruder.close()
    # a clean-session intruder must not wipe the stored session either
    intruder = Probe(url, "keep1", username="keep1", password="wrong", clean_session=True)
    assert intruder.connect() == NOT_AUTHORIZED
    intruder.close()
    with controller(url) as ctl:
        assert ctl.connect() == 0
        ctl.publish(T.device("r1", "keep1", "task"), b"queued", qos=1)
        settle()
    dev = device(url, "keep1", clean_session=False)
    try:
        assert dev.connect() == 0 and dev.session_present
        assert [m.payload for m in dev.wait_messages(1)] == [b"queued"]
    finally:
        dev.close()


def test_client_id_of_another_identity_is_refused(secure_broker: EmbeddedBroker) -> None:
    url = secure_broker.url
    with device(url, "owner", client_id="edgefl-p-owner", clean_session=False) as owner:
        assert owner.connect() == 0
        for client_id in ("edgefl-p-owner", "owner", "shared-id"):  # not its identity
            other = device(url, "other", client_id=client_id)
            try:
                assert other.connect() == NOT_AUTHORIZED, client_id
            finally:
                other.close()
    # a name that fits two identities (a device called controller-x, a controller's
    # instance suffix): the session's holder keeps it
    with device(url, "controller-x", client_id="edgefl-p-controller-x", clean_session=False) as d:
        assert d.connect() == 0
        ctl = controller(url, "x")
        try:
            assert ctl.connect() == NOT_AUTHORIZED
        finally:
            ctl.close()


def test_deliveries_follow_current_claims(secure_broker: EmbeddedBroker) -> None:
    """A device moved to another region keeps its client id, not its old region's tasks."""
    url = secure_broker.url
    dev = device(url, "mv1", region="r1", clean_session=False)
    assert dev.connect() == 0 and dev.subscribe(T.device("r1", "mv1", "task")) == [1]
    dev.close()
    dev = device(url, "mv1", region="r2", clean_session=False)
    try:
        assert dev.connect() == 0 and dev.session_present
        assert dev.subscribe(T.device("r2", "mv1", "task")) == [1]
        with controller(url, "ctl-mv") as ctl:
            assert ctl.connect() == 0
            ctl.publish(T.device("r1", "mv1", "task"), b"old region")
            ctl.publish(T.device("r2", "mv1", "task"), b"new region")
        dev.wait_messages(1)
        settle()
        assert [m.payload for m in dev.messages] == [b"new region"]
    finally:
        dev.close()


def test_last_will_on_another_device_topic_is_refused(secure_broker: EmbeddedBroker) -> None:
    spoof = device(secure_broker.url, "d5", will=(T.device("r1", "d6", "status"), b"offline"))
    own = device(secure_broker.url, "d6", will=(T.device("r1", "d6", "status"), b"offline"))
    try:
        assert spoof.connect() == NOT_AUTHORIZED
        assert own.connect() == 0
    finally:
        spoof.close()
        own.close()


# ACLs ---------------------------------------------------------------------------------
def test_device_publishes_only_as_itself(secure_broker: EmbeddedBroker) -> None:
    url = secure_broker.url
    with controller(url, "ctl-acl") as ctl, device(url, "d1", client_id="edgefl-p-d1") as dev:
        assert ctl.connect() == 0 and dev.connect() == 0
        assert ctl.subscribe("edgefl/v1/p/#") == [1]
        dev.publish(T.device("r1", "d2", "update"), b"spoof")  # another device
        dev.publish(T.device("r2", "d1", "update"), b"wrong region")
        dev.publish(T.device("r1", "d1", "task"), b"not a device channel")
        dev.publish("edgefl/v1/q/r1/dev/d1/update", b"other project")
        dev.publish(T.device("r1", "d1", "update"), b"mine")
        ctl.wait_messages(1)
        settle(0.5)
        assert ctl.topics() == [T.device("r1", "d1", "update")]
        assert ctl.messages[0].payload == b"mine"


def test_device_subscriptions_are_confined(secure_broker: EmbeddedBroker) -> None:
    with device(secure_broker.url, "d3") as dev:
        assert dev.connect() == 0
        codes = dev.subscribe(
            T.device("r1", "d3", "task"),
            "edgefl/v1/p/#",
            T.device("r1", "d4", "task"),
            T.model_filter("v1"),
            "$SYS/#",
            "edgefl/v1/p/model/+/+",
        )
        assert codes == [1, 0x80, 0x80, 1, 0x80, 0x80]


def test_retained_at_connect_only_for_own_subscriptions(secure_broker: EmbeddedBroker) -> None:
    """amqtt sent a connecting client the retained messages of everyone's filters."""
    url = secure_broker.url
    other = device(url, "rt-other", clean_session=False)
    assert other.connect() == 0
    assert other.subscribe(T.device("r1", "rt-other", "task")) == [1]
    with controller(url, "ctl-rt") as ctl:
        assert ctl.connect() == 0
        ctl.publish(T.device("r1", "rt-other", "task"), b"secret task", retain=True)
        ctl.publish(T.model_chunk("v3", 0), b"chunk-0", retain=True)
        settle()
    snoop = device(url, "rt-snoop", clean_session=False)
    try:
        assert snoop.connect() == 0
        assert snoop.subscribe(T.model_filter("v3")) == [1]
        got = snoop.wait_messages(1)
        snoop.close()
        snoop = device(url, "rt-snoop", clean_session=False)  # reconnect: CONNECT path
        assert snoop.connect() == 0 and snoop.session_present
        settle(0.5)
        got += snoop.messages
        assert {m.topic for m in got} == {T.model_chunk("v3", 0)}
        assert all(m.retain for m in got)
    finally:
        snoop.close()
        other.close()
        with controller(url, "ctl-rt") as ctl:  # clear the retained messages again
            ctl.connect()
            ctl.publish(T.device("r1", "rt-other", "task"), b"", retain=True)
            ctl.publish(T.model_chunk("v3", 0), b"", retain=True)


# persistent sessions and retained messages, on every broker -----------------------------
def test_persistent_session_gets_qos1_sent_while_offline(broker_url: str) -> None:
    def make(clean_session: bool) -> Probe:
        return Probe(broker_url, "pd1-anon", clean_session=clean_session)

    task = T.device("r1", "pd1", "task")
    dev = make(False)
    assert dev.connect() == 0 and dev.subscribe(task) == [1]
    dev.close()
    settle()
    with Probe(broker_url) as ctl:
        assert ctl.connect() == 0
        ctl.publish(task, b"while you were away", qos=1)
        settle()
    dev = make(False)
    try:
        assert dev.connect() == 0 and dev.session_present
        assert [m.payload for m in dev.wait_messages(1)] == [b"while you were away"]
        assert dev.messages[0].qos == 1
    finally:
        dev.close()


def test_persistent_session_with_tokens(secure_broker: EmbeddedBroker) -> None:
    url = secure_broker.url
    task = T.device("r1", "pd1", "task")
    dev = device(url, "pd1", clean_session=False)
    assert dev.connect() == 0 and dev.subscribe(task) == [1]
    dev.close()
    settle()
    with controller(url, "ctl-offline") as ctl:
        assert ctl.connect() == 0
        ctl.publish(task, b"one", qos=1)
        ctl.publish(task, b"two", qos=1)
        settle()
    dev = device(url, "pd1", clean_session=False)
    try:
        assert dev.connect() == 0 and dev.session_present
        assert sorted(m.payload for m in dev.wait_messages(2)) == [b"one", b"two"]
    finally:
        dev.close()


def test_retained_message_round_trip(broker_url: str) -> None:
    topic = T.model_chunk(f"rt{free_port()}", 0)
    with Probe(broker_url) as pub:
        assert pub.connect() == 0
        pub.publish(topic, b"model chunk", qos=1, retain=True)
        settle()
    with Probe(broker_url) as sub:
        assert sub.connect() == 0
        assert sub.subscribe(topic) == [1]
        (msg,) = sub.wait_messages(1)
        assert (msg.topic, msg.payload, msg.retain) == (topic, b"model chunk", True)
        sub.publish(topic, b"", retain=True)  # clear it


def test_mosquitto_process_round_trips_a_retained_message(tmp_path: Path) -> None:
    with MosquittoProcess(workdir=tmp_path) as mq:
        assert mq.port and mq.url == f"mqtt://127.0.0.1:{mq.port}"
        assert "max_packet_size 16777216" in (tmp_path / "mosquitto.conf").read_text()
        with Probe(mq.url) as pub:
            assert pub.connect() == 0
            pub.publish("edgefl/v1/p/ctl/status", b"online", retain=True)
        with Probe(mq.url) as sub:
            assert sub.connect() == 0
            sub.subscribe("edgefl/v1/p/ctl/status")
            (msg,) = sub.wait_messages(1)
            assert msg.payload == b"online" and msg.retain
    assert mq.proc is None
    mq.stop()  # idempotent


def test_mosquitto_failure_shows_its_log(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no_such_option"):
        MosquittoProcess(workdir=tmp_path, config_extra="no_such_option 1").start(timeout=5)


# construction, ports, lifecycle --------------------------------------------------------
def test_no_secret_and_no_flag_refuses_to_build() -> None:
    with pytest.raises(ValueError, match=r"secret.*allow_anonymous"):
        EmbeddedBroker()
    with pytest.raises(ValueError, match="32 bytes"):
        EmbeddedBroker(secret="too-short")


def test_insecure_flag_is_loud(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING),
        EmbeddedBroker(allow_anonymous=True) as broker,
        Probe(broker.url) as anon,
    ):
        assert anon.connect() == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("INSECURE" in r.getMessage() and "any client" in r.getMessage() for r in warnings)


def test_port_zero_binds_loopback_and_stop_is_idempotent() -> None:
    a = EmbeddedBroker(secret=SECRET).start()
    b = EmbeddedBroker(secret=SECRET).start()
    try:
        assert a.port and b.port and a.port != b.port
        assert a.host == "127.0.0.1" and a.url == f"mqtt://127.0.0.1:{a.port}"
    finally:
        a.stop()
        b.stop()
    a.stop()
    with (
        pytest.raises(RuntimeError, match="failed to start"),
        EmbeddedBroker(port=b.port, secret=SECRET),
        EmbeddedBroker(port=b.port, secret=SECRET),
    ):
        pass


def test_broadcast_survives_subscribe_churn(
    secure_broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """amqtt's broadcast raised 'dictionary changed size during iteration' here."""
    url, n = secure_broker.url, 1000
    topic = T.combiner("churn", "round")
    with controller(url, "ctl-churn") as ctl, controller(url, "ctl-subs") as subs:
        assert ctl.connect() == 0 and subs.connect() == 0
        assert ctl.subscribe(topic) == [1]
        stop = threading.Event()

        def churn() -> None:
            i = 0
            while not stop.is_set():
                subs.client.subscribe(T.combiner(f"c{i}", "round"), 0)
                i += 1
                time.sleep(0.0005)

        worker = threading.Thread(target=churn)
        with caplog.at_level(logging.ERROR):
            worker.start()
            try:
                for _ in range(n):
                    ctl.client.publish(topic, b"x", qos=0)
                got = ctl.wait_messages(n, timeout=20)
            finally:
                stop.set()
                worker.join()
        assert len(got) == n
        assert not [r for r in caplog.records if "changed size" in str(r.exc_info or r.msg)]


def test_subscription_dict_survives_changes_while_iterated() -> None:
    subs = _SnapshotDict({"a": [1], "b": [2]})
    for key, value in subs.items():
        subs[key + "x"] = value  # plain dict: RuntimeError (dict changed size)
        value.append(0)  # copies: the stored lists are untouched
    for key in subs:
        del subs[key]
    assert subs == {}


def test_shipped_mosquitto_conf_runs(tmp_path: Path) -> None:
    """broker_config/mosquitto.conf + acl.conf start a real Mosquitto that enforces auth."""
    shipped = Path(__file__).resolve().parents[1] / "broker_config"
    port = free_port()
    conf = (shipped / "mosquitto.conf").read_text()
    assert "listener 1883 127.0.0.1" in conf and "allow_anonymous false" in conf
    conf = conf.replace("/etc/mosquitto/edgefl/", f"{tmp_path}/")
    conf = conf.replace("/var/lib/mosquitto/", f"{tmp_path}/")
    conf = conf.replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
    (tmp_path / "mosquitto.conf").write_text(conf + "\nuser root\n")
    (tmp_path / "acl.conf").write_text((shipped / "acl.conf").read_text())
    (tmp_path / "passwd").touch()
    subprocess.run(
        ["mosquitto_passwd", "-b", str(tmp_path / "passwd"), "controller", "pw"], check=True
    )
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"mqtt://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.05)
        with Probe(url, username="controller", password="pw") as ctl:
            assert ctl.connect() == 0
            assert ctl.subscribe("edgefl/v1/default/ctl/status") == [1]
            ctl.publish("edgefl/v1/default/ctl/status", b"online")
            assert [m.payload for m in ctl.wait_messages(1)] == [b"online"]
        with Probe(url) as anon:
            assert anon.connect() != 0
    finally:
        proc.terminate()
        proc.wait(5)
