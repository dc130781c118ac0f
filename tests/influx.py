"""A private InfluxDB 1.x for the tests: the Debian ``influxd`` binary, never the system service.

Each instance gets a generated config with its HTTP and RPC bind addresses on free loopback
ports and its meta, data and WAL folders in a temp folder. ``stop`` and ``start`` again reuse
the same folders and ports: the outage test stops the database mid-session and brings it back.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CONFIG = """\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  wal-fsync-delay = "0s"
  query-log-enabled = false
  trace-logging-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[logging]
  level = "warn"
"""


def find_influxd() -> str:
    path = shutil.which("influxd") or "/usr/bin/influxd"
    if not Path(path).is_file():
        raise FileNotFoundError("influxd not found (Debian package influxdb; make system-deps)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InfluxProcess:
    """One ``influxd`` on loopback: ``url`` is its HTTP API; ``query`` speaks InfluxQL."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.http_port, self.rpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = self.root / "influxdb.conf"
        self.config.write_text(
            CONFIG.format(root=self.root, http_port=self.http_port, rpc_port=self.rpc_port)
        )
        self.log = self.root / "influxd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> InfluxProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [find_influxd(), "run", "-config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited: {self.log.read_text()[-2000:]}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"influxd did not answer /ping in {timeout}s")

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp:
                return resp.status == 204
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def query(self, q: str, db: str | None = None) -> dict[str, Any]:
        """Run InfluxQL; raise on an HTTP error or a statement error. Times in epoch ns."""
        params = {"q": q, "epoch": "ns", **({"db": db} if db else {})}
        data = urllib.parse.urlencode(params).encode()
        req = urllib.request.Request(f"{self.url}/query", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            out: dict[str, Any] = json.loads(resp.read())
        for result in out.get("results", []):
            if "error" in result:
                raise AssertionError(f"InfluxQL error for {q!r}: {result['error']}")
        return out

    def rows(self, q: str, db: str) -> list[dict[str, Any]]:
        """One dict per row (column -> value, plus the series' tags) of a single query."""
        found: list[dict[str, Any]] = []
        for series in self.query(q, db)["results"][0].get("series", []):
            tags = series.get("tags", {})
            found.extend({**tags, **dict(zip(series["columns"], v))} for v in series["values"])
        return found

    def __enter__(self) -> InfluxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxProcess]:
    """The suite's InfluxDB; each test writes to a database of its own."""
    try:
        find_influxd()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}. The telemetry tests need a real InfluxDB.", pytrace=False)
    with InfluxProcess(tmp_path_factory.mktemp("influxdb")) as influx:
        yield influx


@pytest.fixture
def private_influxdb(tmp_path: Path) -> Iterator[InfluxProcess]:
    """An InfluxDB of the test's own, which it may stop and start (the outage tests)."""
    with InfluxProcess(tmp_path / "influxdb") as influx:
        yield influx
