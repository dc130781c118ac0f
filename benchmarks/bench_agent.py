"""Resident memory of one device agent, idle and while it trains.

The agent runs as shipped, ``python -m device_agent.cli`` (what ``edgefl-agent`` runs on a
Raspberry Pi), in a fresh process with the numpy trainer. Its local data (one device's digits
partition, as in the demo) is written by this process to an .npz and handed over with
``--data-path``, so the agent process never imports scikit-learn; the benchmark checks the
agent's memory map for server-side libraries to prove it.

1. idle: RSS a second after the agent is online on a private Mosquitto;
2. training: a combiner and a controller (SQLite store in a temporary folder) in this process
   drive a few real rounds; the agent's RSS is sampled every 5 ms (peak) and read again after.

Same-run baseline: a bare ``python -c "import numpy, paho.mqtt.client, cbor2"`` process, the
floor for any agent built on the three dependencies. Target: idle RSS <= 40 MB (10^6 bytes).

The agent runs from a copy of ``edgefl/`` and ``device_agent/`` in a temporary folder, compiled
to bytecode first, as ``pip install`` leaves it on a device: this checkout may have no .pyc
files (PYTHONDONTWRITEBYTECODE is set on the build machines), and compiling the sources at
start-up would leave about 0.7 MB more in the agent's heap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import MIB, REPO, RssSampler, broker, emit, log, mb, median, rss_bytes, setup_logging

PROJECT = "bench"
REGION = "region-0"
DEVICE = "dev-0000"
ROUNDS = 5
TARGET_MB = 40.0
SETTLE_S = 1.0
# shared objects that must not be in a device agent's memory map
SERVER_LIBS = ("sklearn", "scipy", "sqlalchemy", "pydantic_core", "fastapi", "uvicorn", "amqtt")

BASELINE_CODE = "import sys, numpy, paho.mqtt.client, cbor2; print('ready', flush=True); input()"


def _env(path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return env


def install_agent(dest: Path) -> Path:
    """Copy the agent's packages to ``dest`` and compile them, as an installed agent has them."""
    import compileall
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("edgefl", "device_agent"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=ignore)
    if not compileall.compile_dir(dest, quiet=1):
        raise RuntimeError(f"could not compile the agent's sources in {dest}")
    return dest


def _settled_rss(pid: int, n: int = 5, every_s: float = 0.05) -> int:
    samples = []
    for _ in range(n):
        samples.append(rss_bytes(pid))
        time.sleep(every_s)
    return int(median(samples))


def baseline_rss() -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", BASELINE_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("baseline process failed")
        time.sleep(SETTLE_S)
        return _settled_rss(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(10)


def loaded_server_libs(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({lib for lib in SERVER_LIBS if f"/{lib}/" in maps or f"/{lib}." in maps})


class Presence:
    """Watches the agent's retained status topic (online / offline)."""

    def __init__(self, url: str) -> None:
        from edgefl.protocol import Topics, decode
        from edgefl.transport import MqttConnection

        self.online = threading.Event()
        self._decode = decode
        self.conn = MqttConnection(url, client_id="bench-agent-watch", clean_session=True)
        self.conn.subscribe(Topics(PROJECT).device(REGION, DEVICE, "status"), self._on_status)
        self.conn.start()

    def _on_status(self, _topic: str, payload: bytes) -> None:
        if payload and self._decode(payload, "status")["state"] == "online":
            self.online.set()

    def stop(self) -> None:
        self.conn.stop()


def drive_rounds(url: str, workdir: Path) -> list[float]:
    """A combiner and a controller run ROUNDS real rounds with the agent; returns accuracies."""
    from edgefl.combiner import Combiner, CombinerConfig
    from edgefl.controller import Controller, SessionConfig
    from edgefl.store import make_store
    from edgefl.store.blobs import FileBlobStore
    from edgefl.tasks import digits

    comb = Combiner(CombinerConfig(url, project=PROJECT, region=REGION)).start()
    store = make_store(f"sqlite:///{workdir / 'state.db'}")
    ctl = Controller(
        url, store, FileBlobStore(workdir / "models"), project=PROJECT, evaluator=digits.evaluator
    ).start()
    try:
        config = SessionConfig(
            session_id="bench-agent",
            rounds=ROUNDS,
            min_devices=1,
            round_timeout_s=30,
            train={"model": "softmax", "lr": 0.1, "batch_size": 32, "epochs": 1},
        )
        ctl.create_session(config, digits.initial_weights("softmax"))
        ctl.run(config.session_id)
        rounds = [r for r in store.list_rounds(config.session_id) if r.status == "completed"]
        return [r.metrics["accuracy"] for r in rounds]
    finally:
        ctl.stop()
        comb.stop()
        store.close()


def main() -> None:
    setup_logging()
    from edgefl.tasks import digits

    with broker() as b, tempfile.TemporaryDirectory(prefix="edgefl-bench-agent-") as tmp:
        workdir = Path(tmp)
        site = install_agent(workdir / "site")
        base = baseline_rss()
        log(f"baseline (python + numpy + paho + cbor2): {mb(base)} MB")
        X, y = digits.device_data(20, 0)
        data = workdir / "local.npz"
        np.savez(data, X=X, y=y)
        presence = Presence(b.url)
        cmd = [
            sys.executable,
            "-m",
            "device_agent.cli",
            "--broker-url",
            b.url,
            "--project",
            PROJECT,
            "--region",
            REGION,
            "--device-id",
            DEVICE,
            "--data-path",
            str(data),
            "--seed",
            "0",
            "--log-level",
            "warning",
        ]
        agent = subprocess.Popen(cmd, env=_env(site), cwd=workdir)
        try:
            if not presence.online.wait(30):
                raise TimeoutError("the agent did not come online")
            time.sleep(SETTLE_S)
            idle = _settled_rss(agent.pid)
            log(f"agent idle after connect: {mb(idle)} MB")
            sampler = RssSampler(agent.pid).start()
            t0 = time.perf_counter()
            accs = drive_rounds(b.url, workdir)
            elapsed = time.perf_counter() - t0
            peak = sampler.stop()
            time.sleep(0.5)
            after = _settled_rss(agent.pid)
            libs = loaded_server_libs(agent.pid)
            log(
                f"agent during {len(accs)} rounds: peak {mb(peak)} MB, after {mb(after)} MB"
                f" ({elapsed:.1f} s, final accuracy {accs[-1]:.4f})"
            )
        finally:
            agent.send_signal(signal.SIGINT)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(5)
            presence.stop()
    emit(
        {
            "benchmark": "agent",
            "trainer": "numpy softmax (digits, 1 device partition of 20)",
            "idle_rss_mb": mb(idle),
            "idle_rss_mib": round(idle / MIB, 2),
            "training_peak_rss_mb": mb(peak),
            "after_training_rss_mb": mb(after),
            "rounds": len(accs),
            "baseline_bare_python_numpy_paho_cbor2_mb": mb(base),
            "idle_over_baseline_mb": mb(idle - base),
            "ratio": round(idle / base, 3),
            "server_libs_loaded": libs,
            "target": f"idle_rss_mb <= {TARGET_MB}",
            "target_met": idle / 1e6 <= TARGET_MB and len(accs) == ROUNDS,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
