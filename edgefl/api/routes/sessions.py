"""Sessions: list, read, and an operator's stop request.

Creating, starting and resuming are in ``session_control`` (a serving controller,
``edgefl controller --serve``, runs what is queued). Stop works because the running
controller polls the store for it (``edgefl.controller.stop_requests``); a session no
controller runs yet (created or queued) is stopped at once.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import (
    ApiContext,
    Ctx,
    PageParams,
    as_operator,
    as_viewer,
    page,
    page_headers,
)
from edgefl.api.schemas import SessionDetail, SessionSummary, StopAccepted
from edgefl.auth.tokens import Role
from edgefl.store.base import SessionRecord

security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api/sessions", tags=["sessions"])


def summary(s: SessionRecord) -> SessionSummary:
    """The listed view of a session record."""
    return SessionSummary(
        session_id=s.session_id,
        project=s.project,
        status=s.status,
        current_round=s.current_round,
        rounds=s.config.get("rounds"),
        aggregator=s.config.get("aggregator"),
        model_version=s.model_version,
        reason=s.reason,
        stop_requested_by=s.stop_requested_by,
        created=s.created,
        updated=s.updated,
    )


@router.get("", response_model=list[SessionSummary])
def list_sessions(
    request: Request,
    response: Response,
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[SessionSummary]:
    """Newest first, so the dashboard's default pick is simply the first one; only the
    caller's projects' sessions."""
    scope = ctx.scope(who)
    listed = ctx.store.list_sessions(
        scope, newest_first=True, limit=params.limit, offset=params.offset
    )
    page_headers(ctx.store.count_sessions(scope), params, request, response)
    return [summary(s) for s in listed]


@router.get("/{session_id}", response_model=SessionDetail)
def get_session(
    session_id: str, ctx: ApiContext = Ctx, who: Principal = as_viewer
) -> SessionDetail:
    """One session's summary plus the config it was started with; 404 if unknown."""
    sess = ctx.session(session_id, who)
    return SessionDetail(**summary(sess).model_dump(), config=sess.config)


@router.post("/{session_id}/stop", status_code=202, response_model=StopAccepted)
def stop_session(
    session_id: str, ctx: ApiContext = Ctx, who: Principal = as_operator
) -> StopAccepted:
    """Ask the session's controller to stop it (202: it acts between or during rounds).

    A created or queued session is stopped at once. 409 if the session has ended; a
    repeated request keeps the first requester.
    """
    ctx.session(session_id, who, Role.operator)
    try:
        sess = ctx.store.request_stop(session_id, who.name)
    except KeyError:
        raise ApiError(404, f"no session {session_id!r}") from None
    except ValueError as exc:
        raise ApiError(409, f"cannot stop: {exc}") from None
    security_log.warning("session %s: stop requested by %s", session_id, who.name)
    return StopAccepted(
        session_id=sess.session_id,
        status=sess.status,
        stop_requested_by=sess.stop_requested_by,
        stop_requested_at=sess.stop_requested_at,
    )
