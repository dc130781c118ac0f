"""A simulated fleet: N real device agents in one process, each with its own MQTT connection.

Nothing is short-circuited: every virtual device runs the same ``DeviceAgent`` a Raspberry Pi
would, so a simulation exercises the real protocol, broker and combiners.

Two modes, the same agents:
- **threads** (small fleets): each agent owns paho's network thread and a worker thread, as on
  a device.
- **shared** (large fleets, the default above ``SHARED_ABOVE`` devices): the agents' MQTT
  connections share a few ``SharedLoop`` threads and their tasks a pool of ``workers``
  threads. Each device keeps its own connection (client id, credentials, persistent session,
  last will, subscriptions, QoS 1 state); only threads are shared. This is what lets one
  machine run 1,000 training devices, or 10,000 connected ones.

Start other connections of the same process (a controller, combiners) before a large shared
fleet: paho's own network thread watches its socket with ``select()``, which fails for a file
descriptor above 1023, and the fleet's sockets take the low numbers.

A device whose partition is empty (the Dirichlet split leaves some devices without examples
when N is large) starts like any other and declines its tasks with "no local data".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.system_metrics import SystemMetrics
from device_agent.trainers.base import Trainer
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl.auth.credentials import Logins
from edgefl.auth.tokens import Role
from edgefl.tasks import digits
from edgefl.transport.multiplex import SharedLoop

log = logging.getLogger(__name__)

TrainerFactory = Callable[[int, np.ndarray, np.ndarray], Trainer]
"""(device index, local X, local y) -> the trainer that device runs."""

SHARED_ABOVE = 64  # fleets larger than this share threads unless told otherwise
DEFAULT_WORKERS = 64  # task threads of a shared fleet: tasks block on broker round trips


def ensure_descriptors(n_devices: int, spare: int = 256) -> int:
    """Raise this process's soft ``ulimit -n`` towards what ``n_devices`` connections need
    (one descriptor each, plus ``spare``), up to the hard limit; return the soft limit.

    A shell's default soft limit is often 1024: past it, connects fail with "Too many open
    files" (the fleet then reports it). Only the hard limit needs an administrator.
    """
    try:
        import resource
    except ImportError:  # not Unix: nothing to raise
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n_devices + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning(
                "ulimit -n: hard limit %d is below the %d descriptors %d devices need",
                hard,
                want,
                n_devices,
            )
        return new
    return soft


def numpy_trainer(_k: int, X: np.ndarray, y: np.ndarray) -> Trainer:
    return NumpyTrainer(X, y)


def device_name(k: int) -> str:
    return f"dev-{k:04d}"


class SharedSystemMetrics(SystemMetrics):
    """One process's system readings for all its simulated devices, sampled at most once per
    ``max_age_s``: reading /proc and /sys for each of 1,000 devices per round would cost more
    than their training. Thread-safe (the pool's workers share it)."""

    def __init__(self, max_age_s: float = 1.0) -> None:
        super().__init__()
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._at = -1e18

    def sample(self) -> dict[str, float]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.max_age_s:
                self._last = super().sample()
                self._at = now
            return dict(self._last)


@dataclass
class Fleet:
    """The agents of a simulation; ``stop`` disconnects them all (each says offline first)."""

    agents: list[DeviceAgent] = field(default_factory=list)
    loops: list[SharedLoop] = field(default_factory=list)
    executor: ThreadPoolExecutor | None = None

    def stop(self) -> None:
        if self.loops:  # thousands of goodbyes: say them concurrently
            with ThreadPoolExecutor(16, thread_name_prefix="fleet-stop") as pool:
                list(pool.map(lambda a: a.stop(), self.agents))
        else:
            for agent in self.agents:
                agent.stop()
        self.agents.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
        for loop in self.loops:
            loop.stop()
        self.loops.clear()

    @property
    def completed_tasks(self) -> int:
        return sum(a.completed for a in self.agents)

    @property
    def shared(self) -> bool:
        return bool(self.loops)

    def online(self) -> int:
        """Devices whose MQTT session is up right now."""
        return sum(1 for a in self.agents if a.conn.connected.is_set())

    def wait_online(self, timeout: float) -> int:
        """Wait until every device is connected (or ``timeout``); return how many are."""
        end = time.monotonic() + timeout
        for agent in self.agents:
            if not agent.conn.connected.wait(max(0.0, end - time.monotonic())):
                break
        return self.online()


def start_fleet(
    broker_url: str | Mapping[str, str],
    n_devices: int,
    regions: list[str],
    *,
    project: str = "default",
    credentials: Logins | None = None,
    chunk_size: int = 1024 * 1024,
    on_started: Callable[[int], None] | None = None,
    partition_size: int | None = None,
    trainer_factory: TrainerFactory = numpy_trainer,
    agent_options: dict[str, Any] | None = None,
    shared: bool | None = None,
    loops: int = 1,
    workers: int | None = None,
    connect_timeout_s: float | None = None,
    first_device: int = 0,
) -> Fleet:
    """Start ``n_devices`` agents on the digits partition; device k lives in regions[k % R].

    ``partition_size`` (default ``n_devices``) is the fleet size the data is split for, so a
    run can start only part of a partitioned fleet here (devices ``first_device`` onwards)
    and the rest elsewhere. ``broker_url`` may map each region to its own broker (regional
    brokers). ``shared`` (default: above ``SHARED_ABOVE`` devices) runs the agents on
    ``loops`` shared network threads and ``workers`` task threads; it returns once every
    device is online, or raises ``ConnectionError`` after ``connect_timeout_s`` (default
    10 s plus 10 ms per device).
    """
    if n_devices < 1 or not regions:
        raise ValueError("need at least one device and one region")
    urls = broker_url if not isinstance(broker_url, str) else dict.fromkeys(regions, broker_url)
    if shared is None:
        shared = n_devices > SHARED_ABOVE
    fleet = Fleet()
    metrics: SystemMetrics | None = None
    if shared:
        ensure_descriptors(n_devices)
        fleet.loops = [SharedLoop(f"fleet-loop-{i}").start() for i in range(max(1, loops))]
        fleet.executor = ThreadPoolExecutor(
            workers or min(DEFAULT_WORKERS, n_devices), thread_name_prefix="fleet-task"
        )
        metrics = SharedSystemMetrics()
    size = partition_size or (first_device + n_devices)
    try:
        for i in range(n_devices):
            k = first_device + i
            X, y = digits.device_data(size, k)
            dev, region = device_name(k), regions[k % len(regions)]
            cfg = AgentConfig(
                broker_url=urls[region],
                project=project,
                region=region,
                device_id=dev,
                password=credentials.token(dev, Role.device, region) if credentials else None,
                seed=k,
                max_chunk_size=chunk_size,
                min_backoff_s=0.2,
                max_backoff_s=5.0,
                **(agent_options or {}),
            )
            trainer = trainer_factory(k, X, y)
            if shared:
                agent = DeviceAgent(
                    cfg,
                    trainer,
                    loop=fleet.loops[i % len(fleet.loops)],
                    executor=fleet.executor,
                    system_metrics=metrics,
                )
                fleet.agents.append(agent.start(timeout=None))
            else:
                fleet.agents.append(DeviceAgent(cfg, trainer).start())
            if on_started:
                on_started(i + 1)
        if shared:
            timeout = connect_timeout_s if connect_timeout_s is not None else 10 + 0.01 * n_devices
            online = fleet.wait_online(timeout)
            if online < n_devices:
                refusals = sorted({str(a.conn.last_refusal) for a in fleet.agents} - {"None"})
                raise ConnectionError(
                    f"only {online} of {n_devices} simulated devices connected within "
                    f"{timeout:.0f}s ({'; '.join(refusals) or 'no CONNACK'})"
                )
    except Exception:
        fleet.stop()
        raise
    return fleet
