"""The telemetry sink interface.

Points follow the InfluxDB data model (measurement, tags, fields, time), so the InfluxDB
backends are a straight mapping and the JSON-lines file holds the same records.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Protocol

# Measurement, tag and field names every backend accepts unquoted and every InfluxQL query can
# name: a letter or underscore, then letters, digits and underscores; 64 characters at most.
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Names InfluxDB keeps for itself or that edgefl uses as tags: never a field name.
RESERVED_FIELDS = frozenset({"time", "project", "region", "device", "session"})


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
