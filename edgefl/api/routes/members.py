"""A project's team: who belongs to it with which role, and its admins' changes to that.

An admin of a project invites people (``POST``), changes their role (``PUT``) and removes them
(``DELETE``); the change counts from the caller's next request, since every request resolves
roles from the store (``edgefl.api.auth``). A project never loses its last admin (409): an
emptied team would fall back to the tokens' own claims. Inviting the first member into a
project that has none makes the inviting admin (whoever holds an admin token for it) its
first admin in the same transaction. Another project's team is a 404, like its sessions.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import ApiContext, Ctx, as_admin, as_viewer
from edgefl.api.schemas import Member, MemberInvite, MemberRoleSet
from edgefl.auth.tokens import Role
from edgefl.store.base import LastAdminError, MembershipRecord

security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api/projects/{project}/members", tags=["members"])


def member(m: MembershipRecord) -> Member:
    """The API's view of a membership row."""
    return Member(
        project=m.project,
        user=m.user,
        role=m.role,  # the store only holds MEMBER_ROLES
        invited_by=m.invited_by,
        created=m.created,
        updated=m.updated,
    )


def _last_admin(exc: LastAdminError) -> ApiError:
    return ApiError(409, str(exc), type_="urn:edgefl:problem:last-admin")


@router.get("", response_model=list[Member])
def list_members(project: str, ctx: ApiContext = Ctx, who: Principal = as_viewer) -> list[Member]:
    """The team by user: all of it for the project's admins, only their own membership for
    everyone else (a viewer need not learn who else is in it). Empty while the project has
    no members (its tokens' claims decide)."""
    ctx.require(project, who, Role.viewer)
    team = ctx.store.list_members(project)
    if not who.can(project, Role.admin):
        me = who.claims.subject if who.claims is not None else None
        team = [m for m in team if m.user == me]
    return [member(m) for m in team]


@router.post("", status_code=201, response_model=Member)
def invite(
    project: str,
    body: MemberInvite,
    response: Response,
    ctx: ApiContext = Ctx,
    who: Principal = as_admin,
) -> Member:
    """Invite a person (their tokens' ``sub``) with a role (admin). 409 if already a member:
    ``PUT`` changes a role."""
    ctx.require(project, who, Role.admin)
    me = who.claims.subject if who.claims is not None else ""
    try:
        added = ctx.store.add_member(project, body.user, body.role, who.name, bootstrap=me)
    except ValueError as exc:
        raise ApiError(409, str(exc)) from None
    security_log.warning(
        "project %s: %s invited as %s by %s", project, body.user, body.role, who.name
    )
    response.headers["Location"] = f"/api/projects/{project}/members/{body.user}"
    return member(added)


@router.put("/{user}", response_model=Member)
def set_role(
    project: str, user: str, body: MemberRoleSet, ctx: ApiContext = Ctx, who: Principal = as_admin
) -> Member:
    """Change a member's role (admin); 404 if not a member, 409 for the last admin."""
    ctx.require(project, who, Role.admin)
    try:
        changed = ctx.store.set_member_role(project, user, body.role)
    except KeyError:
        raise ApiError(404, f"{user!r} is not a member of project {project!r}") from None
    except LastAdminError as exc:
        raise _last_admin(exc) from None
    security_log.warning("project %s: %s made %s by %s", project, user, body.role, who.name)
    return member(changed)


@router.delete("/{user}", status_code=204, response_class=Response)
def remove(project: str, user: str, ctx: ApiContext = Ctx, who: Principal = as_admin) -> Response:
    """Remove a member (admin); 404 if not one, 409 for the last admin (themselves too)."""
    ctx.require(project, who, Role.admin)
    try:
        ctx.store.remove_member(project, user)
    except KeyError:
        raise ApiError(404, f"{user!r} is not a member of project {project!r}") from None
    except LastAdminError as exc:
        raise _last_admin(exc) from None
    security_log.warning("project %s: %s removed by %s", project, user, who.name)
    return Response(status_code=204)
