"""Device telemetry, checked and forwarded from the broker to the controller's telemetry sink.

Telemetry is validated like updates: the sender's identity comes from the topic (which the
broker's ACLs bind to the device's credentials), never from the payload, and a message that
breaks a rule is dropped whole and counted by reason. ``RoundDetails`` adds to the
controller's per-round points what the store knows about the round.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edgefl.protocol import MessageError, Topics, decode
from edgefl.store.base import Store
from edgefl.telemetry import Point, TelemetrySink
from edgefl.telemetry.base import NAME, RESERVED_FIELDS

log = logging.getLogger(__name__)

MAX_PAYLOAD = 16 * 1024  # bytes: a telemetry message is a few hundred
MAX_METRICS = 64
# A device's clock may be wrong (no RTC before NTP): a time outside this window around the
# controller's clock is replaced by the arrival time, so no point lands far in the past/future.
MAX_PAST_S = 24 * 3600.0
MAX_FUTURE_S = 60.0
# Per-device token bucket: a burst of RATE_BURST messages, then RATE_PER_S a second. One
# chatty or hostile device cannot fill the sink's buffer with its points.
RATE_BURST = 20.0
RATE_PER_S = 2.0


class TelemetryForwarder:
    """Turns ``dev/{device}/telemetry`` messages into ``device`` points, tagged from the topic.

    Runs on the connection's network thread. Rules (docs/protocol.md 4.4), each a drop
    reason in ``reasons``:

    - ``topic``/``decode``: not a device telemetry topic, or not a valid ``telemetry`` message;
    - ``size``: payload over ``MAX_PAYLOAD`` bytes;
    - ``identity``: the payload names a ``device``/``region``/``project`` other than the
      topic's, or carries ``tags`` (a device cannot write another device's points);
    - ``name``: a metric name outside ``[A-Za-z_][A-Za-z0-9_]{0,63}``, or a reserved one
      (``time``, ``device``, ``region``...), or more than ``MAX_METRICS`` metrics;
    - ``value``: a value that is not a finite number (booleans included);
    - ``empty``: no metric at all;
    - ``rate``: over the device's rate budget.

    ``dropped`` is their total, ``accepted`` the messages forwarded, ``retimed`` the accepted
    ones whose time was replaced by the arrival time.
    """

    def __init__(self, topics: Topics, sink: TelemetrySink) -> None:
        self.topics = topics
        self.sink = sink
        self.accepted = 0
        self.retimed = 0
        self.reasons: Counter[str] = Counter()
        self._budget: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)
        self._lock = threading.Lock()
        # sees each accepted point too (the fleet recorder keeps a device's last metrics)
        self.on_point: Callable[[Point], None] | None = None

    @property
    def dropped(self) -> int:
        """Messages dropped, all reasons together."""
        return sum(self.reasons.values())

    def on_telemetry(self, topic: str, payload: bytes) -> None:
        now = time.time()
        point, reason = self._check(topic, payload, now)
        if point is None:
            with self._lock:
                self.reasons[reason] += 1
            log.debug("controller: telemetry on %s dropped (%s)", topic, reason)
            return
        with self._lock:
            self.accepted += 1
        self.sink.write([point])
        if self.on_point is not None:
            self.on_point(point)

    def _check(self, topic: str, payload: bytes, now: float) -> tuple[Point | None, str]:
        try:
            region, device, _ = self.topics.parse_device_topic(topic)
        except ValueError:
            return None, "topic"
        if len(payload) > MAX_PAYLOAD:
            return None, "size"
        try:
            msg = decode(payload, "telemetry")
        except MessageError:
            return None, "decode"
        claimed = {"device": device, "region": region, "project": self.topics.project}
        if "tags" in msg or any(k in msg and msg[k] != v for k, v in claimed.items()):
            return None, "identity"
        fields, reason = _fields(msg["metrics"])
        if fields is None:
            return None, reason
        if not self._spend(device, now):
            return None, "rate"
        ts = float(msg["ts"])
        if not (math.isfinite(ts) and now - MAX_PAST_S <= ts <= now + MAX_FUTURE_S):
            ts = now
            with self._lock:
                self.retimed += 1
        return Point("device", fields, claimed, ts), ""

    def _spend(self, device: str, now: float) -> bool:
        with self._lock:
            tokens, at = self._budget.get(device, (RATE_BURST, now))
            tokens = min(RATE_BURST, tokens + (now - at) * RATE_PER_S)
            if tokens < 1.0:
                self._budget[device] = (tokens, now)
                return False
            self._budget[device] = (tokens - 1.0, now)
            return True


def _fields(metrics: dict[Any, Any]) -> tuple[dict[str, float] | None, str]:
    """The metrics as sink fields, or (None, reason) if any of them breaks a rule."""
    if not metrics:
        return None, "empty"
    if len(metrics) > MAX_METRICS:
        return None, "name"
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not NAME.match(k) or k in RESERVED_FIELDS:
            return None, "name"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None, "value"
        try:
            f = float(v)
        except OverflowError:  # a CBOR bignum-sized int
            return None, "value"
        if not math.isfinite(f):
            return None, "value"
        out[k] = f
    return out, ""


class RoundDetails:
    """Wraps the controller's sink: adds to each ``round`` point what the store knows.

    The controller writes ``round`` points with the round's metrics (updates, examples,
    accuracy, loss, rejected...). This adds ``duration_s``, ``selected``, ``participants``,
    ``regions``, ``attempt`` and ``model_bytes``, and writes one ``round_region`` point per
    region (its participants and examples). A store error leaves the point
    as it was: telemetry never fails a round.
    """

    def __init__(self, sink: TelemetrySink, store: Store) -> None:
        self.sink = sink
        self.store = store

    def write(self, points: list[Point]) -> None:
        out: list[Point] = []
        for p in points:
            out.append(p)
            if p.measurement == "round" and "session" in p.tags and "round" in p.fields:
                try:
                    out[-1:] = self._details(p)
                except Exception:
                    log.warning("telemetry: no round details for %s", p.tags, exc_info=True)
        self.sink.write(out)

    def close(self) -> None:
        self.sink.close()

    def __getattr__(self, name: str) -> Any:
        """The wrapped sink's counters (``stats``, ``flush``...) stay reachable."""
        return getattr(self.sink, name)

    def _details(self, p: Point) -> list[Point]:
        r = int(p.fields["round"])
        recs = [
            rec
            for rec in self.store.list_rounds(p.tags["session"])
            if rec.round == r and rec.status == "completed"
        ]
        if not recs:
            return [p]
        rec = recs[-1]
        fields = dict(p.fields)
        if rec.finished:
            fields["duration_s"] = rec.finished - rec.started
        fields["selected"] = float(len(rec.devices))
        fields["participants"] = float(len(rec.participants))
        fields["rejected"] = float(len(rec.rejected))
        fields["attempt"] = float(rec.attempt)
        model = self.store.get_model(rec.model_out) if rec.model_out else None
        if model is not None:
            fields["model_bytes"] = float(model.size)
        regions: dict[str, dict[str, float]] = {}
        for part in rec.participants:
            agg = regions.setdefault(part["region"], {"participants": 0.0, "examples": 0.0})
            agg["participants"] += 1
            agg["examples"] += float(part["n"])
        fields["regions"] = float(len(regions))
        out = [Point("round", fields, p.tags, p.ts)]
        for region, agg in sorted(regions.items()):
            out.append(Point("round_region", agg, {**p.tags, "region": region}, p.ts))
        return out
