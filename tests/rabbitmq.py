"""A private RabbitMQ node with its MQTT plugin: the Debian binaries, never the system's node.

The machine's own RabbitMQ (``rabbit@localhost`` on 5672) is left alone: this node has its own
name, AMQP, distribution and MQTT ports (the plugin's default 1883 belongs to Mosquitto), its
own data and log folders, enabled-plugins file (``[rabbitmq_mqtt].`` only, no management
plugin), config file, HOME (so its own ``.erlang.cookie``) and even its own ``epmd`` on a free
port, so stopping it leaves no process behind and never touches the system's ``epmd``.

The Debian wrapper ``/usr/sbin/rabbitmq-server`` re-runs itself as the ``rabbitmq`` user
under root; the scripts in ``/usr/lib/rabbitmq/bin`` are called directly, so the node runs as
whoever runs the tests and can write its temp folders.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SBIN = Path("/usr/lib/rabbitmq/bin")
HOST = "127.0.0.1"

CONFIG = """\
# A private test node: loopback only, MQTT on a free port (1883 is Mosquitto's).
listeners.tcp.default = {host}:{amqp_port}
mqtt.listeners.tcp.default = {host}:{mqtt_port}
# edgefl's insecure test deployments connect without a login: the plugin maps that to guest,
# which RabbitMQ allows from loopback only (loopback_users.guest stays at its default).
mqtt.allow_anonymous = true
mqtt.default_user = guest
mqtt.default_pass = guest
mqtt.vhost = /
mqtt.exchange = amq.topic
# keep persistent sessions' queues for a day, like a broker that keeps sessions
mqtt.subscription_ttl = 86400000
log.file.level = info
log.console = false
"""


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A port from ``bind(0)`` is ephemeral: another test's outgoing connection may take it as
    its local port in the seconds before a slow server binds it (seen: RabbitMQ's AMQP
    listener failing with eaddrinuse). Below the range only listeners compete for it.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # fall back to any free port
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def find_rabbitmq() -> Path:
    """The real start script (not Debian's su wrapper); raise naming the package if missing."""
    script = SBIN / "rabbitmq-server"
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} not found: install the Debian package rabbitmq-server (make system-deps)"
        )
    return script


class RabbitNode:
    """One RabbitMQ node of our own, with ``rabbitmq_mqtt`` on ``mqtt_port``.

    ``url`` is the MQTT listener. ``start`` returns once the node answers ``rabbitmqctl
    await_startup`` and the MQTT port accepts connections; ``stop`` stops the node with
    ``rabbitmqctl stop`` (killing it only if that fails), then its private ``epmd``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = f"edgefl-test-{secrets.token_hex(4)}@localhost"
        self.amqp_port, self.dist_port = free_port(), free_port()
        self.mqtt_port, self.epmd_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def env(self) -> dict[str, str]:
        """The environment for the node and for rabbitmqctl talking to it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        empty_env = self.root / "rabbitmq-env.conf"  # not /etc/rabbitmq/rabbitmq-env.conf
        env.update(
            HOME=str(self.root / "home"),  # its own .erlang.cookie
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS=HOST,
            RABBITMQ_CONF_ENV_FILE=str(empty_env),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / "advanced.config"),
            RABBITMQ_PID_FILE=str(self.root / "node.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _write_files(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.root / "rabbitmq.conf").write_text(
            CONFIG.format(host=HOST, amqp_port=self.amqp_port, mqtt_port=self.mqtt_port)
        )

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ...`` with this node's environment (cookie, epmd port)."""
        return subprocess.run(
            [str(SBIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 90.0) -> RabbitNode:
        script = find_rabbitmq()
        self._write_files()
        out = (self.root / "server.out").open("wb")
        self.proc = subprocess.Popen(
            [str(script)],
            env=self.env(),
            cwd=self.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: beam's helpers die with it
        )
        out.close()
        deadline = time.monotonic() + timeout
        try:
            # the MQTT listener opens last, once the plugin has booted
            while not _port_open(self.mqtt_port):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the node exited with code {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"MQTT port {self.mqtt_port} not open after {timeout} s")
                time.sleep(0.2)
            res = self.ctl("await_startup", "--timeout", "60", timeout=70)
            if res.returncode != 0:
                raise RuntimeError(f"rabbitmqctl await_startup: {res.stdout}{res.stderr}")
            return self
        except Exception as exc:
            text = self.diagnostics()
            self.stop()
            raise RuntimeError(f"RabbitMQ node {self.node} did not start: {exc}\n{text}") from exc

    def diagnostics(self) -> str:
        """The node's console output and log tail, for a failing test's message."""
        parts = []
        for path in [self.root / "server.out", *sorted(self.log_dir.glob("*.log"))]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the node cleanly, then its epmd; kill our process group only as a fallback."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=60)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        epmd = shutil.which("epmd")
        if epmd is not None:  # our private epmd (its own port), never the system's
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                env=self.env(),
                capture_output=True,
                timeout=10,
            )

    def __enter__(self) -> RabbitNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private RabbitMQ node with MQTT, for one test module. A missing package fails."""
    try:
        find_rabbitmq()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    node = None
    for attempt in range(3):  # a port taken in the seconds before the node binds it: retry
        candidate = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
        try:
            node = candidate.start()
            break
        except RuntimeError as exc:
            if "eaddrinuse" not in str(exc) or attempt == 2:
                raise
    assert node is not None
    try:
        yield node
    finally:
        node.stop()
