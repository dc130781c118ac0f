"""A session's model versions: metadata, lineage and the checked blob.

Each is marked ``active`` when it is its project's active model. Setting that is a project's
business (``PUT /api/projects/{project}/active-model``), never a session's: a session's
current model moves only when its controller records a round (a resumed controller would
otherwise pair a rolled-back model with later rounds' optimizer state). The active model is
honoured where a run begins: a new session with ``initial_model: "active"`` starts from it.
"""

from __future__ import annotations

import base64
import hashlib
import logging

from fastapi import APIRouter, Request, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import ApiContext, Ctx, PageParams, as_viewer, page, page_headers
from edgefl.api.schemas import Lineage, ModelSummary
from edgefl.store.base import ModelRecord

log = logging.getLogger("edgefl.api")

router = APIRouter(prefix="/api/sessions/{session_id}/models", tags=["models"])

MAX_LINEAGE = 100_000  # a chain longer than any session: a cycle in corrupt records


def summary(m: ModelRecord, active: str | None = None) -> ModelSummary:
    """The listed view of a model record; ``active`` is its project's active version."""
    return ModelSummary(
        version=m.version,
        parent=m.parent,
        round=m.round,
        digest=m.digest,
        size=m.size,
        created=m.created,
        active=active is not None and m.version == active,
    )


def active_version(ctx: ApiContext, project: str) -> str | None:
    """The project's active model version, or None."""
    settings = ctx.store.get_project(project)
    return settings.active_model if settings else None


def _model(ctx: ApiContext, session_id: str, version: str, who: Principal) -> ModelRecord:
    ctx.session(session_id, who)
    model = ctx.store.get_model(version)
    if model is None or model.session_id != session_id:
        raise ApiError(404, f"session {session_id!r} has no model version {version!r}")
    return model


@router.get("", response_model=list[ModelSummary])
def list_models(
    session_id: str,
    request: Request,
    response: Response,
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[ModelSummary]:
    """The model versions a session produced, oldest first (metadata; blobs: download);
    ``active`` marks its project's active model."""
    sess = ctx.session(session_id, who)
    listed = ctx.store.list_models(session_id, limit=params.limit, offset=params.offset)
    page_headers(ctx.store.count_models(session_id), params, request, response)
    active = active_version(ctx, sess.project)
    return [summary(m, active) for m in listed]


@router.get("/{version}", response_model=ModelSummary)
def get_model(
    session_id: str, version: str, ctx: ApiContext = Ctx, who: Principal = as_viewer
) -> ModelSummary:
    """One model version's record; 404 unless the session produced it."""
    model = _model(ctx, session_id, version, who)
    return summary(model, active_version(ctx, ctx.session(session_id, who).project))


@router.get("/{version}/lineage", response_model=Lineage)
def lineage(
    session_id: str, version: str, ctx: ApiContext = Ctx, who: Principal = as_viewer
) -> Lineage:
    """The version, then its parent, and so on back to the initial model.

    ``complete`` is False when a parent's record is missing (or the records loop), so a
    client can tell a full history from a broken one.
    """
    model = _model(ctx, session_id, version, who)
    active = active_version(ctx, ctx.session(session_id, who).project)
    chain = [summary(model, active)]
    seen = {model.version}
    complete = True
    while model.parent is not None:
        parent = ctx.store.get_model(model.parent)
        if parent is None or parent.version in seen or len(chain) >= MAX_LINEAGE:
            log.warning("lineage of %s breaks at %s", version, model.parent)
            complete = False
            break
        chain.append(summary(parent, active))
        seen.add(parent.version)
        model = parent
    return Lineage(version=version, chain=chain, complete=complete)


@router.get(
    "/{version}/download",
    response_class=Response,
    responses={200: {"content": {"application/cbor": {}}, "description": "the model blob"}},
)
def download(
    session_id: str, version: str, ctx: ApiContext = Ctx, who: Principal = as_viewer
) -> Response:
    """The model blob (CBOR tensor set, docs/storage.md), checked against its digest."""
    model = _model(ctx, session_id, version, who)
    if ctx.blobs is None:
        raise ApiError(
            404,
            "this API server has no model blob store: start it with --models DIR, the "
            "controller's model folder (e.g. edgefl-state/models)",
        )
    try:
        data = ctx.blobs.get(version)
    except (KeyError, ValueError):
        raise ApiError(404, f"the blob of {version!r} is not in this server's blob store") from None
    digest = hashlib.sha256(data).digest()
    if digest.hex() != model.digest:  # never hand out bytes the record does not vouch for
        log.error("model blob %s does not match its recorded digest", version)
        raise ApiError(500, f"the stored blob of {version!r} does not match its digest")
    return Response(
        data,
        media_type="application/cbor",
        headers={
            "Content-Disposition": f'attachment; filename="{version}.cbor"',
            "ETag": f'"{model.digest}"',
            "Repr-Digest": f"sha-256=:{base64.b64encode(digest).decode()}:",
        },
    )
