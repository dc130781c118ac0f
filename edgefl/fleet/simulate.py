"""A simulated fleet: N real device agents in one process, each with its own MQTT connection.

Nothing is short-circuited: every virtual device runs the same ``DeviceAgent`` a Raspberry Pi
would, so a simulation exercises the real protocol, broker and combiners.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl.tasks import digits

log = logging.getLogger(__name__)

TokenFactory = Callable[[str, str], str]  # (device_id, region) -> password/JWT


def region_names(n: int) -> list[str]:
    return [f"region-{i}" for i in range(n)]


def device_name(k: int) -> str:
    return f"dev-{k:04d}"


@dataclass
class Fleet:
    agents: list[DeviceAgent] = field(default_factory=list)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.agents.clear()

    @property
    def completed_tasks(self) -> int:
        return sum(a.completed for a in self.agents)


def start_fleet(
    broker_url: str,
    n_devices: int,
    regions: list[str],
    *,
    project: str = "default",
    token_for: TokenFactory | None = None,
    chunk_size: int = 1024 * 1024,
    on_started: Callable[[int], None] | None = None,
    partition_size: int | None = None,
) -> Fleet:
    """Start ``n_devices`` agents on the digits partition; device k lives in regions[k % R].

    ``partition_size`` (default ``n_devices``) is the fleet size the data is split for, so a
    run can start only part of a partitioned fleet here and the rest elsewhere.
    """
    if n_devices < 1 or not regions:
        raise ValueError("need at least one device and one region")
    fleet = Fleet()
    try:
        for k in range(n_devices):
            X, y = digits.device_data(partition_size or n_devices, k)
            dev, region = device_name(k), regions[k % len(regions)]
            cfg = AgentConfig(
                broker_url=broker_url,
                project=project,
                region=region,
                device_id=dev,
                password=token_for(dev, region) if token_for else None,
                seed=k,
                max_chunk_size=chunk_size,
                min_backoff_s=0.2,
                max_backoff_s=5.0,
            )
            fleet.agents.append(DeviceAgent(cfg, NumpyTrainer(X, y)).start())
            if on_started:
                on_started(k + 1)
    except Exception:
        fleet.stop()
        raise
    return fleet
