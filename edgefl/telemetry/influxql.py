"""Reading telemetry history back from InfluxDB 1.x (``GET /query``), for the REST API.

The sinks only write; this answers "what did device D report for metric M since T" from the
same database the controller's ``--telemetry influxdb://...`` sink fills. Queries are built
from user input, so every identifier and literal goes through ``quote_ident`` and
``quote_literal`` (InfluxQL's own escapes: a value can never end its quotes), times and
limits are numbers formatted here, and nothing a caller sends is pasted in raw.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from edgefl.telemetry.base import RESERVED_FIELDS

DEVICE_MEASUREMENT = "device"  # where TelemetryForwarder writes device points
TAGS = ("project", "region", "device")  # the device measurement's tags
MAX_POINTS = 10_000  # one query returns at most this many points


class HistoryError(RuntimeError):
    """InfluxDB could not answer (unreachable, refused, or the query failed)."""


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes, with backslash and quote escaped; newlines
    end an InfluxQL string, so they are refused (no edgefl name has one)."""
    if "\n" in name:
        raise ValueError("an InfluxQL identifier cannot hold a newline")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_literal(value: str) -> str:
    """An InfluxQL string literal in single quotes: backslash, quote and newline escaped (the
    escapes InfluxQL's scanner knows), so the value stays one literal whatever it holds."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _ns(ts: float) -> str:
    """A time bound as integer nanoseconds (what a bare number means in InfluxQL)."""
    if not math.isfinite(ts):
        raise ValueError(f"time bound {ts!r} is not finite")
    return str(round(ts * 1e9))


@dataclass(frozen=True)
class HistoryPoint:
    """One stored device point: who sent it, when (unix seconds) and its metrics."""

    device: str
    region: str
    ts: float
    metrics: dict[str, float] = field(default_factory=dict)


def device_query(
    *,
    project: str | None = None,
    device: str | None = None,
    metric: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
    retention_policy: str | None = None,
) -> str:
    """The InfluxQL for a device history query, newest first (every value quoted here)."""
    source = quote_ident(DEVICE_MEASUREMENT)
    if retention_policy:
        source = f"{quote_ident(retention_policy)}.{source}"
    columns = "*" if metric is None else ", ".join(map(quote_ident, ("device", "region", metric)))
    where = [
        f"{quote_ident(tag)} = {quote_literal(value)}"
        for tag, value in (("project", project), ("device", device))
        if value is not None
    ]
    if since is not None:
        where.append(f"time >= {_ns(since)}")
    if until is not None:
        where.append(f"time <= {_ns(until)}")
    q = f"SELECT {columns} FROM {source}"
    if where:
        q += " WHERE " + " AND ".join(where)
    return q + f" ORDER BY time DESC LIMIT {max(1, min(int(limit), MAX_POINTS))}"


class InfluxV1Reader:
    """Queries an InfluxDB 1.x database over its v1 HTTP API (urllib, like ``InfluxV1Sink``).

    Stateless: each call is one ``POST /query`` (POST keeps the query out of access logs).
    A database that does not exist yet (nothing written) reads as empty, not as an error.
    """

    def __init__(
        self,
        base_url: str,
        database: str,
        *,
        username: str | None = None,
        password: str | None = None,
        retention_policy: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.database = database
        self.retention_policy = retention_policy
        self.timeout_s = timeout_s
        self._headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if username:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def describe(self) -> str:
        """Where it reads, without credentials (for logs and error messages)."""
        return f"{self.base_url}/{self.database}"

    def query(self, q: str) -> list[dict[str, Any]]:
        """The first statement's series (``name``, ``columns``, ``values``; times in ns)."""
        data = urllib.parse.urlencode({"q": q, "db": self.database, "epoch": "ns"}).encode()
        req = urllib.request.Request(
            f"{self.base_url}/query", data=data, headers=self._headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                out = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300].strip()
            raise HistoryError(f"InfluxDB {self.describe()}: HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise HistoryError(f"InfluxDB {self.describe()} unreachable: {exc}") from None
        results = out.get("results") or [{}]
        error = results[0].get("error") or out.get("error")
        if error:
            if "database not found" in str(error):
                return []
            raise HistoryError(f"InfluxDB {self.describe()}: {error}")
        series: list[dict[str, Any]] = results[0].get("series") or []
        return series

    def device_points(
        self,
        *,
        project: str | None = None,
        device: str | None = None,
        metric: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[HistoryPoint]:
        """Device telemetry points, newest first, filtered; only ``metric`` when given."""
        q = device_query(
            project=project,
            device=device,
            metric=metric,
            since=since,
            until=until,
            limit=limit,
            retention_policy=self.retention_policy,
        )
        points: list[HistoryPoint] = []
        for series in self.query(q):
            columns: list[str] = series.get("columns", [])
            tags: dict[str, str] = series.get("tags") or {}
            for values in series.get("values", []):
                row = {**tags, **dict(zip(columns, values))}
                metrics = {
                    k: float(v)
                    for k, v in row.items()
                    if k not in RESERVED_FIELDS
                    and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                }
                if not metrics:
                    continue
                points.append(
                    HistoryPoint(
                        device=str(row.get("device") or ""),
                        region=str(row.get("region") or ""),
                        ts=int(row["time"]) / 1e9,
                        metrics=metrics,
                    )
                )
        points.sort(key=lambda p: (-p.ts, p.device))
        return points
