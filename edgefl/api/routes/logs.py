"""A session's log export: the JSON lines its controller logged, as NDJSON.

The controller keeps them in ``{state dir}/logs/{session}.jsonl`` (``SessionLogWriter``);
the dashboard serves that folder (``create_app(logs=...)``, ``edgefl dashboard`` beside its
``--models``). Scoped like every session route: another project's session is a 404.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import ApiContext, Ctx, as_viewer
from edgefl.observability.logs import read_session_log

router = APIRouter(prefix="/api/sessions", tags=["sessions"])

NDJSON = "application/x-ndjson"
LEVELS = ("debug", "info", "warning", "error", "critical")
_RANK = {name: i for i, name in enumerate(LEVELS)}


@router.get(
    "/{session_id}/logs",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {}}, "description": "one JSON log record a line"}},
)
def session_logs(
    session_id: str,
    round: int | None = Query(None, ge=0, description="only this round's lines"),
    level: str | None = Query(None, description="only lines at this level or above"),
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> StreamingResponse:
    """The session's log lines, oldest first (empty when nothing was logged yet); 404 if the
    session is unknown or this API has no log folder."""
    ctx.session(session_id, who)
    if ctx.logs is None:
        raise ApiError(404, "this API serves no session logs (start it with a logs folder)")
    if level is not None and level.lower() not in LEVELS:
        raise ApiError(422, f"level must be one of {', '.join(LEVELS)}")
    least = _RANK[level.lower()] if level else 0
    folder = ctx.logs

    def lines() -> Iterator[str]:
        for line in read_session_log(folder, session_id):
            if round is None and not least:
                yield line
                continue
            rec = json.loads(line)
            if round is not None and rec.get("round") != round:
                continue
            if least and _RANK.get(str(rec.get("level")), len(LEVELS)) < least:
                continue
            yield line

    return StreamingResponse(lines(), media_type=NDJSON)
