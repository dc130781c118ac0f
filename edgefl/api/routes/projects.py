"""Projects: the ones with sessions in the store, and how their sessions stand.

A project has no record of its own yet (it is the namespace of topics and tokens), so this
lists the projects that sessions name; an API bound to one project shows only that one.
"""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import ApiContext, Ctx, PageParams, as_viewer, page, paginate
from edgefl.api.schemas import ProjectSummary
from edgefl.store.base import SessionRecord

router = APIRouter(prefix="/api/projects", tags=["projects"])


def _summaries(sessions: list[SessionRecord]) -> list[ProjectSummary]:
    by_project: dict[str, list[SessionRecord]] = {}
    for s in sessions:
        by_project.setdefault(s.project, []).append(s)
    out = []
    for name in sorted(by_project):
        group = by_project[name]
        latest = max(group, key=lambda s: s.created)
        out.append(
            ProjectSummary(
                project=name,
                sessions=len(group),
                by_status=dict(Counter(s.status for s in group)),
                latest_session=latest.session_id,
                updated=max(s.updated for s in group),
            )
        )
    return out


@router.get("", response_model=list[ProjectSummary])
def list_projects(
    request: Request,
    response: Response,
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    _: Principal = as_viewer,
) -> list[ProjectSummary]:
    """Projects by name, each with its session count by status."""
    return paginate(_summaries(ctx.sessions()), params, request, response)


@router.get("/{project}", response_model=ProjectSummary)
def get_project(project: str, ctx: ApiContext = Ctx, _: Principal = as_viewer) -> ProjectSummary:
    """One project's counts; 404 if it has no sessions here (or is not this API's)."""
    found = [p for p in _summaries(ctx.sessions()) if p.project == project]
    if not found:
        raise ApiError(404, f"no project {project!r} with sessions in this store")
    return found[0]
