"""broker_config/acl.conf on a real Mosquitto: server accounts only, no device can publish."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from edgefl.auth.acl import mosquitto_acl_lines
from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.protocol import Topics
from edgefl.transport import MqttConnection

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_acl_matches_the_generator() -> None:
    shipped = (ROOT / "broker_config" / "acl.conf").read_text()
    assert shipped.strip() == mosquitto_acl_lines("default").strip()


def test_lab_template_lets_no_device_publish(tmp_path) -> None:
    """The template once let a device publish as itself under any region ('+'): now a
    device account without a provisioned block can publish nothing at all, while the
    server accounts work."""
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user in ("controller", "dev-a"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"pw-{user}"], check=True)
    acl = tmp_path / "acl.conf"
    acl.write_text(mosquitto_acl_lines("default"))
    extra = f"password_file {passwd}\nacl_file {acl}\n"
    t = Topics("default")
    with MosquittoProcess(config_extra=extra, workdir=tmp_path, allow_anonymous=False) as mq:
        got: list[str] = []
        seen = threading.Event()

        def on_msg(topic: str, _p: bytes) -> None:
            got.append(topic)
            seen.set()

        ctl = MqttConnection(
            mq.url, "ctl", username="controller", password="pw-controller", clean_session=True
        ).start(5)
        ctl.subscribe(t.device_wildcard(None, "status"), on_msg)
        time.sleep(0.3)
        dev = MqttConnection(
            mq.url, "dev-a", username="dev-a", password="pw-dev-a", clean_session=True
        ).start(5)
        try:
            for region in ("r1", "r2"):  # its own id, under any region: all dropped
                dev.publish(t.device(region, "dev-a", "status"), b"online").wait_for_publish(5)
            dev.publish(t.device("r1", "dev-b", "status"), b"spoof").wait_for_publish(5)
            time.sleep(0.5)
            assert got == []
            ctl.publish(t.device("r1", "dev-a", "status"), b"server").wait_for_publish(5)
            assert seen.wait(5)
            time.sleep(0.3)
            assert got == [t.device("r1", "dev-a", "status")]
        finally:
            dev.stop()
            ctl.stop()
        try:
            MqttConnection(
                mq.url, "x", username="dev-a", password="wrong", clean_session=True
            ).start(3)
        except ConnectionError:
            pass
        else:
            raise AssertionError("a wrong password was accepted")
