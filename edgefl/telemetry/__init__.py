"""Telemetry sinks: one interface, pluggable backends (JSON lines is the only one so far)."""

from __future__ import annotations

from edgefl.telemetry.base import NullSink, Point, TelemetrySink
from edgefl.telemetry.jsonl import JsonLinesSink

__all__ = ["JsonLinesSink", "NullSink", "Point", "TelemetrySink"]
