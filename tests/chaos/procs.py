"""Process helpers for the chaos suite: every tier runs as a real OS process on a real Mosquitto.

What lives here, and why:

* ``Procs`` starts children in their own process groups with their output in log files, and
  kills every group it started when the test ends (a fixture finalizer calls ``close``), so a
  failing test never leaves a combiner or a fleet behind.
* ``PersistentMosquitto`` is Mosquitto with persistence on, on a fixed free loopback port, so it
  can be SIGKILLed and restarted where the clients expect it. Autosave is off: the database is
  written only when the test asks (``snapshot``, SIGUSR1), which is how a test makes the
  persistence file older than the broker's state at the kill.
* ``Cluster`` builds the command lines of ``edgefl combiner``, ``edgefl controller``,
  ``edgefl simulate`` and ``edgefl-agent`` for one project on one broker, and creates sessions
  through the public Python API (``Controller.create_session``) so a test can choose every
  ``SessionConfig`` field before ``edgefl controller --resume`` runs it.
* ``Watcher`` is a plain MQTT client that sees the project's traffic: who is online, which tasks
  and update chunks went by, which model versions were published completely.
* ``LinkProxy`` is a loopback TCP proxy in front of one device: it cuts the link mid-upload and
  refuses reconnections for a while (or for ever), as a flaky or dead uplink would.
* Run as a module (``python -m tests.chaos.procs fleet|flood|inject ...``) it is the hostile or
  partial-fleet process a case needs: a fleet on a larger partition, a device that floods its
  update topic with never-completing transfers, or a fault injector that publishes random,
  truncated, bit-flipped and replayed payloads on every topic at a fixed rate.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.protocol import Topics, decode, encode
from edgefl.protocol.chunking import ChunkError, Reassembler, parse_chunk, split_payload
from edgefl.transport import parse_broker_url

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    """A free loopback port (never a well-known one); the caller binds it soon after."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    """The environment for children: unbuffered, wide log lines, and no JWT secret, so every
    server command runs only because the test passed ``--insecure`` explicitly."""
    env = dict(os.environ)
    env.pop("EDGEFL_JWT_SECRET", None)
    env.update(PYTHONUNBUFFERED="1", COLUMNS="250", NO_COLOR="1")
    return env


# processes ------------------------------------------------------------------------------
class Proc:
    """One child process in its own process group, its stdout and stderr in one log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                start_new_session=True,  # its own group: killpg reaches its children too
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (no-op once it has exited)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the group, as a crash or a power cut would, and reap it."""
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait(5)

    def wait(self, timeout: float) -> int:
        """Wait for a process expected to end; fail the test with its log if it does not."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:.0f} s; log tail:\n{self.tail()}"
            ) from None

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.returncode}>"


class Procs:
    """The children of one test; ``close`` ends every process group that is still alive."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.all: list[Proc] = []

    def spawn(self, name: str, argv: list[str]) -> Proc:
        """Start ``argv`` (from the repository root) in a new process group."""
        proc = Proc(name, argv, self.logdir / f"{name}.log")
        self.all.append(proc)
        return proc

    def check_alive(self, *procs: Proc) -> None:
        """Fail with the log of any of ``procs`` that has exited."""
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited with {p.returncode}; log tail:\n{p.tail()}")

    def close(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child still running at once, SIGKILL what is left after ``grace_s``."""
        running = [p for p in reversed(self.all) if p.alive()]
        for p in running:
            p.signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for p in running:
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


