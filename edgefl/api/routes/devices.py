"""Devices and combiners as the controllers last saw them, from the store's fleet tables.

The controllers write presence, tasks, last telemetry and update counts in batches every
second or so (``edgefl.controller.fleet_state``), so these lists lag the broker by about
that much and never touch it. Lists are cut in the database (limit/offset and a count).
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import (
    ApiContext,
    Ctx,
    PageParams,
    as_viewer,
    page,
    page_headers,
    paginate,
)
from edgefl.api.schemas import CombinerSummary, DeviceDetail, DeviceSummary
from edgefl.store.base import CombinerRecord, DeviceRecord

router = APIRouter(tags=["devices"])


def summary(d: DeviceRecord) -> DeviceSummary:
    """The listed view of a device row."""
    return DeviceSummary(
        project=d.project,
        device=d.device,
        region=d.region,
        state=d.state,
        last_seen=d.last_seen,
        current_task=d.current_task,
        accepted=d.accepted,
        declined=d.declined,
        rejected=d.rejected,
    )


def detail(d: DeviceRecord) -> DeviceDetail:
    return DeviceDetail(
        **summary(d).model_dump(),
        attributes=d.attributes,
        telemetry=d.telemetry,
        telemetry_at=d.telemetry_at,
    )


def combiner(c: CombinerRecord) -> CombinerSummary:
    return CombinerSummary(**{k: getattr(c, k) for k in CombinerSummary.model_fields})


@router.get("/api/devices", response_model=list[DeviceSummary])
def list_devices(
    request: Request,
    response: Response,
    region: str | None = Query(None, max_length=64, description="only this region's"),
    state: str | None = Query(None, pattern="^(online|offline)$", description="online or offline"),
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[DeviceSummary]:
    """Devices by (project, id) of the caller's projects, with state, last seen, current task
    and update counts."""
    scope = ctx.scope(who)
    rows = ctx.store.list_devices(
        scope, region=region, state=state, limit=params.limit, offset=params.offset
    )
    total = ctx.store.count_devices(scope, region=region, state=state)
    page_headers(total, params, request, response)
    return [summary(d) for d in rows]


@router.get("/api/devices/{device}", response_model=DeviceDetail)
def get_device(
    device: str,
    project: str | None = Query(None, description="for an API serving every project"),
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> DeviceDetail:
    """One device with its attributes and last telemetry; 404 if no controller saw it (or it
    is not the caller's project's). Without ``?project=`` an API serving several projects
    looks in the caller's only project, else in ``default``."""
    mine = who.projects
    sole = mine[0] if mine is not None and len(mine) == 1 else None
    where = ctx.project or project or sole or "default"
    if not ctx.visible(where, who):
        raise ApiError(404, f"no device {device!r}")
    found = ctx.store.get_device(where, device)
    if found is None:
        raise ApiError(404, f"no device {device!r} in project {where!r}")
    return detail(found)


@router.get("/api/combiners", response_model=list[CombinerSummary], tags=["combiners"])
def list_combiners(
    request: Request,
    response: Response,
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[CombinerSummary]:
    """Combiners by region (the caller's projects'): state, the round they work on, updates
    accepted and rejected."""
    listed = [combiner(c) for c in ctx.store.list_combiners(ctx.scope(who))]
    return paginate(listed, params, request, response)
