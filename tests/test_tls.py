"""TLS on every MQTT hop, against real Mosquitto processes running the shipped TLS configs.

The brokers run ``broker_config/mosquitto-tls.conf`` and ``mosquitto-mtls.conf`` with only the
paths, the port and the persistence rewritten for a private loopback process, and with
certificates issued by ``edgefl.auth.ca``. What is checked: the agent verifies the broker by
default (no CA, a wrong CA or a wrong hostname is refused), mutual TLS maps the certificate's
CN to the MQTT username, ``--tls-insecure`` is explicit and loud, and ``edgefl ca`` writes
what the configs expect.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl.auth.ca import device_files, init_ca, issue_device_cert, issue_server_cert
from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.cli.ca import ca_app
from edgefl.protocol.messages import decode
from edgefl.protocol.topics import Topics
from edgefl.transport import MqttConnection

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CERTS = "/etc/mosquitto/edgefl/certs/"
PASSWORD = "s3cret-token"  # a broker password (the TLS listener still authenticates accounts)
SERVER_NAME = "broker.test"  # the server certificate names this and 127.0.0.1, not localhost


class ShippedConfigBroker(MosquittoProcess):
    """A Mosquitto process running one of the shipped configs, rewritten for loopback tests."""

    def __init__(self, conf_name: str, certs: Path, passwd: Path, acl: Path) -> None:
        super().__init__()
        self.conf_name, self.certs, self.passwd, self.acl = conf_name, certs, passwd, acl

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def config_text(self, log_path: Path) -> str:
        shipped = (ROOT / "broker_config" / self.conf_name).read_text()
        out = []
        for line in shipped.splitlines():
            if line.startswith(("#", "persistence_location", "autosave_interval", "log_dest")):
                continue
            if line == "listener 1883 127.0.0.1":  # the loopback plain listener is not under test
                continue
            line = line.replace("listener 8883 0.0.0.0", f"listener {self.port} {self.host}")
            line = line.replace(SHIPPED_CERTS, f"{self.certs}/")
            line = line.replace("/etc/mosquitto/edgefl/passwd", str(self.passwd))
            line = line.replace("/etc/mosquitto/edgefl/acl.conf", str(self.acl))
            out.append("persistence false" if line == "persistence true" else line)
        text = "\n".join(out)
        # the rewrite must have caught every path and the TLS listener
        assert "/etc/mosquitto" not in text and f"listener {self.port}" in text, text
        # Started as root, Mosquitto drops to 'mosquitto', which cannot read the 0600 key
        return f"{text}\nuser root\nlog_dest file {log_path}\n"

    def log_text(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """The fleet's CA with a broker and a device certificate, and an unrelated CA."""
    base = tmp_path_factory.mktemp("pki")
    fleet, other = base / "fleet", base / "other"
    init_ca(fleet)
    issue_server_cert(fleet, dns_names=[SERVER_NAME], ips=["127.0.0.1"])
    issue_device_cert(fleet, "dev-7")
    init_ca(other, common_name="someone else's CA")
    issue_device_cert(other, "dev-7")
    return {"fleet": fleet, "other": other, "base": base}


def _passwd(path: Path, *users: str) -> Path:
    for i, user in enumerate(users):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(path), user, PASSWORD],
            check=True,
            capture_output=True,
        )
    return path


@pytest.fixture(scope="module")
def tls_broker(pki) -> ShippedConfigBroker:
    base = pki["base"]
    passwd = _passwd(base / "passwd", "dev-1", "watcher")
    acl = base / "acl-tls.conf"
    acl.write_text("pattern readwrite #\n")  # authorisation is not what this broker tests
    with ShippedConfigBroker("mosquitto-tls.conf", pki["fleet"], passwd, acl) as broker:
        yield broker


@pytest.fixture(scope="module")
def mtls_broker(pki) -> ShippedConfigBroker:
    base = pki["base"]
    passwd = _passwd(base / "passwd-m", "controller")
    acl = base / "acl-mtls.conf"
    acl.write_text("pattern readwrite t/%u/#\n")  # %u is the certificate's CN
    with ShippedConfigBroker("mosquitto-mtls.conf", pki["fleet"], passwd, acl) as broker:
        yield broker


def _conn(url: str, client_id: str, **kwargs) -> MqttConnection:
    return MqttConnection(url, client_id, clean_session=True, max_backoff_s=0.5, **kwargs)


def _watcher(broker: ShippedConfigBroker, ca: Path) -> MqttConnection:
    return _conn(
        broker.tls_url, "watcher", username="watcher", password=PASSWORD, ca_file=str(ca)
    ).start(5)


