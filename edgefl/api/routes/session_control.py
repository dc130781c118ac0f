"""Sessions made and started through the API: create, start, resume (operators).

The API never talks to a controller: it writes the store, and a serving controller
(``edgefl controller --serve``) picks up what is ``queued``. A session is ``created`` with
its initial model stored exactly as a controller stores it (``new_session``): the model's
initial weights, or with ``initial_model`` ("active", or a version of the project) that
version's exact bytes, recorded as the new round 0's parent. ``start``
queues it, and ``resume`` queues a failed or stopped one again with a fresh attempt budget
(what ``edgefl controller --resume ID --retry`` does).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from pydantic import ValidationError

from edgefl.api.auth import ApiError, Principal, forbidden
from edgefl.api.routes.deps import ApiContext, Ctx, as_operator
from edgefl.api.routes.packages import visible_to_project
from edgefl.api.routes.sessions import summary
from edgefl.api.schemas import BUILTIN_MODELS, SessionCreate, SessionDetail, SessionSummary
from edgefl.auth.tokens import Role
from edgefl.controller.config import SessionConfig
from edgefl.controller.session_setup import new_session
from edgefl.packages.format import PackageError
from edgefl.protocol.types import Weights
from edgefl.store.base import ModelRecord, StorageError

security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api/sessions", tags=["sessions"])

DIGEST = frozenset("0123456789abcdef")


def _start_from(ctx: ApiContext, project: str, wanted: str | None) -> ModelRecord | None:
    """The model version a new session starts from: the project's active one for "active",
    a named version of the project, or None. 409 when there is no active model or the
    version is another project's, 422 when no such version is stored."""
    if wanted is None:
        return None
    if wanted == "active":
        settings = ctx.store.get_project(project)
        if settings is None or settings.active_model is None:
            raise ApiError(
                409,
                f"project {project!r} has no active model: promote one first "
                f"(PUT /api/projects/{project}/active-model)",
            )
        wanted = settings.active_model
    model = ctx.store.get_model(wanted)
    if model is None:
        raise ApiError(422, f"initial_model: no model version {wanted!r}")
    owner = ctx.store.get_session(model.session_id) if model.session_id else None
    if owner is None or owner.project != project:
        raise ApiError(
            409,
            f"initial_model: version {wanted!r} was not produced by a session of project "
            f"{project!r}",
            type_="urn:edgefl:problem:wrong-project",
        )
    return model


def _model_of(ctx: ApiContext, start: ModelRecord | None) -> str:
    """The model a request trains when it names none: its starting version's (that
    session's built-in model or package), else the default built-in model."""
    owner = ctx.store.get_session(start.session_id) if start and start.session_id else None
    if owner is not None:
        config = owner.config
        if config.get("package"):
            return str(config["package"])
        model = (config.get("train") or {}).get("model")
        if model in BUILTIN_MODELS:
            return str(model)
    return BUILTIN_MODELS[0]


def _config(body: SessionCreate, model: str) -> tuple[SessionConfig, Weights | None]:
    """The controller's session config for a request, and the initial weights of a built-in
    model (None for a package, which carries its own)."""
    train = body.train.model_dump()
    package: str | None = None
    weights: Weights | None = None
    if model in BUILTIN_MODELS:
        from edgefl.tasks import digits

        train["model"] = model
        weights = digits.initial_weights(model)
    elif len(model) == 64 and set(model) <= DIGEST:
        package = model
    else:
        raise ApiError(
            422,
            f"model {model[:80]!r} is neither a built-in model "
            f"({', '.join(BUILTIN_MODELS)}) nor a package digest (64 hex digits)",
        )
    fields = body.model_dump(exclude={"session_id", "project", "model", "initial_model", "train"})
    if body.session_id is not None:
        fields["session_id"] = body.session_id
    try:
        return SessionConfig(**fields, train=train, package=package), weights
    except ValidationError as exc:
        why = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(422, f"invalid session: {why}") from None


def _no_package(digest: str | None) -> ApiError:
    return ApiError(
        422,
        f"no package {digest} in this server's model folder: upload it first (POST /api/packages)",
    )


