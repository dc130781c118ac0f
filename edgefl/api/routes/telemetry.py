"""Telemetry queries: each device's last metrics from the store, or its history from InfluxDB.

Without a history backend, the controllers' device table answers: every device's last
accepted telemetry (with when it was measured), one point per device, ``source: "store"``.
With one (``edgefl dashboard --telemetry influxdb://host:8086/DB``, the database the
controller's sink fills; attached with ``use_history``), the same query answers from the
history, ``source: "influxdb"``, with InfluxQL built by ``edgefl.telemetry.influxql``, which
quotes every value a caller sends. The ``X-Telemetry-Source`` header says the same, so even
an empty answer tells which one was asked.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime, timezone
from typing import Protocol

from fastapi import APIRouter, FastAPI, Query, Request, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import MAX_LIMIT, ApiContext, Ctx, as_viewer
from edgefl.api.schemas import TelemetryPoint
from edgefl.store.base import DeviceRecord
from edgefl.telemetry.base import NAME
from edgefl.telemetry.influxql import HistoryError, HistoryPoint

log = logging.getLogger("edgefl.api")

router = APIRouter(prefix="/api/telemetry", tags=["telemetry"])

SCAN = 100_000  # devices read at most to answer one query from the store
SOURCE_HEADER = "X-Telemetry-Source"
_AGO = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class TelemetryHistory(Protocol):
    """What answers history queries (``edgefl.telemetry.influxql.InfluxV1Reader``)."""

    def describe(self) -> str:
        """Where it reads, without credentials."""
        ...

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
        """Device points, newest first."""
        ...


def use_history(app: FastAPI, history: TelemetryHistory | None) -> None:
    """Answer ``GET /api/telemetry`` from ``history`` (None: from the store again)."""
    app.state.telemetry_history = history


def parse_time(value: str | None, what: str, now: float | None = None) -> float | None:
    """A time bound: unix seconds, an age (``90s``, ``10m``, ``2h``, ``1d``, ``1w``: that long
    ago) or ISO 8601 (UTC unless it names a zone); 422 for anything else."""
    if value is None or value == "":
        return None
    text = value.strip()
    try:
        ts = float(text)
    except ValueError:
        pass
    else:
        if ts != ts or ts in (float("inf"), float("-inf")):
            raise ApiError(422, f"{what}: {value[:40]!r} is not a time")
        return ts
    ago = _AGO.match(text)
    if ago:
        return (time.time() if now is None else now) - float(ago[1]) * _UNIT[ago[2]]
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            422,
            f"{what}: {value[:40]!r} is neither unix seconds, an age (10m, 2h, 1d) nor ISO 8601",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _point(d: DeviceRecord, metric: str | None) -> TelemetryPoint | None:
    if not d.telemetry or d.telemetry_at is None:
        return None
    metrics = (
        d.telemetry if metric is None else {k: v for k, v in d.telemetry.items() if k == metric}
    )
    if not metrics:
        return None
    return TelemetryPoint(
        device=d.device, region=d.region, ts=d.telemetry_at, metrics=metrics, source="store"
    )


@router.get("", response_model=list[TelemetryPoint])
def query_telemetry(
    request: Request,
    response: Response,
    device: str | None = Query(None, max_length=64, description="one device only"),
    metric: str | None = Query(None, max_length=64, description="one metric only (train_loss)"),
    since: str | None = Query(
        None, max_length=40, description="from: unix seconds, an age (10m, 2h) or ISO 8601"
    ),
    until: str | None = Query(None, max_length=40, description="to (same forms as since)"),
    limit: int = Query(100, ge=1, le=MAX_LIMIT, description="newest first, at most this many"),
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[TelemetryPoint]:
    """Device telemetry points, newest first: the history from InfluxDB when this server has
    one (``source: "influxdb"``), else each device's last point from the store (``source:
    "store"``, one per device). ``X-Telemetry-Source`` names which answered."""
    if metric is not None and not NAME.match(metric):
        raise ApiError(422, f"metric: {metric[:64]!r} is not a metric name ([A-Za-z_][\\w]*)")
    now = time.time()
    start, end = parse_time(since, "since", now), parse_time(until, "until", now)
    history: TelemetryHistory | None = getattr(request.app.state, "telemetry_history", None)
    if history is not None:
        response.headers[SOURCE_HEADER] = "influxdb"
        return _from_history(ctx.scope(who), history, device, metric, start, end, limit)
    response.headers[SOURCE_HEADER] = "store"
    scope = ctx.scope(who)
    if device is not None:
        projects = [scope] if isinstance(scope, str) else scope
        if projects is None:
            projects = sorted({d.project for d in _all(ctx, None)})
        rows = [r for p in projects if (r := ctx.store.get_device(p, device)) is not None]
    else:
        rows = _all(ctx, scope)
    points = [p for p in (_point(r, metric) for r in rows) if p is not None]
    if start is not None:
        points = [p for p in points if p.ts >= start]
    if end is not None:
        points = [p for p in points if p.ts <= end]
    points.sort(key=lambda p: (-p.ts, p.device))
    return points[:limit]


def _from_history(
    scope: str | list[str] | None,
    history: TelemetryHistory,
    device: str | None,
    metric: str | None,
    since: float | None,
    until: float | None,
    limit: int,
) -> list[TelemetryPoint]:
    """The history's points (of the caller's projects only: one query each, merged), or 502
    when it cannot answer."""
    projects: list[str | None] = [scope] if scope is None or isinstance(scope, str) else [*scope]
    found: list[HistoryPoint] = []
    try:
        for project in projects:
            found += history.device_points(
                project=project, device=device, metric=metric, since=since, until=until,
                limit=limit,
            )  # fmt: skip
    except HistoryError as exc:
        log.warning("telemetry history query failed: %s", exc)
        raise ApiError(502, f"the telemetry history cannot answer: {exc}") from None
    return [
        TelemetryPoint(device=p.device, region=p.region, ts=p.ts, metrics=p.metrics,
                       source="influxdb")
        for p in sorted(found, key=lambda p: -p.ts)[:limit]
    ]  # fmt: skip


def _all(ctx: ApiContext, scope: str | list[str] | None) -> list[DeviceRecord]:
    return ctx.store.list_devices(scope, limit=SCAN)