def _wait_status(seen: list[dict], device: str, state: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in list(seen):
            if s.get("device") == device and s.get("state") == state:
                return s
        time.sleep(0.05)
    raise AssertionError(f"no {state!r} status from {device} within {timeout}s: {seen}")


def _status_collector(watcher: MqttConnection) -> list[dict]:
    seen: list[dict] = []
    topic = Topics("default").device_wildcard(None, "status")
    watcher.subscribe(topic, lambda _t, payload: seen.append(decode(payload)))
    time.sleep(0.2)  # let the SUBACK land before the device speaks
    return seen


def test_agent_over_tls_with_the_fleet_ca(pki, tls_broker) -> None:
    ca = pki["fleet"] / "ca.crt"
    watcher = _watcher(tls_broker, ca)
    seen = _status_collector(watcher)
    rng = np.random.default_rng(0)
    cfg = AgentConfig(
        broker_url=tls_broker.tls_url,
        device_id="dev-1",
        password=PASSWORD,
        ca_file=str(ca),
        min_backoff_s=0.2,
        max_backoff_s=1.0,
    )
    agent = DeviceAgent(cfg, NumpyTrainer(rng.normal(size=(8, 4)), rng.integers(0, 2, 8)))
    agent.start(timeout=5)
    try:
        sock = agent.conn.client.socket()
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        # the broker's certificate is the one our CA issued, verified by the agent
        peer = sock.getpeercert()
        assert ("DNS", SERVER_NAME) in peer["subjectAltName"]
        status = _wait_status(seen, "dev-1", "online")
        assert status["region"] == cfg.region
    finally:
        agent.stop()
    _wait_status(seen, "dev-1", "offline")  # the clean stop's status crossed TLS as well
    watcher.stop()


@pytest.mark.parametrize("ca_choice", ["system store", "wrong CA"])
def test_broker_certificate_is_verified_by_default(pki, tls_broker, ca_choice) -> None:
    ca = None if ca_choice == "system store" else str(pki["other"] / "ca.crt")
    conn = _conn(
        tls_broker.tls_url, f"probe-{ca_choice[:5]}", username="dev-1", password=PASSWORD,
        ca_file=ca,
    )
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        conn.start(2)
    assert not conn.connected.is_set()
    assert "TLS failed" in (conn.last_refusal or "")


def test_hostname_mismatch_is_refused(pki, tls_broker) -> None:
    # same broker, same trusted CA: only the name differs (the certificate has no 'localhost')
    url = f"mqtts://localhost:{tls_broker.port}"
    conn = _conn(url, "probe-host", username="dev-1", password=PASSWORD,
                 ca_file=str(pki["fleet"] / "ca.crt"))
    with pytest.raises(ConnectionError, match=r"(?i)hostname mismatch"):
        conn.start(2)


def test_mutual_tls_username_is_the_certificate_cn(pki, mtls_broker) -> None:
    fleet = pki["fleet"]
    files = device_files(fleet, "dev-7")
    got: list[tuple[str, bytes]] = []
    arrived = threading.Event()

    def on_msg(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        arrived.set()

    conn = _conn(  # the client id it asks for is replaced by its username, the CN
        mtls_broker.tls_url, "claims-to-be-dev-8", ca_file=str(fleet / "ca.crt"),
        cert_file=str(files.cert), key_file=str(files.key),
    ).start(5)
    try:
        conn.subscribe("t/dev-7/x", on_msg)
        conn.subscribe("t/dev-8/x", on_msg)  # accepted, but the ACL must deliver nothing
        time.sleep(0.3)
        conn.publish("t/dev-8/x", b"not mine").wait_for_publish(3)
        conn.publish("t/dev-7/x", b"mine").wait_for_publish(3)
        assert arrived.wait(5)
        time.sleep(0.3)
    finally:
        conn.stop()
    assert got == [("t/dev-7/x", b"mine")]  # the ACL's %u matched the CN, and only it
    connected = r"New client connected from .* as dev-7 \(.*u'dev-7'\)"
    assert re.search(connected, mtls_broker.log_text())  # Mosquitto's own record of the name


@pytest.mark.parametrize(
    ("client_cert", "reason"),
    [("none", "certificate required"), ("other CA", "unknown ca")],
)
def test_mutual_tls_refuses_a_device_without_a_fleet_certificate(
    pki, mtls_broker, client_cert, reason
) -> None:
    kwargs: dict[str, str] = {"ca_file": str(pki["fleet"] / "ca.crt")}
    if client_cert == "other CA":
        files = device_files(pki["other"], "dev-7")
        kwargs |= {"cert_file": str(files.cert), "key_file": str(files.key)}
    conn = _conn(mtls_broker.tls_url, f"dev-7-{client_cert[:4]}", **kwargs)
    with pytest.raises(ConnectionError, match=reason):  # the broker's TLS alert, named
        conn.start(2)
    assert not conn.connected.is_set() and conn.connect_count == 0


def test_tls_insecure_flag_connects_and_logs_insecure(pki, tls_broker, tmp_path) -> None:
    watcher = _watcher(tls_broker, pki["fleet"] / "ca.crt")
    seen = _status_collector(watcher)
    rng = np.random.default_rng(1)
    data = tmp_path / "local.npz"
    np.savez(data, X=rng.normal(size=(8, 4)), y=rng.integers(0, 2, 8))
    # no --ca-file: the broker's certificate chains to a CA this agent does not know
    cmd = [sys.executable, "-m", "device_agent.cli", "--broker-url", tls_broker.tls_url,
           "--device-id", "dev-1", "--data-path", str(data), "--tls-insecure"]
    env = {**os.environ, "EDGEFL_PASSWORD": PASSWORD}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_status(seen, "dev-1", "online", timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        watcher.stop()
    assert proc.returncode == 0, err
    assert "INSECURE" in err and "WITHOUT verifying" in err, err


def test_tls_settings_need_an_mqtts_url_and_existing_files(pki, tmp_path) -> None:
    ca = str(pki["fleet"] / "ca.crt")
    with pytest.raises(ValueError, match=r"ca_file given but .* plain MQTT"):
        MqttConnection("mqtt://127.0.0.1:1", "x", ca_file=ca)
    with pytest.raises(ValueError, match="tls_insecure given"):
        MqttConnection("mqtt://127.0.0.1:1", "x", tls_insecure=True)
    with pytest.raises(ValueError, match=r"ca_file .*missing\.pem"):
        MqttConnection("mqtts://127.0.0.1:1", "x", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=r"ca_file .*: no such file"):
        AgentConfig(device_id="d", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="key_file needs cert_file"):
        AgentConfig(device_id="d", key_file=ca)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_cli_writes_the_files_the_configs_expect(tmp_path) -> None:
    runner = CliRunner()
    for args in ([], ["init"], ["server"], ["device"]):
        res = runner.invoke(ca_app, [*args, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, (args, res.output)
    d = tmp_path / "certs"
    res = runner.invoke(ca_app, ["init", str(d)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        ca_app, ["server", str(d), "--name", "broker.example", "--name", "localhost",
                 "--ip", "127.0.0.1"],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(ca_app, ["device", str(d), "pi-0042"])
    assert res.exit_code == 0, res.output

    keys = [d / "ca.key", d / "server.key", d / "devices" / "pi-0042.key"]
    certs = [d / "ca.crt", d / "server.crt", d / "devices" / "pi-0042.crt"]
    assert [_mode(k) for k in keys] == [0o600] * 3
    assert [_mode(c) for c in certs] == [0o644] * 3
    ca, server, dev = (x509.load_pem_x509_certificate(c.read_bytes()) for c in certs)
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    dev.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-0042"
    eku = dev.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # ca.crt, server.crt and server.key load into a TLS server context, as Mosquitto loads them
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs[0]))
    ctx.load_cert_chain(str(certs[1]), str(keys[1]))

    # nothing is overwritten without --force, and --force replaces
    before = (d / "ca.crt").read_bytes()
    res = runner.invoke(ca_app, ["init", str(d)])
    assert res.exit_code == 1 and "refusing to overwrite" in res.output
    assert (d / "ca.crt").read_bytes() == before
    res = runner.invoke(ca_app, ["device", str(d), "pi-0042"])
    assert res.exit_code == 1 and "refusing to overwrite" in res.output
    res = runner.invoke(ca_app, ["device", str(d), "pi-0042", "--force"])
    assert res.exit_code == 0 and _mode(keys[2]) == 0o600
    # bad input is refused with the reason
    res = runner.invoke(ca_app, ["server", str(d), "--out", "s2"])
    assert res.exit_code == 2 and "--name or --ip" in res.output
    res = runner.invoke(ca_app, ["device", str(d), "../evil"])
    assert res.exit_code == 1 and "invalid device id" in res.output
    res = runner.invoke(ca_app, ["device", str(tmp_path / "nowhere"), "pi-1"])
    assert res.exit_code == 1 and "edgefl ca init" in res.output


def test_server_commands_take_the_fleet_ca_from_the_cli(pki, tls_broker, monkeypatch) -> None:
    """`edgefl --ca-cert CA combiner ...` (and controller, simulate, ...): the global option
    exports the CA, and every mqtts:// connection the command opens verifies against it."""
    import typer

    from edgefl.cli.common import set_tls_files

    monkeypatch.delenv("EDGEFL_CA_CERT", raising=False)
    kwargs = {"username": "watcher", "password": PASSWORD}
    without = _conn(tls_broker.tls_url, "ca-env-0", **kwargs)
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        without.start(2)  # the system store does not know the fleet's CA
    with pytest.raises(typer.BadParameter, match="no such file"):
        set_tls_files(pki["base"] / "missing.crt", None, None)
    monkeypatch.setenv("EDGEFL_CA_CERT", "")  # restored after the test
    set_tls_files(pki["fleet"] / "ca.crt", None, None)
    conn = _conn(tls_broker.tls_url, "ca-env-1", **kwargs).start(5)
    try:
        sock = conn.client.socket()
        assert isinstance(sock, ssl.SSLSocket)
        assert ("DNS", SERVER_NAME) in sock.getpeercert()["subjectAltName"]
    finally:
        conn.stop()
