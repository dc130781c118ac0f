"""A session's rounds: every attempt as listed, and one round with who took part and who was
refused (and why), as the combiners reported them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import (
    ApiContext,
    Ctx,
    PageParams,
    as_viewer,
    long_page,
    page_headers,
)
from edgefl.api.schemas import Participant, Rejection, RoundDetail, RoundSummary
from edgefl.store.base import RoundRecord

router = APIRouter(prefix="/api/sessions/{session_id}/rounds", tags=["rounds"])


def _base(r: RoundRecord) -> dict[str, Any]:
    return {
        "task_id": r.task_id,
        "round": r.round,
        "attempt": r.attempt,
        "status": r.status,
        "metrics": r.metrics,
        "started": r.started,
        "finished": r.finished,
        "duration_s": (r.finished - r.started) if r.finished is not None else None,
        "model_in": r.model_in,
        "model_out": r.model_out,
        "reason": r.reason,
    }


def summary(r: RoundRecord) -> RoundSummary:
    """The listed view of a round attempt: counts of selected, accepted and refused."""
    return RoundSummary(
        **_base(r),
        participants=len(r.participants),
        selected=len(r.devices),
        rejected=len(r.rejected),
    )


@router.get("", response_model=list[RoundSummary])
def list_rounds(
    session_id: str,
    request: Request,
    response: Response,
    params: PageParams = long_page,
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[RoundSummary]:
    """Every round attempt of a session, by (round, attempt); 404 if the session is unknown.

    A page holds up to 1000 attempts by default: a whole session, for a chart.
    """
    ctx.session(session_id, who)
    listed = ctx.store.list_rounds(session_id, limit=params.limit, offset=params.offset)
    page_headers(ctx.store.count_rounds(session_id), params, request, response)
    return [summary(r) for r in listed]


@router.get("/{round_}", response_model=RoundDetail)
def get_round(
    session_id: str,
    round_: int,
    attempt: int | None = Query(None, ge=0, description="an earlier attempt; default: the last"),
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> RoundDetail:
    """One round number's last attempt (the one that counts), or ``?attempt=``, with its
    selected devices, participants (region, examples, metrics) and rejections."""
    ctx.session(session_id, who)
    attempts = [r for r in ctx.store.list_rounds(session_id) if r.round == round_]
    if not attempts:
        raise ApiError(404, f"session {session_id!r} has no round {round_}")
    if attempt is None:
        rec = attempts[-1]
    else:
        found = [r for r in attempts if r.attempt == attempt]
        if not found:
            raise ApiError(
                404,
                f"round {round_} of {session_id!r} has no attempt {attempt} "
                f"(it has {', '.join(str(r.attempt) for r in attempts)})",
            )
        rec = found[0]
    return RoundDetail(
        **_base(rec),
        selected=list(rec.devices),
        participants=[
            Participant(
                device=p["device"],
                region=p.get("region", ""),
                examples=p.get("n", 0),
                metrics=p.get("metrics", {}),
            )
            for p in rec.participants
        ],
        rejections=[Rejection(device=j["device"], reason=j["reason"]) for j in rec.rejected],
        attempts=len(attempts),
    )