# the broker ------------------------------------------------------------------------------
class PersistentMosquitto(MosquittoProcess):
    """Mosquitto with persistence on, restartable on the same free port and the same files.

    ``autosave_interval 0`` means the database is written only on a clean exit or on SIGUSR1
    (``snapshot``), so after ``kill`` the broker restarts from exactly the last snapshot.
    """

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.db_path = workdir / "mosquitto.db"
        extra = (
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "persistence_file mosquitto.db\n"
            "autosave_interval 0\n"
        )
        super().__init__(free_port(), config_extra=extra, workdir=workdir)

    def snapshot(self, timeout: float = 10.0) -> float:
        """Make Mosquitto write its database now (SIGUSR1); returns the file's mtime."""
        assert self.proc is not None and self.proc.poll() is None, "mosquitto is not running"
        before = self.db_path.stat().st_mtime_ns if self.db_path.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.db_path.exists() and self.db_path.stat().st_mtime_ns != before:
                time.sleep(0.1)  # let the write finish (it is written to a temp file, renamed)
                return self.db_path.stat().st_mtime
            time.sleep(0.02)
        raise AssertionError(f"mosquitto did not write {self.db_path} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: nothing since the last snapshot reaches the persistence file."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        """Start again on the same port, from the same persistence file."""
        self.start()


# the cluster -----------------------------------------------------------------------------
def edgefl(*args: str) -> list[str]:
    """The ``edgefl`` command line, run with this interpreter."""
    return [sys.executable, "-m", "edgefl.cli.main", *args]


def device_name(k: int) -> str:
    return f"dev-{k:04d}"


class Cluster:
    """The command lines and shared state of one deployment: one project on one broker."""

    def __init__(
        self, procs: Procs, url: str, workdir: Path, project: str, models_dir: Path | None = None
    ) -> None:
        self.procs = procs
        self.url = url
        self.workdir = workdir
        self.project = project
        self.topics = Topics(project)
        self.state_url = f"sqlite:///{(workdir / 'state.db').resolve()}"
        self.models_dir = models_dir or workdir / "models"
        self._store: Any = None

    @property
    def store(self) -> Any:
        """The state store, read by the test while the controller process writes it."""
        if self._store is None:
            from edgefl.store import make_store

            self._store = make_store(self.state_url)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def combiner(self, region: str) -> Proc:
        return self.procs.spawn(
            f"combiner-{region}",
            edgefl(
                "combiner",
                *("--region", region, "--broker", self.url, "--project", self.project),
                *("--insecure", "--log-level", "info"),
            ),
        )

    def simulate(self, n: int, regions: int) -> Proc:
        """``edgefl simulate``: devices dev-0000.. on the n-device digits partition."""
        return self.procs.spawn(
            "fleet",
            edgefl(
                "simulate",
                *("--devices", str(n), "--regions", str(regions)),
                *("--broker", self.url, "--project", self.project, "--insecure"),
            ),
        )

    def tool(self, name: str, command: str, *args: str) -> Proc:
        """``python -m tests.chaos.procs <command>`` on this cluster's broker and project."""
        return self.procs.spawn(
            name,
            [
                *(sys.executable, "-m", "tests.chaos.procs", command),
                *("--broker", self.url, "--project", self.project, *args),
            ],
        )

    def partial_fleet(self, n: int, partition: int, regions: int) -> Proc:
        """Devices 0..n-1 of a ``partition``-device split (the rest run elsewhere)."""
        return self.tool(
            "fleet",
            "fleet",
            *("--devices", str(n), "--partition", str(partition), "--regions", str(regions)),
        )

    def agent(self, k: int, partition: int, region: str, broker_url: str) -> Proc:
        """``edgefl-agent`` for device k of a ``partition``-device split, with its data file."""
        from edgefl.tasks import digits

        X, y = digits.device_data(partition, k)
        data = self.workdir / f"{device_name(k)}.npz"
        np.savez(data, X=X, y=y)
        conf = self.workdir / f"{device_name(k)}.json"
        conf.write_text(json.dumps({"min_backoff_s": 0.2, "max_backoff_s": 1.0}))
        return self.procs.spawn(
            f"agent-{device_name(k)}",
            [
                sys.executable,
                "-m",
                "device_agent.cli",
                *("--config", str(conf), "--broker-url", broker_url),
                *("--project", self.project, "--region", region),
                *("--device-id", device_name(k), "--data-path", str(data), "--seed", str(k)),
                *("--log-level", "info"),
            ],
        )

    def controller(self, name: str, *args: str) -> Proc:
        return self.procs.spawn(
            name,
            edgefl(
                "controller",
                *("--broker", self.url, "--project", self.project),
                *("--state", self.state_url, "--models", str(self.models_dir)),
                *("--insecure", "--log-level", "info"),
                *args,
            ),
        )

    def create_session(self, session_id: str, **config: Any) -> Any:
        """Create a digits session (softmax, lr 0.1, batch 32 unless given) in the store.

        Uses ``Controller.create_session`` without connecting it: the session is then run by
        ``edgefl controller --resume``, with every field of the config chosen by the test.
        """
        from edgefl.controller import Controller, SessionConfig
        from edgefl.store.blobs import FileBlobStore
        from edgefl.tasks import digits

        cfg = SessionConfig(
            session_id=session_id,
            **{"train": {"model": "softmax", "lr": 0.1, "batch_size": 32}, **config},
        )
        ctl = Controller(self.url, self.store, FileBlobStore(self.models_dir), project=self.project)
        ctl.create_session(cfg, digits.initial_weights(cfg.train["model"]))
        return cfg


# observing the broker ------------------------------------------------------------------------
def mqtt_client(url: str, client_id: str, v5: bool = False) -> paho.Client:
    """A raw paho client (MQTT 3.1.1 unless ``v5``), not yet connected."""
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
    )


