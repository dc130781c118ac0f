"""Projects: the ones with sessions in the store, how their sessions stand, and each one's
active model.

A project is the namespace of topics and tokens; its only record of its own is its settings
(the ``projects`` table, schema v6): the active model version, which operators promote after a
good session and which new sessions can start from (``initial_model: "active"``). An API
bound to one project shows and changes only that one.
"""

from __future__ import annotations

import logging
from collections import Counter

from fastapi import APIRouter, Request, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import (
    ApiContext,
    Ctx,
    PageParams,
    as_operator,
    as_viewer,
    page,
    paginate,
)
from edgefl.api.schemas import ActiveModelSet, ProjectSummary
from edgefl.store.base import SessionRecord

security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api/projects", tags=["projects"])


def _summaries(ctx: ApiContext, sessions: list[SessionRecord]) -> list[ProjectSummary]:
    by_project: dict[str, list[SessionRecord]] = {}
    for s in sessions:
        by_project.setdefault(s.project, []).append(s)
    out = []
    for name in sorted(by_project):
        group = by_project[name]
        latest = max(group, key=lambda s: s.created)
        settings = ctx.store.get_project(name)
        out.append(
            ProjectSummary(
                project=name,
                sessions=len(group),
                by_status=dict(Counter(s.status for s in group)),
                latest_session=latest.session_id,
                updated=max(s.updated for s in group),
                active_model=settings.active_model if settings else None,
                active_model_set_by=(settings.active_set_by or None) if settings else None,
                active_model_set_at=settings.active_set_at if settings else None,
            )
        )
    return out


def _project(ctx: ApiContext, project: str) -> ProjectSummary:
    if not ctx.visible(project):
        raise ApiError(404, f"no project {project!r} with sessions in this store")
    found = _summaries(ctx, ctx.store.list_sessions(project))
    if not found:
        raise ApiError(404, f"no project {project!r} with sessions in this store")
    return found[0]


@router.get("", response_model=list[ProjectSummary])
def list_projects(
    request: Request,
    response: Response,
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    _: Principal = as_viewer,
) -> list[ProjectSummary]:
    """Projects by name, each with its session count by status and its active model."""
    return paginate(_summaries(ctx, ctx.sessions()), params, request, response)


@router.get("/{project}", response_model=ProjectSummary)
def get_project(project: str, ctx: ApiContext = Ctx, _: Principal = as_viewer) -> ProjectSummary:
    """One project's counts and active model; 404 if it has no sessions here (or is not this
    API's)."""
    return _project(ctx, project)


@router.put("/{project}/active-model", response_model=ProjectSummary)
def set_active_model(
    project: str, body: ActiveModelSet, ctx: ApiContext = Ctx, who: Principal = as_operator
) -> ProjectSummary:
    """Promote a model version as the project's active model (operator); ``null`` clears it.

    New sessions created with ``initial_model: "active"`` start from its exact weights. 404
    for an unknown version (or project), 409 for a version of another project's session.
    """
    _project(ctx, project)
    try:
        ctx.store.set_active_model(project, body.version, who.name)
    except KeyError:
        raise ApiError(404, f"no model version {body.version!r}") from None
    except ValueError:  # not named: a bound API never tells of other projects
        raise ApiError(
            409,
            f"model version {body.version!r} was not produced by a session of project {project!r}",
            type_="urn:edgefl:problem:wrong-project",
        ) from None
    security_log.warning(
        "project %s: active model %s set by %s", project, body.version or "(cleared)", who.name
    )
    return _project(ctx, project)
