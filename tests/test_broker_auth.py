"""The embedded broker's security: JWT at CONNECT, topic ACLs, and no silent insecurity."""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.auth.tokens import Role, TokenIssuer, generate_secret
from edgefl.broker.embedded import EmbeddedBroker
from edgefl.protocol import Topics
from edgefl.transport import MqttConnection

SECRET = generate_secret()
T = Topics("p")


@pytest.fixture(scope="module")
def secure_broker():  # noqa: ANN201
    with EmbeddedBroker(secret=SECRET) as broker:
        yield broker


def _connect(url: str, user: str | None, token: str | None, cid: str) -> MqttConnection:
    return MqttConnection(url, cid, username=user, password=token, clean_session=True).start(5)


def test_valid_device_token_connects_and_acl_applies(secure_broker) -> None:  # noqa: ANN001
    issuer = TokenIssuer(SECRET)
    ctl = _connect(
        secure_broker.url, "controller", issuer.issue("controller", Role.controller, "p"), "c1"
    )
    got: list[str] = []
    seen = threading.Event()

    def on_msg(topic: str, _payload: bytes) -> None:
        got.append(topic)
        seen.set()

    ctl.subscribe(T.device_wildcard(None, "update"), on_msg)
    ctl.subscribe("edgefl/v1/p/+/dev/+/task", on_msg)
    time.sleep(0.3)
    dev = _connect(secure_broker.url, "d1", issuer.issue("d1", Role.device, "p", region="r1"), "d1")
    try:
        dev.publish(T.device("r1", "d2", "update"), b"spoof", qos=1).wait_for_publish(5)
        dev.publish(T.device("r2", "d1", "update"), b"wrong region", qos=1).wait_for_publish(5)
        dev.publish(T.device("r1", "d1", "task"), b"not a device channel", qos=1).wait_for_publish(
            5
        )
        dev.publish(T.device("r1", "d1", "update"), b"mine", qos=1).wait_for_publish(5)
        assert seen.wait(5)
        time.sleep(0.5)
        assert got == [T.device("r1", "d1", "update")]
    finally:
        dev.stop()
        ctl.stop()


@pytest.mark.parametrize("case", ["bad-signature", "expired", "wrong-subject", "no-token"])
def test_bad_credentials_are_refused(secure_broker, case) -> None:  # noqa: ANN001
    good = TokenIssuer(SECRET)
    token = {
        "bad-signature": TokenIssuer(generate_secret()).issue("d1", Role.device, "p", "r1"),
        "expired": good.issue("d1", Role.device, "p", "r1", ttl_s=-60),
        "wrong-subject": good.issue("someone-else", Role.device, "p", "r1"),
        "no-token": None,
    }[case]
    with pytest.raises(ConnectionError, match="refused|Not authorized|CONNACK|connect"):
        _connect(secure_broker.url, "d1", token, f"bad-{case}")


def test_device_cannot_subscribe_outside_its_subtree(secure_broker) -> None:  # noqa: ANN001
    issuer = TokenIssuer(SECRET)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="sub-check", protocol=paho.MQTTv311)
    client.username_pw_set("d3", issuer.issue("d3", Role.device, "p", "r1"))
    granted: list = []
    done = threading.Event()

    def on_subscribe(_c, _u, _mid, codes, _p) -> None:  # noqa: ANN001
        granted.extend(c.value for c in codes)
        done.set()

    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", secure_broker.port)
    client.loop_start()
    try:
        time.sleep(0.3)
        client.subscribe(
            [
                (T.device("r1", "d3", "task"), 1),
                ("edgefl/v1/p/#", 1),
                (T.device("r1", "d4", "task"), 1),
                (T.model_filter("v1"), 1),
            ]
        )
        assert done.wait(5)
        assert granted[0] == 1 and granted[3] == 1
        assert granted[1] >= 0x80 and granted[2] >= 0x80
    finally:
        client.disconnect()
        client.loop_stop()


def test_no_secret_and_no_flag_refuses_to_build() -> None:
    with pytest.raises(ValueError, match="secret"):
        EmbeddedBroker()


def test_insecure_flag_is_loud(caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.WARNING), EmbeddedBroker(allow_anonymous=True) as broker:
        conn = _connect(broker.url, None, None, "anon")
        conn.stop()
    assert any("INSECURE" in r.getMessage() for r in caplog.records)


def test_short_secret_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenIssuer("short")