class Watcher:
    """Sees the project's whole topic tree, and survives broker restarts (re-subscribes).

    Thread-safe: paho's thread writes, the test reads under the lock.
    """

    def __init__(self, url: str, project: str) -> None:
        self.topics = Topics(project)
        self.lock = threading.Lock()
        self.devices: dict[str, str] = {}  # device -> state
        self.combiners: dict[str, str] = {}  # region -> state
        self.tasks: dict[str, set[str]] = {}  # task id -> devices it was sent to
        self.update_chunks: dict[str, dict[str, int]] = {}  # task id -> device -> chunks seen
        self.models: dict[str, float] = {}  # version -> when its last chunk was seen
        self._model_parts: dict[str, set[int]] = {}
        addr = parse_broker_url(url)
        self.client = mqtt_client(url, f"watch-{project}-{os.getpid()}-{id(self):x}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, *_a: Any) -> None:
        client.subscribe(f"{self.topics.base}/#", qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")[3:]  # after edgefl/v1/{project}
        payload = bytes(msg.payload)
        with contextlib.suppress(Exception), self.lock:
            if parts[0] == "model" and payload:
                chunk = parse_chunk(payload)
                got = self._model_parts.setdefault(chunk.transfer, set())
                got.add(chunk.index)
                if len(got) == chunk.count and chunk.transfer not in self.models:
                    self.models[chunk.transfer] = time.time()
            elif len(parts) == 4 and parts[1] == "dev" and parts[3] == "status" and payload:
                self.devices[parts[2]] = decode(payload, "status")["state"]
            elif len(parts) == 3 and parts[1] == "comb" and parts[2] == "status" and payload:
                self.combiners[parts[0]] = decode(payload, "status")["state"]
            elif len(parts) == 4 and parts[1] == "dev" and parts[3] == "task":
                self.tasks.setdefault(decode(payload, "task")["task_id"], set()).add(parts[2])
            elif len(parts) == 4 and parts[1] == "dev" and parts[3] == "update":
                task = str(parse_chunk(payload).meta.get("task_id"))
                per = self.update_chunks.setdefault(task, {})
                per[parts[2]] = per.get(parts[2], 0) + 1

    def online_devices(self) -> set[str]:
        with self.lock:
            return {d for d, s in self.devices.items() if s == "online"}

    def online_combiners(self) -> set[str]:
        with self.lock:
            return {r for r, s in self.combiners.items() if s == "online"}

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_models(url: str, project: str, settle_s: float = 1.0) -> dict[str, bytes | None]:
    """The model tree as a fresh subscriber finds it: version -> its whole verified blob, or
    None when the retained chunks of that version are incomplete or do not verify."""
    topics = Topics(project)
    chunks: dict[str, list[bytes]] = {}
    lock = threading.Lock()
    client = mqtt_client(url, f"retained-{project}-{os.getpid()}")

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.payload:
            with lock:
                chunks.setdefault(msg.topic.split("/")[-2], []).append(bytes(msg.payload))

    client.on_message = on_message
    addr = parse_broker_url(url)
    client.connect(addr.host, addr.port)
    client.loop_start()
    client.subscribe(f"{topics.base}/model/+/+", qos=1)
    time.sleep(settle_s)
    client.disconnect()
    client.loop_stop()
    out: dict[str, bytes | None] = {}
    for version, payloads in chunks.items():
        reasm = Reassembler()
        out[version] = None
        for p in payloads:
            with contextlib.suppress(ChunkError):
                done = reasm.feed("broker", p)
                if done is not None:
                    out[version] = done.payload
    return out


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    procs: Procs | None = None,
    alive: Iterable[Proc] = (),
    poll_s: float = 0.005,
) -> Any:
    """Poll ``predicate`` until truthy; fail naming ``what`` (and any child that died)."""
    watched = list(alive)
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if procs is not None:
            procs.check_alive(*watched)
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


# a flaky link ------------------------------------------------------------------------------
class LinkProxy:
    """A loopback TCP proxy in front of the broker for one device.

    Once ``arm``ed, after the device->broker stream has carried ``marker`` (its update topic)
    and ``cut_after`` more bytes, it closes both sides mid-upload, calls ``on_cut``, and then
    refuses new connections for ``refuse_s`` seconds (``float('inf')``: the device never gets
    back). Cuts at most once.
    """

    def __init__(
        self,
        target_port: int,
        marker: bytes,
        cut_after: int,
        refuse_s: float,
        on_cut: Callable[[], None] | None = None,
    ) -> None:
        self.target = (HOST, target_port)
        self.marker, self.cut_after, self.refuse_s = marker, cut_after, refuse_s
        self.on_cut = on_cut
        self.cut_at: float | None = None
        self.refused = 0
        self._armed = False
        self._refuse_until = 0.0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._srv = socket.create_server((HOST, 0))
        self.port: int = self._srv.getsockname()[1]
        self.url = f"mqtt://{HOST}:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self) -> None:
        self._armed = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            state = {"seen": False, "sent": 0}
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, state, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upward: bool) -> None:
        window = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upward and self._armed and self.cut_at is None:
                    window = (window + data)[-2 * 65536 :]
                    if not state["seen"] and self.marker in window:
                        state["seen"] = True
                        # count from the marker: minus the bytes of this read before it, or
                        # plus those already forwarded when it began in an earlier read
                        from_marker = len(window) - window.index(self.marker)
                        state["sent"] = from_marker - len(data)
                    if state["seen"]:
                        room = max(0, self.cut_after - state["sent"])
                        if len(data) >= room:
                            dst.sendall(data[:room])
                            self._cut()
                            break
                        state["sent"] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _cut(self) -> None:
        self.cut_at = time.time()
        self._refuse_until = time.monotonic() + self.refuse_s
        if self.on_cut is not None:
            self.on_cut()

    def close(self) -> None:
        self._srv.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.close()


