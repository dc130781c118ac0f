"""A simulated fleet: N real device agents in one process, each with its own MQTT connection.

Nothing is short-circuited: every virtual device runs the same ``DeviceAgent`` a Raspberry Pi
would, so a simulation exercises the real protocol, broker and combiners.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.trainers.base import Trainer
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl.auth.credentials import Logins
from edgefl.auth.tokens import Role
from edgefl.tasks import digits

log = logging.getLogger(__name__)

TrainerFactory = Callable[[int, np.ndarray, np.ndarray], Trainer]
"""(device index, local X, local y) -> the trainer that device runs."""


def numpy_trainer(_k: int, X: np.ndarray, y: np.ndarray) -> Trainer:
    return NumpyTrainer(X, y)


def device_name(k: int) -> str:
    return f"dev-{k:04d}"


@dataclass
class Fleet:
    """The agents of a simulation; ``stop`` disconnects them all (each says offline first)."""

    agents: list[DeviceAgent] = field(default_factory=list)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.agents.clear()

    @property
    def completed_tasks(self) -> int:
        return sum(a.completed for a in self.agents)


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
) -> Fleet:
    """Start ``n_devices`` agents on the digits partition; device k lives in regions[k % R].

    ``partition_size`` (default ``n_devices``) is the fleet size the data is split for, so a
    run can start only part of a partitioned fleet here and the rest elsewhere.
    ``broker_url`` may map each region to its own broker (regional brokers).
    """
    if n_devices < 1 or not regions:
        raise ValueError("need at least one device and one region")
    urls = broker_url if not isinstance(broker_url, str) else dict.fromkeys(regions, broker_url)
    fleet = Fleet()
    try:
        for k in range(n_devices):
            X, y = digits.device_data(partition_size or n_devices, k)
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
            fleet.agents.append(DeviceAgent(cfg, trainer_factory(k, X, y)).start())
            if on_started:
                on_started(k + 1)
    except Exception:
        fleet.stop()
        raise
    return fleet
