"""What every route module shares: the app's context, role checks, session lookup, pagination.

Route modules define module-level ``APIRouter``s and reach the store through the request's
app (``ApiContext`` on ``app.state.edgefl``), so ``create_app`` mounts each with one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import Depends, Query, Request, Response

from edgefl.api.auth import ApiAuth, ApiError, Principal, forbidden
from edgefl.auth.tokens import AuthConfig, Role
from edgefl.store.base import BlobStore, SessionRecord, Store

T = TypeVar("T")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True)
class ApiContext:
    """What the routes read and write: the stores, the token checks, the project bound to."""

    store: Store
    guard: ApiAuth
    auth: AuthConfig | None
    project: str | None  # None: any project
    blobs: BlobStore | None  # the controller's model folder: downloads and packages
    max_package_bytes: int
    logs: Path | None = None  # the controller's session log folder (SessionLogWriter)

    def session(self, session_id: str, who: Principal, least: Role = Role.viewer) -> SessionRecord:
        """The session, or 404: another project's session is as unknown as a missing one
        (its existence must not leak). 403 when it is the caller's but needs more than
        their role there."""
        sess = self.store.get_session(session_id)
        if sess is None or not self.visible(sess.project, who):
            raise ApiError(404, f"no session {session_id!r}")
        self.require(sess.project, who, least)
        return sess

    def visible(self, project: str, who: Principal) -> bool:
        """Whether this API serves ``project`` (all of them when bound to none) and the
        caller belongs to it."""
        return (self.project is None or project == self.project) and (
            who.role_in(project) is not None
        )

    def require(self, project: str, who: Principal, least: Role) -> None:
        """404 unless the caller sees ``project``, 403 unless they hold ``least`` there."""
        if not self.visible(project, who):
            raise ApiError(404, f"no project {project!r}")
        if not who.can(project, least):
            role = who.role_in(project)
            raise forbidden(
                f"{who.name} is {role.value if role else 'no member'} in project {project!r}: "
                f"this needs {least.value}"
            )

    def scope(self, who: Principal) -> str | list[str] | None:
        """The store filter for the caller's data (``scope_of``)."""
        return scope_of(self.project, who)

    def require_somewhere(self, who: Principal, least: Role) -> None:
        """403 unless the caller holds ``least`` in one of their projects (for what is not
        any one project's: package uploads, the key ids)."""
        mine = who.projects
        if mine is not None and not any(who.can(p, least) for p in self._served(mine)):
            raise forbidden(f"{who.name} is not {least.value} of any project here")

    def _served(self, projects: list[str]) -> list[str]:
        return [p for p in projects if self.project is None or p == self.project]

    def sessions(self, who: Principal) -> list[SessionRecord]:
        """The caller's sessions that this API serves, oldest first."""
        return self.store.list_sessions(self.scope(who))


def scope_of(bound: str | None, who: Principal) -> str | list[str] | None:
    """The store filter for the caller's data on an API bound to ``bound``: the caller's
    projects (a list, maybe empty), or that project or None (every one) in insecure mode."""
    mine = who.projects
    if mine is None:
        return bound
    return [p for p in mine if bound is None or p == bound]


def context(request: Request) -> ApiContext:
    """The app's ``ApiContext`` (set by ``create_app``)."""
    ctx: ApiContext = request.app.state.edgefl
    return ctx


def _role(least: Role) -> Callable[[Request], Principal]:
    def dependency(request: Request) -> Principal:
        return context(request).guard.require(least)(request)

    return dependency


# FastAPI dependencies: a route takes ``who: Principal = as_operator`` to need that role
as_viewer: Principal = Depends(_role(Role.viewer))
as_operator: Principal = Depends(_role(Role.operator))
as_admin: Principal = Depends(_role(Role.admin))
Ctx: ApiContext = Depends(context)


@dataclass(frozen=True)
class PageParams:
    """``?limit=&offset=`` of a list request."""

    limit: int
    offset: int


def _paging_dependency(default: int) -> Callable[..., PageParams]:
    """The ``limit``/``offset`` query parameters of a list, ``default`` items per page."""

    def dependency(
        limit: int = Query(default, ge=1, le=MAX_LIMIT, description="items per page"),
        offset: int = Query(0, ge=0, description="items to skip"),
    ) -> PageParams:
        return PageParams(limit, offset)

    return dependency


page: PageParams = Depends(_paging_dependency(DEFAULT_LIMIT))
# a session's rounds: one page holds a whole session's rounds (what the dashboard charts)
long_page: PageParams = Depends(_paging_dependency(MAX_LIMIT))


def paginate(
    items: Sequence[T], params: PageParams, request: Request, response: Response
) -> list[T]:
    """The page of ``items`` that ``params`` asks for; the total goes into ``X-Total-Count``
    and the neighbours into an RFC 8288 ``Link`` header (first, prev, next), so every list
    keeps a plain JSON array as its body."""
    page_headers(len(items), params, request, response)
    return list(items[params.offset : params.offset + params.limit])


def page_headers(total: int, params: PageParams, request: Request, response: Response) -> None:
    """``X-Total-Count`` and ``Link`` for a page the store cut itself (``limit``/``offset``
    in SQL, with a count query), so a long list is never loaded whole."""
    limit, offset = params.limit, params.offset
    response.headers["X-Total-Count"] = str(total)

    def ref(at: int) -> str:
        url = request.url.include_query_params(limit=limit, offset=at)
        return f"<{url.path}?{url.query}>"

    links = [f'{ref(0)}; rel="first"']
    if offset > 0:
        links.append(f'{ref(max(0, offset - limit))}; rel="prev"')
    if offset + limit < total:
        links.append(f'{ref(offset + limit)}; rel="next"')
    response.headers["Link"] = ", ".join(links)
