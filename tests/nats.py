"""A private 3-node NATS cluster with JetStream and the MQTT gateway: the Debian binary.

The machine's own nats-server (4222) is left alone. Each node gets a generated config with
its own ``server_name`` (MQTT needs one), client, cluster-route, monitoring and MQTT ports on
free loopback ports, and its own JetStream store folder. ``max_payload`` is raised from
NATS's default 1 MB to 8 MB: an edgefl chunk is 1 MiB plus its CBOR envelope, which the
default refuses. ``start`` returns once every node's MQTT port accepts connections and
``/jsz`` on every node names the same JetStream meta leader with all three peers current.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rabbitmq import free_port  # below the ephemeral range

HOST = "127.0.0.1"
CLUSTER = "edgefl-test"
MAX_PAYLOAD = "8MB"

CONFIG = """\
server_name: {name}
listen: {host}:{client_port}
http: {host}:{http_port}
max_payload: {max_payload}
jetstream {{
  store_dir: "{store}"
  max_memory_store: 256MB
  max_file_store: 2GB
}}
cluster {{
  name: {cluster}
  listen: {host}:{cluster_port}
  routes: [
{routes}
  ]
}}
mqtt {{
  listen: {host}:{mqtt_port}
}}
"""


def find_nats() -> str:
    path = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(path).is_file():
        raise FileNotFoundError(
            "nats-server not found: install the Debian package nats-server (make system-deps)"
        )
    return path


class NatsNode:
    """One server of the cluster: its ports, config, store folder and process."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root / name
        self.client_port, self.cluster_port = free_port(), free_port()
        self.http_port, self.mqtt_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its MQTT listener."""
        return f"mqtt://{HOST}:{self.mqtt_port}"

    def monitor(self, path: str) -> dict[str, Any]:
        """A monitoring endpoint (``/jsz``, ``/varz``, ``/routez``) as JSON."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=2) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def log_text(self) -> str:
        path = self.root / "nats.log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""


class NatsCluster:
    """Three nats-server processes routed to each other, each with JetStream and MQTT."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = Path(root)
        self.nodes = [NatsNode(self.root, f"n{i}") for i in range(size)]

    @property
    def urls(self) -> list[str]:
        """The MQTT URL of each node, in node order."""
        return [n.url for n in self.nodes]

    def config_text(self, node: NatsNode) -> str:
        routes = "\n".join(
            f"    nats-route://{HOST}:{other.cluster_port}"
            for other in self.nodes
            if other is not node
        )
        return CONFIG.format(
            name=node.name,
            host=HOST,
            client_port=node.client_port,
            http_port=node.http_port,
            max_payload=MAX_PAYLOAD,
            store=node.root / "jetstream",
            cluster=CLUSTER,
            cluster_port=node.cluster_port,
            routes=routes,
            mqtt_port=node.mqtt_port,
        )

    def start(self, timeout: float = 60.0) -> NatsCluster:
        binary = find_nats()
        for node in self.nodes:
            node.root.mkdir(parents=True, exist_ok=True)
            conf = node.root / "nats.conf"
            conf.write_text(self.config_text(node))
            with (node.root / "nats.log").open("wb") as out:
                node.proc = subprocess.Popen(
                    [binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
                )
        try:
            self._wait_ready(timeout)
        except Exception as exc:
            logs = "\n".join(f"--- {n.name}\n{n.log_text()}" for n in self.nodes)
            self.stop()
            raise RuntimeError(f"NATS cluster did not form: {exc}\n{logs}") from exc
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "nothing yet"
        while time.monotonic() < deadline:
            for node in self.nodes:
                assert node.proc is not None
                if node.proc.poll() is not None:
                    raise RuntimeError(f"{node.name} exited with code {node.proc.returncode}")
            try:
                leaders = set()
                for node in self.nodes:
                    meta = node.monitor("/jsz").get("meta_cluster") or {}
                    if not meta.get("leader") or meta.get("cluster_size") != len(self.nodes):
                        raise RuntimeError(f"{node.name}: meta cluster {meta}")
                    if "replicas" in meta:  # only the leader lists its peers
                        peers = meta["replicas"]
                        if len(peers) != len(self.nodes) - 1 or not all(
                            p.get("current") for p in peers
                        ):
                            raise RuntimeError(f"{node.name}: peers not all current: {peers}")
                    leaders.add(meta["leader"])
                if len(leaders) != 1:
                    raise RuntimeError(f"nodes disagree on the meta leader: {leaders}")
                for node in self.nodes:
                    with socket.create_connection((HOST, node.mqtt_port), timeout=0.5):
                        pass
                return
            except (OSError, RuntimeError, urllib.error.URLError, ValueError) as exc:
                last = str(exc)
                time.sleep(0.25)
        raise RuntimeError(f"not ready after {timeout} s: {last}")

    def stop(self) -> None:
        """Stop every node (SIGTERM, kill after 10 s); the store folders stay for the logs."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(5)
                node.proc = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A private 3-node NATS cluster with MQTT, for one test module. A missing binary fails."""
    try:
        find_nats()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    cluster = None
    for attempt in range(3):  # a port taken in the moment before a node binds it: retry
        try:
            cluster = NatsCluster(tmp_path_factory.mktemp("nats")).start()
            break
        except RuntimeError as exc:
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    assert cluster is not None
    try:
        yield cluster
    finally:
        cluster.stop()
