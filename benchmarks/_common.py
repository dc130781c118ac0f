"""Shared helpers for the benchmarks: a private Mosquitto, RSS sampling, update encoding and the
one-line JSON report.

Every benchmark starts its own Mosquitto on a free loopback port (never the machine's broker on
1883), prints progress to stderr and exactly one JSON line of figures to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a source checkout without an installed package too
    sys.path.insert(0, str(REPO))

MOSQUITTO = "/usr/sbin/mosquitto"
MIB = 1024 * 1024

# Always passed to the broker, whichever runner starts it. Duplicated options are accepted by
# Mosquitto 2.0, so this is safe when the shared runner sets some of them too.
#  - set_tcp_nodelay: small control messages must not wait for Nagle + delayed ACK;
#  - max_packet_size: room for 1 MiB chunks and more;
#  - max_queued_messages: the default of 1000 would make the broker drop QoS 1 chunks queued
#    for a subscriber that is slower than the publishers (the combiner under a burst).
BROKER_EXTRA = "set_tcp_nodelay true\nmax_packet_size 16777216\nmax_queued_messages 100000\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup_logging(level: int = logging.WARNING) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def emit(result: dict) -> None:
    """The one line of figures on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# broker --------------------------------------------------------------------------------------
@contextlib.contextmanager
def broker(extra: str = "") -> Iterator:
    """A fresh Mosquitto on a free loopback port, stopped (and its files removed) on exit."""
    if not Path(MOSQUITTO).exists():
        raise SystemExit(f"{MOSQUITTO} not found: install the Debian package mosquitto")
    from edgefl.broker.mosquitto import MosquittoProcess

    with MosquittoProcess(0, config_extra=BROKER_EXTRA + extra) as b:
        if int(b.port) == 1883:
            raise RuntimeError("refusing to benchmark on port 1883 (the machine's own broker)")
        log(f"mosquitto on {b.url}")
        yield b


# memory --------------------------------------------------------------------------------------
def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss


def maxrss_bytes() -> int:
    """Peak RSS of the calling process so far (ru_maxrss is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples a process's RSS on a thread; ``peak`` is the highest sample since ``reset``."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self.interval_s = interval_s
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> int:
        try:
            self.last = self._proc.memory_info().rss
        except Exception:  # the process ended
            return self.last
        self.peak = max(self.peak, self.last)
        return self.last

    def reset(self) -> None:
        self.peak = 0
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.peak


def mb(n: float) -> float:
    return round(n / 1e6, 2)


# updates -------------------------------------------------------------------------------------
def model_weights(n_params: int = 1_000_000, dtype: str = "float32", seed: int = 0) -> dict:
    """A ~n_params model of two tensors (a square-ish matrix and a bias)."""
    rng = np.random.default_rng(seed)
    rows = 1000
    cols = max(1, (n_params - rows) // rows)
    return {
        "W": rng.standard_normal((rows, cols)).astype(dtype),
        "b": rng.standard_normal(rows).astype(dtype),
    }


def model_bytes(weights: dict) -> int:
    return int(sum(np.asarray(w).nbytes for w in weights.values()))


def encode_update(
    weights: dict, task_id: str, model_version: str, num_examples: int, device: str
) -> bytes:
    """The device agent's update message (see device_agent.agent.DeviceAgent._run_task)."""
    from edgefl.protocol import encode
    from edgefl.protocol.tensors import encode_tensors

    return encode(
        "update",
        task_id=task_id,
        device=device,
        model_version=model_version,
        num_examples=int(num_examples),
        metrics={"train_loss": 0.5},
        tensors=encode_tensors(weights),
    )


def round_plan(
    task_id: str, model_version: str, devices: list[str], weights: dict, chunk_size: int
) -> bytes:
    """A controller round plan for one region (see Controller._run_round)."""
    from edgefl.aggregation import spec_of
    from edgefl.protocol import encode
    from edgefl.protocol.types import spec_to_wire

    return encode(
        "round",
        task_id=task_id,
        session="bench",
        round=1,
        model_version=model_version,
        model_digest=bytes(32),
        devices=sorted(devices),
        deadline=time.time() + 3600,
        train={},
        chunk_size=chunk_size,
        spec=spec_to_wire(spec_of(weights)),
    )


class RoundOpener:
    """Plays the controller: sends a round plan and waits until the combiner has dispatched
    a task to every listed device, so a benchmark times only the uploads."""

    def __init__(self, url: str, client_id: str, project: str, region: str) -> None:
        from edgefl.protocol import Topics
        from edgefl.transport import MqttConnection

        self._topics, self._region = Topics(project), region
        self._n = 0
        self._expected = 0
        self._event = threading.Event()
        self.conn = MqttConnection(url, client_id=client_id, clean_session=True)
        self.conn.subscribe(self._topics.device_wildcard(region, "task"), self._on_task)
        self.conn.start()

    def _on_task(self, _topic: str, _payload: bytes) -> None:
        self._n += 1
        if self._n >= self._expected:
            self._event.set()

    def open_round(
        self,
        task_id: str,
        model_version: str,
        devices: list[str],
        weights: dict,
        chunk_size: int,
        timeout_s: float,
    ) -> None:
        self._n, self._expected = 0, len(devices)
        self._event.clear()
        plan = round_plan(task_id, model_version, devices, weights, chunk_size)
        self.conn.publish(self._topics.combiner(self._region, "round"), plan, qos=1)
        if not self._event.wait(timeout_s):
            raise TimeoutError("the combiner did not dispatch the round")

    def stop(self) -> None:
        self.conn.stop()


# child processes -----------------------------------------------------------------------------
def expect(pipe: Connection, what: str, timeout: float = 600.0) -> Any:
    if not pipe.poll(timeout):
        raise TimeoutError(f"no {what!r} from a child process")
    tag, value = pipe.recv()
    if tag == "error":
        raise RuntimeError(f"child process failed: {value}")
    if tag != what:
        raise RuntimeError(f"expected {what!r}, got {tag!r}")
    return value


@contextlib.contextmanager
def reporting(pipe: Connection) -> Iterator[None]:
    """A child process's body: an exception goes to the parent as ``("error", text)`` (so
    ``expect`` raises it there at once) and is raised again here."""
    try:
        yield
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


class Children:
    """Child processes with a pipe each, terminated on exit whatever happened."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: dict[str, tuple[Any, Connection]] = {}

    def spawn(self, name: str, target: Any, *args: Any) -> Connection:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(*args, child), daemon=True, name=name)
        proc.start()
        self.procs[name] = (proc, parent)
        return parent

    def pid(self, name: str) -> int:
        return int(self.procs[name][0].pid)

    def close(self) -> None:
        for _proc, pipe in self.procs.values():
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for proc, _ in self.procs.values():
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.procs.clear()


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


class CpuMeter:
    """CPU seconds spent by named processes between ``start`` and ``stop`` (summed)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.total = dict.fromkeys(pids, 0.0)
        self._t0: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = {k: _cpu_s(p) for k, p in self.pids.items()}

    def stop(self) -> None:
        for k, p in self.pids.items():
            self.total[k] += _cpu_s(p) - self._t0[k]
