"""The telemetry sink interface.

Points follow the InfluxDB data model (measurement, tags, fields, time) so that an InfluxDB
backend (none exists yet) would be a straight mapping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Point:
    """One observation: numeric ``fields`` indexed by string ``tags``; ``ts`` is Unix time."""

    measurement: str  # e.g. "round", "device"
    fields: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


class TelemetrySink(Protocol):
    """Where points go. ``write`` may be called from several threads at once."""

    def write(self, points: list[Point]) -> None:
        """Store points; must never raise into the training path (log and drop instead)."""

    def close(self) -> None:
        """Flush and release the backend; callers stop writing first."""


class NullSink:
    """Discards every point: the default when no telemetry backend is configured."""

    def write(self, points: list[Point]) -> None:
        """Drop ``points``."""

    def close(self) -> None:
        """Nothing to release."""