# hostile and partial processes (run as `python -m tests.chaos.procs ...`) -------------------
def _until_signalled() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


def run_fleet(url: str, project: str, n: int, partition: int, regions: int) -> None:
    """Devices 0..n-1 of a ``partition``-device digits split, until SIGTERM."""
    from edgefl.deploy import region_names
    from edgefl.fleet.simulate import start_fleet

    fleet = start_fleet(url, n, region_names(regions), project=project, partition_size=partition)
    print(f"{n} devices of a {partition}-device partition connected", flush=True)
    try:
        _until_signalled()
    finally:
        fleet.stop()


def run_flooder(url: str, project: str, region: str, device: str, transfers: int) -> None:
    """A device that announces itself, and on its first task opens ``transfers`` distinct
    chunked transfers on its update topic, sending only their first chunk, then goes quiet.

    Each transfer declares 2 KiB in two 1 KiB chunks, so only the number of transfers (not
    their size) attacks the combiner. Prints one JSON line when the flood is acknowledged.
    """
    topics = Topics(project)
    status = topics.device(region, device, "status")
    client = mqtt_client(url, f"edgefl-{project}-{device}")
    client.will_set(status, encode("status", state="offline", ts=time.time()), 1, True)
    client.max_inflight_messages_set(1000)
    tasks: list[dict] = []
    got_task = threading.Event()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with contextlib.suppress(Exception):
            tasks.append(decode(bytes(msg.payload), "task"))
            got_task.set()

    client.on_message = on_message
    addr = parse_broker_url(url)
    client.connect(addr.host, addr.port)
    client.loop_start()
    client.subscribe(topics.device(region, device, "task"), qos=1)
    online = encode("status", state="online", ts=time.time(), device=device, region=region)
    client.publish(status, online, qos=1, retain=True).wait_for_publish(10)
    print("flooder online", flush=True)
    got_task.wait()
    t0 = time.time()
    topic = topics.device(region, device, "update")
    body = os.urandom(2048)
    infos = []
    for i in range(transfers):
        first = split_payload(body, 1024, transfer=f"flood-{i:06d}-{os.urandom(4).hex()}")[0]
        infos.append(client.publish(topic, first.to_bytes(), qos=1))
    for info in infos:
        info.wait_for_publish(120)
    print(
        json.dumps(
            {
                "flood_transfers": transfers,
                "flood_s": time.time() - t0,
                "flood_done_at": time.time(),
                "task": tasks[0]["task_id"],
            }
        ),
        flush=True,
    )
    try:
        _until_signalled()
    finally:
        client.disconnect()
        client.loop_stop()


