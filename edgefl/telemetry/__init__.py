"""Telemetry sinks: one interface, pluggable backends (JSON lines now; InfluxDB next)."""

from edgefl.telemetry.base import NullSink, Point, TelemetrySink
from edgefl.telemetry.jsonl import JsonLinesSink

__all__ = ["JsonLinesSink", "NullSink", "Point", "TelemetrySink"]
