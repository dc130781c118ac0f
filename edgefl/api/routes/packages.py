"""Model packages: list what the controller can hand to devices, and upload new ones.

An upload is checked by the same reader as ``edgefl package inspect`` and the controller's
``add_package`` (``ModelPackage.loads``: format, manifest, every file's digest, weights)
and stored content-addressed under ``pkg-<sha256>`` in the controller's model folder, where
``Controller.load_package`` finds it when a session names that digest.

Packages are scoped to projects (docs/security.md 4a): a caller sees a package when one of
their projects that this API serves owns it (uploaded or added it: ``packages.owners``) or
has a session training it. Any other package answers 404, exactly like a missing one.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from edgefl.api.auth import ApiError, Principal, forbidden
from edgefl.api.routes.deps import (
    ApiContext,
    Ctx,
    PageParams,
    as_operator,
    as_viewer,
    page,
    paginate,
)
from edgefl.api.schemas import PackageSummary
from edgefl.auth.tokens import Role
from edgefl.controller.controller import package_blob_key
from edgefl.packages.format import ModelPackage, PackageError
from edgefl.packages.owners import OwnersError, PackageOwners
from edgefl.protocol.messages import package_ref
from edgefl.store.base import BlobStore

log = logging.getLogger("edgefl.api")
security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api/packages", tags=["packages"])

PREFIX = "pkg-"
BINARY = {"type": "string", "format": "binary"}
PACKAGE_TYPES = ("application/octet-stream", "application/cbor", "application/vnd.edgefl.package")

# packages are content-addressed, so a summary never goes stale: parse each one once
_summaries: dict[str, PackageSummary] = {}
_summaries_lock = threading.Lock()


def _blobs(ctx: ApiContext) -> BlobStore:
    if ctx.blobs is None:
        raise ApiError(
            409,
            "this API server has no model folder, where packages live: start it with "
            "--models DIR (the controller's model folder, e.g. edgefl-state/models)",
        )
    return ctx.blobs


def _stored_digests(blobs: BlobStore) -> list[str]:
    """Digests of the packages in the blob store: a filesystem store's ``pkg-*`` files, or
    any store with ``keys()``. The ``BlobStore`` protocol itself cannot list."""
    root = getattr(blobs, "root", None)
    lister = getattr(blobs, "keys", None)
    if isinstance(root, Path):
        keys = [p.name for p in root.glob(f"{PREFIX}*") if p.is_file()]
    elif callable(lister):
        keys = [str(k) for k in lister()]
    else:
        raise ApiError(501, f"the blob store {type(blobs).__name__} cannot list its packages")
    digests = [k[len(PREFIX) :] for k in keys if k.startswith(PREFIX)]
    return sorted(d for d in digests if len(d) == 64 and all(c in "0123456789abcdef" for c in d))


def _summary(pkg: ModelPackage, digest: str, size: int, sessions: list[str]) -> PackageSummary:
    m = pkg.manifest
    return PackageSummary(
        digest=digest,
        id=package_ref(digest, size)["id"],
        size=size,
        name=str(m.get("name", "")),
        framework=str(m.get("framework", "")),
        created=str(m.get("created", "")),
        parameters=len(m.get("parameters", [])),
        signed_by=pkg.signature["key_id"] if pkg.signature else None,
        sessions=sessions,
    )


def _users(ctx: ApiContext, who: Principal) -> dict[str, list[str]]:
    """Package digest -> the sessions (of the caller's projects) that train it."""
    out: dict[str, list[str]] = {}
    for s in ctx.sessions(who):
        digest = s.config.get("package")
        if isinstance(digest, str):
            out.setdefault(digest, []).append(s.session_id)
    return out


def _served(ctx: ApiContext, who: Principal) -> list[str] | None:
    """The caller's projects that this API serves; None: every one (insecure, unbound)."""
    scope = ctx.scope(who)
    return [scope] if isinstance(scope, str) else scope


def _visible(blobs: BlobStore, digest: str, projects: list[str] | None, used: bool) -> bool:
    """Whether a package is the business of ``projects``: one of them owns it, or (``used``)
    one of their sessions trains it, which also covers packages stored before owners."""
    if projects is None or used:
        return True
    return not PackageOwners(blobs).get(digest).isdisjoint(projects)


def visible_to_project(ctx: ApiContext, digest: str, project: str) -> bool:
    """Whether ``project`` may use the package (to create a session with it): it owns the
    package or one of its sessions already trains it."""
    if ctx.blobs is None:
        return False
    used = any(s.config.get("package") == digest for s in ctx.store.list_sessions(project))
    return _visible(ctx.blobs, digest, [project], used)


def _describe(blobs: BlobStore, digest: str, sessions: list[str]) -> PackageSummary | None:
    with _summaries_lock:
        known = _summaries.get(digest)
    if known is None:
        try:
            data = blobs.get(package_blob_key(digest))
            known = _summary(ModelPackage.loads(data), digest, len(data), [])
        except (KeyError, PackageError) as exc:  # gone, or damaged on disk: not offered
            log.error("package %s in the blob store is unreadable: %s", digest[:16], exc)
            return None
        with _summaries_lock:
            _summaries[digest] = known
    return known.model_copy(update={"sessions": sessions})


@router.get("", response_model=list[PackageSummary])
def list_packages(
    request: Request,
    response: Response,
    params: PageParams = page,
    ctx: ApiContext = Ctx,
    who: Principal = as_viewer,
) -> list[PackageSummary]:
    """The packages of the caller's projects, by digest, with the sessions using them."""
    blobs = _blobs(ctx)
    users = _users(ctx, who)
    projects = _served(ctx, who)
    digests = [d for d in _stored_digests(blobs) if _visible(blobs, d, projects, d in users)]
    chosen = paginate(digests, params, request, response)
    described = [_describe(blobs, d, users.get(d, [])) for d in chosen]
    return [d for d in described if d is not None]


@router.get("/{digest}", response_model=PackageSummary)
def get_package(digest: str, ctx: ApiContext = Ctx, who: Principal = as_viewer) -> PackageSummary:
    """One package by its SHA-256 (hex); 404 if it is missing or not the caller's projects'."""
    blobs = _blobs(ctx)
    users = _users(ctx, who).get(digest, [])
    # another project's package is as unknown as a missing one: its existence must not leak
    if digest not in _stored_digests(blobs) or not _visible(
        blobs, digest, _served(ctx, who), bool(users)
    ):
        raise ApiError(404, f"no model package {digest!r} in this server's model folder")
    found = _describe(blobs, digest, users)
    if found is None:
        raise ApiError(500, f"the stored package {digest[:16]}... is unreadable; its log says why")
    return found


def _upload_project(ctx: ApiContext, who: Principal, asked: str | None) -> str:
    """The project an upload is for: ``?project=``, else the API's bound project, else the
    caller's only project where they are operator or more (422 naming them when there are
    several); 404/403 as for any project (``ApiContext.require``)."""
    project = asked or ctx.project
    if project is None:
        mine = who.projects
        if mine is None:  # insecure mode on an unbound API: as a session is created
            project = "default"
        else:
            ops = [p for p in mine if who.can(p, Role.operator)]
            if not ops:
                raise forbidden(f"{who.name} is not {Role.operator.value} of any project here")
            if len(ops) > 1:
                raise ApiError(
                    422,
                    f"which project is this package for? {who.name} is operator or more in "
                    f"{', '.join(ops)}: name one with ?project=",
                )
            project = ops[0]
    ctx.require(project, who, Role.operator)
    return project


async def _read_capped(request: Request, cap: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``cap`` bytes (whatever
    Content-Length claims), so an upload can never fill the server's memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"the package is {declared} bytes, over this server's {cap}-byte cap")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, f"the package is over this server's {cap}-byte cap")
    return bytes(body)


@router.post(
    "",
    status_code=201,
    response_model=PackageSummary,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the package file as built by `edgefl package build`",
            "content": {t: {"schema": BINARY} for t in PACKAGE_TYPES},
        }
    },
    responses={200: {"model": PackageSummary, "description": "already stored (same digest)"}},
)
async def upload_package(
    request: Request,
    response: Response,
    project: str | None = Query(
        None,
        description="the project the package is for (default: the API's project, or the "
        "caller's only project where they are operator or more)",
    ),
    ctx: ApiContext = Ctx,
    who: Principal = as_operator,
) -> PackageSummary:
    """Validate a package as the controller does and store it for a project's sessions.

    The body is the package file itself. 201 with ``Location`` when stored, 200 when the same
    bytes were there already (the project is then added as one of its owners), 422 naming the
    problem when the reader refuses it or the project is ambiguous, 413 past the size cap.
    Operators and admins of the project may upload.
    """
    owner = _upload_project(ctx, who, project)
    blobs = _blobs(ctx)
    kind = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if kind not in PACKAGE_TYPES:
        raise ApiError(
            415, f"send the package file as the body with Content-Type {PACKAGE_TYPES[0]}"
        )
    data = await _read_capped(request, ctx.max_package_bytes)
    try:
        # decoding and hashing a large package is CPU work: off the event loop
        pkg = await run_in_threadpool(ModelPackage.loads, data, max_size=ctx.max_package_bytes)
    except PackageError as exc:
        raise ApiError(
            422, f"not a valid model package: {exc}", type_="urn:edgefl:problem:invalid-package"
        ) from None
    digest = pkg.digest
    key = package_blob_key(digest)
    existed = blobs.exists(key)
    if not existed:
        try:
            await run_in_threadpool(blobs.put, key, data)
        except OSError as exc:
            raise ApiError(507, f"cannot store the package: {exc.strerror or exc}") from None
        security_log.warning(
            "package %s (%s, %d bytes) uploaded by %s",
            digest[:16],
            pkg.manifest.get("name"),
            len(data),
            who.name,
        )
    try:
        added = await run_in_threadpool(PackageOwners(blobs).add, digest, owner)
    except OSError as exc:
        raise ApiError(507, f"cannot record the package's project: {exc}") from None
    except OwnersError as exc:  # never overwritten: the other owners would be lost
        raise ApiError(500, f"cannot record the package's project: {exc}") from None
    if added:
        security_log.warning("package %s added to project %s by %s", digest[:16], owner, who.name)
    response.status_code = 200 if existed else 201
    response.headers["Location"] = f"/api/packages/{digest}"
    summary = _summary(pkg, digest, len(data), _users(ctx, who).get(digest, []))
    with _summaries_lock:
        _summaries[digest] = summary.model_copy(update={"sessions": []})
    return summary
