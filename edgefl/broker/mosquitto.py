"""Run a Mosquitto process on a free loopback port (tests, benchmarks, local setups).

Everything it writes (config, log) goes to a private folder, so it never touches the
machine's own Mosquitto on 1883 or /var/lib/mosquitto. Production brokers use
``broker_config/mosquitto.conf`` instead.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
MAX_PACKET_SIZE = 16 * 1024 * 1024  # model/update chunks are 1 MiB plus a CBOR envelope


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on PATH)."""
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        raise FileNotFoundError(
            "mosquitto is not installed (Debian/Ubuntu: apt-get install -y mosquitto)"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class MosquittoProcess:
    """One private Mosquitto process; a context manager.

    It owns the process and, unless ``workdir`` is given, a temporary folder for the config
    and log, both removed by ``stop``. ``config_extra`` is appended to the generated config
    (e.g. ``password_file``/``acl_file`` lines). Anonymous access is on by default, which is
    acceptable only because it listens on loopback. Not thread-safe; one owner starts and
    stops it.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        config_extra: str = "",
        workdir: Path | None = None,
        allow_anonymous: bool = True,
    ) -> None:
        self.host = HOST
        self.port = port
        self.config_extra = config_extra
        self.allow_anonymous = allow_anonymous
        self._given_workdir = Path(workdir) if workdir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir: Path | None = self._given_workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:port`` (the chosen port once started)."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """Mosquitto's log file, for diagnosing a test; None while no private folder exists."""
        return None if self.workdir is None else self.workdir / "mosquitto.log"

    def config_text(self, log_path: Path) -> str:
        """The generated mosquitto.conf, tuned for large chunked transfers and low latency."""
        return (
            f"listener {self.port} {self.host}\n"
            # Anonymous access is acceptable only because this broker listens on loopback
            # and lives for one test or benchmark run; production uses broker_config/.
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}\n"
            # Started as root, Mosquitto drops to the 'mosquitto' user, which cannot write
            # our private folder; 'user root' keeps it (ignored when not root).
            "user root\n"
            "persistence false\n"
            f"max_packet_size {MAX_PACKET_SIZE}\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {log_path}\n"
            f"{self.config_extra}\n"
        )

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start and return once the port accepts connections; raise with the log if not."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("mosquitto is already running")
        binary = find_mosquitto()
        if self._given_workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgefl-mosq-")
            self.workdir = Path(self._tmp.name)
        assert self.workdir is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port()
        conf = self.workdir / "mosquitto.conf"
        log = self.workdir / "mosquitto.log"
        out = self.workdir / "mosquitto.out"
        conf.write_text(self.config_text(log))
        with out.open("wb") as out_f:
            # stderr carries config errors that happen before the log file is opened
            self.proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=out_f, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        text = "\n".join(p.read_text(errors="replace") for p in (out, log) if p.exists())
        code = self.proc.poll()
        self.stop()
        state = f"exited with code {code}" if code is not None else f"timed out after {timeout} s"
        raise RuntimeError(f"mosquitto did not start on {self.host}:{self.port} ({state}):\n{text}")

    def stop(self) -> None:
        """Terminate (kill after 5 s) and remove the private folder; idempotent."""
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
            self.workdir = self._given_workdir

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
