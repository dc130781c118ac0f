"""Who is calling, and the admin's identity controls: device revocation and the key ids."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Query

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import ApiContext, Ctx, as_admin, as_viewer
from edgefl.api.schemas import KeyInfo, Keys, Revoked, WhoAmI
from edgefl.auth.keys import KeyDir, KeyDirError, load_jwks
from edgefl.auth.revocation import RevocationError, revoke_subject
from edgefl.auth.tokens import Role
from edgefl.protocol.topics import TopicError, check_segment

security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api", tags=["identity"])


@router.get("/whoami", response_model=WhoAmI)
def whoami(ctx: ApiContext = Ctx, who: Principal = as_viewer) -> WhoAmI:
    """Who the token names, so the page can show it and offer what the role allows.

    ``role`` is the caller's role in ``project``: this API's project, else the token's own
    when it is one of theirs, else their first project; ``projects`` lists every one.
    """
    c = who.claims
    mine = who.projects
    projects = {p: r.value for p in mine if (r := who.role_in(p))} if mine is not None else {}
    if c is None:
        project, role = ctx.project, "admin"
    else:
        project = ctx.project or (c.project if c.project in projects else None)
        project = project or (mine[0] if mine else c.project)
        role = projects.get(project, c.role.value if not projects else "viewer")
    return WhoAmI(
        subject=c.subject if c else None,
        role=role,
        project=project,
        projects=projects,
        expires=c.expires if c else None,
        insecure=c is None,
    )


@router.post("/devices/{device}/revoke", response_model=Revoked)
def revoke(
    device: str,
    project: str | None = Query(None, description="the device's project (an API serving many)"),
    ctx: ApiContext = Ctx,
    who: Principal = as_admin,
) -> Revoked:
    """Refuse every token of ``device`` issued until now, on every verifier that reads the
    revocation list (the broker cuts live connections on its next sweep). The caller must be
    an admin of the device's project: this API's, ``?project=``, or their token's."""
    try:
        check_segment("device id", device)
    except TopicError as exc:
        raise ApiError(422, str(exc)) from None
    home = who.claims.project if who.claims is not None else None
    where = ctx.project or project or home
    if where is not None:
        ctx.require(where, who, Role.admin)
    path = ctx.auth.revocations_path() if ctx.auth is not None else None
    if path is None:
        raise ApiError(
            409,
            "no revocation list is configured: set EDGEFL_REVOCATIONS (or use a key "
            "directory, whose revoked.json is the default)",
        )
    try:
        when = revoke_subject(path, device)
    except (OSError, RevocationError) as exc:
        raise ApiError(500, f"cannot update the revocation list: {exc}") from None
    security_log.warning("device %s revoked by %s", device, who.name)
    return Revoked(device=device, revoked_at=when, revoked_by=who.name)


@router.get("/keys", response_model=Keys, response_model_exclude_none=True)
def keys(ctx: ApiContext = Ctx, who: Principal = as_admin) -> Keys:
    """What the verifiers accept: the key ids of the JWK set, or HS256 for a secret (for
    an admin of any project: the key ids are the deployment's, and public)."""
    ctx.require_somewhere(who, Role.admin)
    auth = ctx.auth
    if auth is None:
        raise ApiError(409, "authentication is off (insecure mode): no keys are in use")
    if auth.secret is not None:
        return Keys(algorithm="HS256")
    source = Path(auth.keys or "")
    key_dir = KeyDir(source)
    try:
        jwks = load_jwks(source if source.is_file() else key_dir.jwks_path)
        active = key_dir.active_kid() if source.is_dir() and key_dir.exists() else None
    except KeyDirError as exc:
        raise ApiError(500, f"cannot read the public keys: {exc}") from None
    return Keys(keys=[KeyInfo(kid=k["kid"], alg=k["alg"]) for k in jwks["keys"]], active=active)