def _sees_package(ctx: ApiContext, who: Principal, project: str, digest: str) -> bool:
    """Whether the session's project may train the package (``visible_to_project``); an
    insecure API serving every project checks nothing, as before packages had owners."""
    if who.projects is None and ctx.project is None:
        return True
    return visible_to_project(ctx, digest, project)


@router.post("", status_code=201, response_model=SessionDetail)
def create_session(
    body: SessionCreate, response: Response, ctx: ApiContext = Ctx, who: Principal = as_operator
) -> SessionDetail:
    """Create a session (``created``): its initial model is stored now, and it runs once
    started. 409 if the id is taken, 422 for an unknown model, package or aggregator.

    ``initial_model`` ("active" or a version id) starts it from a stored version of this
    project (409 if there is no active model or the version is another project's, 422 if it
    does not fit the model trained)."""
    home = who.claims.project if who.claims is not None else None
    project = ctx.project or body.project or home or "default"
    if ctx.project is not None and body.project not in (None, ctx.project):
        raise ApiError(403, f"this API serves project {ctx.project!r}, not {body.project!r}")
    if not who.can(project, Role.operator):  # 403 whether or not the project exists
        raise forbidden(f"{who.name} is not an operator of project {project!r}")
    if ctx.blobs is None:
        raise ApiError(
            409,
            "this API server has no model folder, where a session's initial model is stored: "
            "start it with --models DIR (the controller's model folder)",
        )
    start = _start_from(ctx, project, body.initial_model)
    config, weights = _config(body, body.model or _model_of(ctx, start))
    # another project's package is refused as a missing one is (its existence must not leak)
    if config.package is not None and not _sees_package(ctx, who, project, config.package):
        raise _no_package(config.package)
    try:
        sess = new_session(
            ctx.store,
            ctx.blobs,
            project,
            config,
            weights,
            status="created",
            start_from=start.version if start else None,
        )
    except KeyError:
        if config.package is None and start is not None:
            raise ApiError(
                409, f"the blob of {start.version!r} is not in this server's model folder"
            ) from None
        raise _no_package(config.package) from None
    except PackageError as exc:
        raise ApiError(422, f"the stored package is unusable: {exc}") from None
    except ValueError as exc:
        status = 409 if "exists" in str(exc) else 422
        raise ApiError(status, f"cannot create the session: {exc}") from None
    except StorageError as exc:
        raise ApiError(507, str(exc)) from None
    security_log.warning("session %s created by %s", sess.session_id, who.name)
    response.headers["Location"] = f"/api/sessions/{sess.session_id}"
    return SessionDetail(**summary(sess).model_dump(), config=sess.config)


def _queue(
    ctx: ApiContext, session_id: str, expected: tuple[str, ...], who: Principal, verb: str
) -> SessionSummary:
    ctx.session(session_id, who, Role.operator)
    try:
        sess = ctx.store.transition_session(session_id, expected, "queued")
    except KeyError:
        raise ApiError(404, f"no session {session_id!r}") from None
    except ValueError as exc:
        raise ApiError(409, f"cannot {verb}: {exc}") from None
    security_log.warning("session %s queued (%s) by %s", session_id, verb, who.name)
    return summary(sess)


@router.post("/{session_id}/start", status_code=202, response_model=SessionSummary)
def start_session(
    session_id: str, ctx: ApiContext = Ctx, who: Principal = as_operator
) -> SessionSummary:
    """Queue a created session (202): a serving controller runs it next. 409 otherwise."""
    return _queue(ctx, session_id, ("created",), who, "start")


@router.post("/{session_id}/resume", status_code=202, response_model=SessionSummary)
def resume_session(
    session_id: str, ctx: ApiContext = Ctx, who: Principal = as_operator
) -> SessionSummary:
    """Queue a failed or stopped session again (202), with a fresh attempt budget: it goes
    on from its last completed round. 409 for any other status."""
    return _queue(ctx, session_id, ("failed", "stopped"), who, "resume")
