"""Sessions made and started through the API: create, start, resume (operators).

The API never talks to a controller: it writes the store, and a serving controller
(``edgefl controller --serve``) picks up what is ``queued``. A session is ``created`` with
its initial model stored exactly as a controller stores it (``new_session``), ``start``
queues it, and ``resume`` queues a failed or stopped one again with a fresh attempt budget
(what ``edgefl controller --resume ID --retry`` does).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from pydantic import ValidationError

from edgefl.api.auth import ApiError, Principal
from edgefl.api.routes.deps import ApiContext, Ctx, as_operator
from edgefl.api.routes.sessions import summary
from edgefl.api.schemas import BUILTIN_MODELS, SessionCreate, SessionDetail, SessionSummary
from edgefl.controller.config import SessionConfig
from edgefl.controller.session_setup import new_session
from edgefl.packages.format import PackageError
from edgefl.protocol.types import Weights
from edgefl.store.base import StorageError

security_log = logging.getLogger("edgefl.security")

router = APIRouter(prefix="/api/sessions", tags=["sessions"])

DIGEST = frozenset("0123456789abcdef")


def _config(body: SessionCreate) -> tuple[SessionConfig, Weights | None]:
    """The controller's session config for a request, and the initial weights of a built-in
    model (None for a package, which carries its own)."""
    train = body.train.model_dump()
    package: str | None = None
    weights: Weights | None = None
    if body.model in BUILTIN_MODELS:
        from edgefl.tasks import digits

        train["model"] = body.model
        weights = digits.initial_weights(body.model)
    elif len(body.model) == 64 and set(body.model) <= DIGEST:
        package = body.model
    else:
        raise ApiError(
            422,
            f"model {body.model[:80]!r} is neither a built-in model "
            f"({', '.join(BUILTIN_MODELS)}) nor a package digest (64 hex digits)",
        )
    fields = body.model_dump(exclude={"session_id", "project", "model", "train"})
    if body.session_id is not None:
        fields["session_id"] = body.session_id
    try:
        return SessionConfig(**fields, train=train, package=package), weights
    except ValidationError as exc:
        why = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(422, f"invalid session: {why}") from None


@router.post("", status_code=201, response_model=SessionDetail)
def create_session(
    body: SessionCreate, response: Response, ctx: ApiContext = Ctx, who: Principal = as_operator
) -> SessionDetail:
    """Create a session (``created``): its initial model is stored now, and it runs once
    started. 409 if the id is taken, 422 for an unknown model, package or aggregator."""
    project = ctx.project or body.project or "default"
    if ctx.project is not None and body.project not in (None, ctx.project):
        raise ApiError(403, f"this API serves project {ctx.project!r}, not {body.project!r}")
    if ctx.blobs is None:
        raise ApiError(
            409,
            "this API server has no model folder, where a session's initial model is stored: "
            "start it with --models DIR (the controller's model folder)",
        )
    config, weights = _config(body)
    try:
        sess = new_session(ctx.store, ctx.blobs, project, config, weights, status="created")
    except KeyError:
        raise ApiError(
            422,
            f"no package {config.package} in this server's model folder: upload it first "
            "(POST /api/packages)",
        ) from None
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
    ctx.session(session_id)
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
