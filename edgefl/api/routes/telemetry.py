"""Telemetry queries: each device's last metrics, from the store's device table.

The controllers keep every device's last accepted telemetry there (with when it was
measured), so this answers "what is each device reporting now" without a time-series
database; the history goes to the telemetry sink (InfluxDB: query it there, or in Grafana
with the dashboards in ``dashboards/``).
"""

from __future__ import annotations

from fastapi import APIRouter, Query

from edgefl.api.auth import Principal
from edgefl.api.routes.deps import MAX_LIMIT, ApiContext, Ctx, as_viewer
from edgefl.api.schemas import TelemetryPoint
from edgefl.store.base import DeviceRecord

router = APIRouter(prefix="/api/telemetry", tags=["telemetry"])

SCAN = 100_000  # devices read at most to answer one query


def _point(d: DeviceRecord) -> TelemetryPoint | None:
    if not d.telemetry or d.telemetry_at is None:
        return None
    return TelemetryPoint(device=d.device, region=d.region, ts=d.telemetry_at, metrics=d.telemetry)


@router.get("", response_model=list[TelemetryPoint])
def query_telemetry(
    device: str | None = Query(None, max_length=64, description="one device only"),
    since: float | None = Query(None, description="only points measured at or after (unix s)"),
    limit: int = Query(100, ge=1, le=MAX_LIMIT, description="newest first, at most this many"),
    ctx: ApiContext = Ctx,
    _: Principal = as_viewer,
) -> list[TelemetryPoint]:
    """The devices' last telemetry points, newest first (one per device: the store keeps
    the last; the full history is in the telemetry sink)."""
    if device is not None:
        projects = [ctx.project] if ctx.project else sorted({d.project for d in _all(ctx)})
        rows = [r for p in projects if (r := ctx.store.get_device(p, device)) is not None]
    else:
        rows = _all(ctx)
    points = [p for p in map(_point, rows) if p is not None]
    if since is not None:
        points = [p for p in points if p.ts >= since]
    points.sort(key=lambda p: (-p.ts, p.device))
    return points[:limit]


def _all(ctx: ApiContext) -> list[DeviceRecord]:
    return ctx.store.list_devices(ctx.project, limit=SCAN)
