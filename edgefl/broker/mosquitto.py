"""Run a Mosquitto process on a free loopback port (tests, benchmarks, local setups)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return path


class MosquittoProcess:
    def __init__(
        self,
        port: int = 0,
        *,
        config_extra: str = "",
        workdir: Path | None = None,
        allow_anonymous: bool = True,
    ) -> None:
        self.port = port
        self.allow_anonymous = allow_anonymous
        self.config_extra = config_extra
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="edgefl-mosq-")
        self.workdir = Path(workdir or self._tmp.name)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        conf = self.workdir / "mosquitto.conf"
        log = self.workdir / "mosquitto.log"
        # Loopback-only broker; anonymous access (the default here) is for tests and benchmarks.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}\n"
            "user root\n"
            "persistence false\n"
            "max_packet_size 16777216\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {log}\n"
            f"{self.config_extra}\n"
        )
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        text = log.read_text() if log.exists() else ""
        self.stop()
        raise RuntimeError(f"mosquitto did not start on port {self.port}:\n{text}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
