"""Projects: the ones with sessions in the store, how their sessions stand, and each one's
active model.

A project is the namespace of topics and tokens; its only record of its own is its settings
(the ``projects`` table, schema v6): the active model version, which operators promote after a
good session and which new sessions can start from (``initial_model: "active"``). An API
bound to one project shows and changes only that one, and a caller sees only the projects
they belong to (docs/security.md, "Teams and project scoping"): another project is a 404.
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
from edgefl.auth.tokens import Role
from edgefl.store.base import SessionRecord

security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api/projects", tags=["projects"])


def _summaries(
    ctx: ApiContext, sessions: list[SessionRecord], who: Principal, also: list[str] | None = None
) -> list[ProjectSummary]:
    """One summary per project with sessions, and per project of ``also`` (the caller's,
    which may have none yet)."""
    by_project: dict[str, list[SessionRecord]] = {name: [] for name in also or ()}
    for s in sessions:
        by_project.setdefault(s.project, []).append(s)
    out = []
    for name in sorted(by_project):
        group = by_project[name]
        latest = max(group, key=lambda s: s.created) if group else None
        settings = ctx.store.get_project(name)
        role = who.role_in(name) if who.claims is not None else None
        out.append(
            ProjectSummary(
                project=name,
                sessions=len(group),
                by_status=dict(Counter(s.status for s in group)),
                latest_session=latest.session_id if latest else None,
                updated=max(s.updated for s in group) if group else None,
                role=role.value if role else None,
                active_model=settings.active_model if settings else None,
                active_model_set_by=(settings.active_set_by or None) if settings else None,
                active_model_set_at=settings.active_set_at if settings else None,
            )
        )
    return out


def _project(ctx: ApiContext, project: str, who: Principal) -> ProjectSummary:
    if not ctx.visible(project, who):
        raise ApiError(404, f"no project {project!r} with sessions in this store")
    members = [project] if who.projects is not None else None
    found = _summaries(ctx, ctx.store.list_sessions(project), who, members)
    if not found:
        raise ApiError(404, f"no project {project!r} with sessions in this store")
    return found[0]


@router.get("", response_model=list[ProjectSummary])
def list_projects(
    request: Request,
    response: Response,
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[ProjectSummary]:
    """The caller's projects by name, each with its session count by status, its active
    model and the caller's role there (a project of theirs without sessions too)."""
    scope = ctx.scope(who)
    mine = scope if isinstance(scope, list) else None  # insecure: projects with sessions
    return paginate(_summaries(ctx, ctx.sessions(who), who, mine), params, request, response)


@router.get("/{project}", response_model=ProjectSummary)
def get_project(project: str, ctx: ApiContext = Ctx, who: Principal = as_viewer) -> ProjectSummary:
    """One project's counts and active model; 404 if it is not the caller's (or, in insecure
    mode, has no sessions here)."""
    return _project(ctx, project, who)


@router.put("/{project}/active-model", response_model=ProjectSummary)
def set_active_model(
    project: str, body: ActiveModelSet, ctx: ApiContext = Ctx, who: Principal = as_operator
) -> ProjectSummary:
    """Promote a model version as the project's active model (operator); ``null`` clears it.

    New sessions created with ``initial_model: "active"`` start from its exact weights. 404
    for an unknown version (or project), 409 for a version of another project's session.
    """
    ctx.require(project, who, Role.operator)
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
    return _project(ctx, project, who)
