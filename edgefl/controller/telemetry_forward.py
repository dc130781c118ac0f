"""Device telemetry, forwarded from the broker to the controller's telemetry sink."""

from __future__ import annotations

import logging

from edgefl.protocol import MessageError, Topics, decode
from edgefl.protocol.messages import clean_metrics
from edgefl.telemetry import Point, TelemetrySink

log = logging.getLogger(__name__)


class TelemetryForwarder:
    """Turns ``dev/{device}/telemetry`` messages into sink points tagged by region and device.

    Runs on the connection's network thread; bad messages are dropped (telemetry is
    best-effort, QoS 0) and never reach the sink.
    """

    def __init__(self, topics: Topics, sink: TelemetrySink) -> None:
        self.topics = topics
        self.sink = sink
        self.dropped = 0

    def on_telemetry(self, topic: str, payload: bytes) -> None:
        try:
            region, device, _ = self.topics.parse_device_topic(topic)
            msg = decode(payload, "telemetry")
        except (MessageError, ValueError) as exc:
            self.dropped += 1
            log.debug("controller: bad telemetry on %s: %s", topic, exc)
            return
        fields = clean_metrics(msg["metrics"])
        if fields:
            tags = {"project": self.topics.project, "region": region, "device": device}
            self.sink.write([Point("device", fields, tags, float(msg["ts"]))])