DEVICE_CHANNELS = ("task", "update", "status", "telemetry", "request")
COMBINER_CHANNELS = ("round", "partial", "progress", "status")
INJECTION_KINDS = ("random", "truncated", "bitflip", "replay")


class Injector:
    """Publishes hostile payloads on every topic of a project, at a fixed rate.

    It listens to the real traffic (MQTT 5 with no-local, so it never learns from its own
    output) to learn the topic tree and real payloads, then each message is one of: random
    bytes or a random CBOR map that looks like a message, a real payload truncated, a real
    payload with 1-8 bits flipped, or a real payload replayed verbatim (on its own topic or
    another). Nothing is retained: an unauthenticated broker lets anyone publish anything, and
    these are the faults a receiver must survive.
    """

    def __init__(self, url: str, project: str, rate: float, seed: int) -> None:
        self.topics = Topics(project)
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.seen: dict[str, list[bytes]] = {}  # topic -> recent real payloads
        self.regions: set[str] = set()
        self.devices: set[tuple[str, str]] = set()
        self.versions: set[str] = set()
        self.sent: dict[str, int] = dict.fromkeys(INJECTION_KINDS, 0)
        self.channels: dict[str, int] = {}
        self.client = mqtt_client(url, f"inject-{project}-{os.getpid()}", v5=True)
        self.client.on_message = self._on_message
        self.client.max_queued_messages_set(1000)
        addr = parse_broker_url(url)
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        from paho.mqtt.subscribeoptions import SubscribeOptions

        no_local = SubscribeOptions(qos=1, noLocal=True)
        self.client.subscribe(f"{self.topics.base}/#", options=no_local)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")[3:]
        with self.lock:
            if msg.payload:
                ring = self.seen.setdefault(msg.topic, [])
                ring.append(bytes(msg.payload))
                del ring[:-8]
            if len(parts) == 4 and parts[1] == "dev":
                self.regions.add(parts[0])
                self.devices.add((parts[0], parts[2]))
            elif len(parts) == 3 and parts[1] == "comb":
                self.regions.add(parts[0])
            elif len(parts) == 3 and parts[0] == "model":
                self.versions.add(parts[1])

    def _topic_universe(self) -> list[str]:
        t = self.topics
        out = set(self.seen)
        for region, device in self.devices:
            out.update(t.device(region, device, ch) for ch in DEVICE_CHANNELS)
        for region in self.regions:
            out.update(t.combiner(region, ch) for ch in COMBINER_CHANNELS)
        for version in self.versions:
            out.update(t.model_chunk(version, i) for i in range(3))
        out.add(f"{t.base}/ctl/status")
        return sorted(out)

    def _payload(self, kind: str, real: list[bytes]) -> bytes:
        rng = self.rng
        if kind == "random" or not real:
            if rng.random() < 0.5:
                return rng.randbytes(rng.randrange(0, 4096))
            import cbor2

            mtype = rng.choice(
                [
                    "task",
                    "update",
                    "decline",
                    "status",
                    "telemetry",
                    "round",
                    "close",
                    "progress",
                    "partial",
                    "fetch",
                    "chunk",
                ]
            )
            fields = {
                rng.choice(
                    [
                        "task_id",
                        "round",
                        "state",
                        "xfer",
                        "i",
                        "n",
                        "size",
                        "devices",
                        "deadline",
                        "sums",
                        "tensors",
                        "model_version",
                        "meta",
                    ]
                ): rng.choice(
                    [
                        None,
                        True,
                        -1,
                        2**70,
                        1e308,
                        "x" * rng.randrange(300),
                        rng.randbytes(64),
                        [],
                        {},
                        [1, [2, [3]]],
                    ]
                )
                for _ in range(rng.randrange(1, 8))
            }
            return bytes(cbor2.dumps({"v": rng.choice([1, 1, 2, None]), "type": mtype, **fields}))
        src = real[-1] if rng.random() < 0.5 else rng.choice(real)  # the newest is the live one
        if kind == "truncated":
            return src[: rng.randrange(0, max(1, len(src)))]
        if kind == "bitflip":
            buf = bytearray(src)
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
            return bytes(buf)
        return src  # replay

    def run(self, stop: threading.Event) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not stop.is_set():
            with self.lock:
                universe = self._topic_universe()
                real_topics = list(self.seen)
            kind = self.rng.choice(INJECTION_KINDS)
            topic = self.rng.choice(universe)
            channel = _channel(topic)
            # the real payload to replay or mutate: mostly one of this topic's own, or one of
            # the same channel elsewhere (another device's update on this device's topic),
            # sometimes anything at all
            same = [t for t in real_topics if _channel(t) == channel and t != topic]
            pick = self.rng.random()
            if topic in self.seen and pick < 0.4:
                source: str | None = topic
            elif same and pick < 0.9:
                source = self.rng.choice(same)
            else:
                source = self.rng.choice(real_topics) if real_topics else None
            with self.lock:
                real = list(self.seen.get(source, [])) if source else []
            payload = self._payload(kind, real)
            with contextlib.suppress(ValueError, RuntimeError):
                self.client.publish(topic, payload, qos=self.rng.choice([0, 1]), retain=False)
                self.sent[kind] += 1
                self.channels[channel] = self.channels.get(channel, 0) + 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell behind by a second: do not burst

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _channel(topic: str) -> str:
    """The last level that names what a topic carries (``model`` for model chunks)."""
    return "model" if "/model/" in topic else topic.rsplit("/", 1)[-1]


