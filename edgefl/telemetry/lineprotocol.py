"""InfluxDB line protocol, shared by the 1.x and 2.x/3.x backends."""

from __future__ import annotations

import math

from edgefl.telemetry.base import Point

_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": " ", "\\": "\\\\"})
_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": " ", "\\": "\\\\"})


def line(p: Point) -> str | None:
    """``p`` as one line (nanosecond time), or None if it has no finite field to write.

    Every field is written as a float, so a metric that is sometimes integral never causes a
    field type conflict (which InfluxDB answers with 400 for the whole batch).
    """
    fields = ",".join(
        f"{k.translate(_KEY)}={float(v)!r}"
        for k, v in sorted(p.fields.items())
        if k and math.isfinite(float(v))
    )
    if not fields or not p.measurement:
        return None
    tags = "".join(
        f",{k.translate(_KEY)}={v.translate(_KEY)}" for k, v in sorted(p.tags.items()) if k and v
    )
    return f"{p.measurement.translate(_MEASUREMENT)}{tags} {fields} {round(p.ts * 1e9)}"


def body(points: list[Point]) -> bytes:
    """A write request's body: one line per writable point."""
    lines = [s for s in (line(p) for p in points) if s is not None]
    return ("\n".join(lines) + "\n").encode() if lines else b""
