"""The telemetry sink interface.

Points follow the InfluxDB data model (measurement, tags, fields, time) so that the InfluxDB
backend is a straight mapping, and Grafana dashboards can be written against it directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Point:
    measurement: str  # e.g. "round", "device"
    fields: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


class TelemetrySink(Protocol):
    def write(self, points: list[Point]) -> None:
        """Store points; must never raise into the training path (log and drop instead)."""

    def close(self) -> None: ...


class NullSink:
    def write(self, points: list[Point]) -> None:
        pass

    def close(self) -> None:
        pass