def run_injector(url: str, project: str, rate: float, seed: int) -> None:
    """Inject until SIGTERM, then print one JSON line: counts per kind and per channel."""
    inj = Injector(url, project, rate, seed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    t0 = time.monotonic()
    print("injector running", flush=True)
    inj.run(stop)
    elapsed = time.monotonic() - t0
    inj.close()
    total = sum(inj.sent.values())
    print(
        json.dumps(
            {
                "injected": total,
                "seconds": elapsed,
                "rate": total / elapsed if elapsed else 0.0,
                "kinds": inj.sent,
                "channels": inj.channels,
            }
        ),
        flush=True,
    )


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object (a process's summary)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out: dict[str, Any] = json.loads(line)
                return out
    raise AssertionError(f"no JSON summary line in:\n{text[-2000:]}")


def blob_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.procs")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("fleet", "flood", "inject"):
        s = sub.add_parser(name)
        s.add_argument("--broker", required=True)
        s.add_argument("--project", required=True)
        if name == "fleet":
            s.add_argument("--devices", type=int, required=True)
            s.add_argument("--partition", type=int, required=True)
            s.add_argument("--regions", type=int, default=1)
        elif name == "flood":
            s.add_argument("--region", default="region-0")
            s.add_argument("--device", default="flood")
            s.add_argument("--transfers", type=int, default=20_000)
        else:
            s.add_argument("--rate", type=float, default=500.0)
            s.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "fleet":
        run_fleet(a.broker, a.project, a.devices, a.partition, a.regions)
    elif a.cmd == "flood":
        run_flooder(a.broker, a.project, a.region, a.device, a.transfers)
    else:
        run_injector(a.broker, a.project, a.rate, a.seed)


if __name__ == "__main__":
    main()
