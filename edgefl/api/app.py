"""The REST API and the dashboard page, over a state store (and optionally the blob store).

Every route but ``/`` (the page, which holds no data) and ``/api/health`` needs a bearer JWT
(``edgefl.api.auth``): viewers read sessions, rounds and models, operators stop sessions,
admins revoke devices and list keys. Errors are RFC 9457 problem documents. Without token
material the app refuses to build unless explicitly ``insecure``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import HTMLResponse, Response

from edgefl.api.auth import ApiAuth, ApiError, Principal, install_problem_handlers
from edgefl.auth.keys import KeyDir, KeyDirError, load_jwks
from edgefl.auth.revocation import RevocationError, revoke_subject
from edgefl.auth.tokens import AuthConfig, Role
from edgefl.protocol.topics import TopicError, check_segment
from edgefl.store.base import BlobStore, RoundRecord, SessionRecord, Store

log = logging.getLogger("edgefl.api")
security_log = logging.getLogger("edgefl.security")


def _session_summary(s: SessionRecord) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "project": s.project,
        "status": s.status,
        "current_round": s.current_round,
        "rounds": s.config.get("rounds"),
        "aggregator": s.config.get("aggregator"),
        "model_version": s.model_version,
        "reason": s.reason,
        "stop_requested_by": s.stop_requested_by,
        "created": s.created,
        "updated": s.updated,
    }


def _round_summary(r: RoundRecord) -> dict[str, Any]:
    return {
        "task_id": r.task_id,
        "round": r.round,
        "attempt": r.attempt,
        "status": r.status,
        "metrics": r.metrics,
        "participants": len(r.participants),
        "selected": len(r.devices),
        "started": r.started,
        "finished": r.finished,
        "duration_s": (r.finished - r.started) if r.finished is not None else None,
        "model_in": r.model_in,
        "model_out": r.model_out,
        "reason": r.reason,
    }


def create_app(
    store: Store,
    auth: AuthConfig | None = None,
    *,
    insecure: bool = False,
    project: str | None = None,
    blobs: BlobStore | None = None,
    title: str = "edgefl",
) -> FastAPI:
    """The dashboard page at ``/`` and the JSON API under ``/api``, reading ``store`` live.

    ``auth`` is the deployment's token material; ``auth=None`` raises ``ValueError`` unless
    ``insecure=True``, which serves everything to anyone and says so in the log. ``project``
    binds the API to one project: tokens of others are refused and its sessions are the only
    ones shown (None: any project). ``blobs`` is the model blob store, for downloads. The app
    neither caches nor closes ``store``, which must be safe to use from worker threads.
    """
    if auth is None and not insecure:
        raise ValueError(
            "the REST API needs token material (auth=AuthConfig(...), e.g. from "
            "EDGEFL_JWT_KEYS or EDGEFL_JWT_SECRET), or insecure=True for a development setup"
        )
    if auth is None:
        security_log.warning(
            "INSECURE: the REST API has no authentication; anyone who reaches its port can "
            "read every session, stop sessions and revoke devices"
        )
    guard = ApiAuth(auth, project)
    # /docs and /redoc load Swagger/ReDoc from a CDN, which offline sites cannot reach.
    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None)
    install_problem_handlers(app)
    page = resources.files("edgefl.api").joinpath("static/index.html").read_text("utf-8")

    @app.get("/api/health")
    def health() -> dict[str, str]:
        """Outside authentication on purpose: liveness probes carry no token."""
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        """The single-page dashboard: public, since it holds no data until a token is given."""
        return page

    viewer = APIRouter(prefix="/api")
    operator = APIRouter(prefix="/api")
    admin = APIRouter(prefix="/api")
    as_viewer = Depends(guard.require(Role.viewer))
    as_operator = Depends(guard.require(Role.operator))
    as_admin = Depends(guard.require(Role.admin))

    def _session(session_id: str) -> SessionRecord:
        sess = store.get_session(session_id)
        if sess is None or (project is not None and sess.project != project):
            raise ApiError(404, f"no session {session_id!r}")
        return sess

    # viewer: read ---------------------------------------------------------------------
    @viewer.get("/whoami")
    def whoami(who: Principal = as_viewer) -> dict[str, Any]:
        """Who the token names, so the page can show it and offer what the role allows."""
        c = who.claims
        return {
            "subject": c.subject if c else None,
            "role": c.role.value if c else "admin",
            "project": c.project if c else project,
            "expires": c.expires if c else None,
            "insecure": c is None,
        }

    @viewer.get("/sessions")
    def sessions(_: Principal = as_viewer) -> list[dict[str, Any]]:
        """Newest first, so the dashboard's default pick is simply the first one."""
        listed = [s for s in store.list_sessions() if project is None or s.project == project]
        return [_session_summary(s) for s in reversed(listed)]

    @viewer.get("/sessions/{session_id}")
    def session(session_id: str, _: Principal = as_viewer) -> dict[str, Any]:
        """One session's summary plus the config it was started with; 404 if unknown."""
        sess = _session(session_id)
        return {**_session_summary(sess), "config": sess.config}

    @viewer.get("/sessions/{session_id}/rounds")
    def rounds(session_id: str, _: Principal = as_viewer) -> list[dict[str, Any]]:
        """Every round attempt of a session, by (round, attempt); 404 if the session is unknown."""
        _session(session_id)
        return [_round_summary(r) for r in store.list_rounds(session_id)]

    @viewer.get("/sessions/{session_id}/models")
    def models(session_id: str, _: Principal = as_viewer) -> list[dict[str, Any]]:
        """The model versions a session produced, oldest first (metadata; blobs: download)."""
        _session(session_id)
        return [
            {
                "version": m.version,
                "parent": m.parent,
                "round": m.round,
                "digest": m.digest,
                "size": m.size,
                "created": m.created,
            }
            for m in store.list_models(session_id)
        ]

    @viewer.get("/sessions/{session_id}/models/{version}/download")
    def download(session_id: str, version: str, _: Principal = as_viewer) -> Response:
        """The model blob (CBOR tensor set, docs/storage.md), checked against its digest."""
        _session(session_id)
        model = store.get_model(version)
        if model is None or model.session_id != session_id:
            raise ApiError(404, f"session {session_id!r} has no model version {version!r}")
        if blobs is None:
            raise ApiError(
                404,
                "this API server has no model blob store: start it with --models DIR, the "
                "controller's model folder (e.g. edgefl-state/models)",
            )
        try:
            data = blobs.get(version)
        except (KeyError, ValueError):
            raise ApiError(
                404, f"the blob of {version!r} is not in this server's blob store"
            ) from None
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

    # operator: control ----------------------------------------------------------------
    @operator.post("/sessions/{session_id}/stop", status_code=202)
    def stop(session_id: str, who: Principal = as_operator) -> dict[str, Any]:
        """Ask the session's controller to stop it (202: it acts between or during rounds).

        409 if the session is not running; a repeated request keeps the first requester.
        """
        _session(session_id)
        try:
            sess = store.request_stop(session_id, who.name)
        except KeyError:
            raise ApiError(404, f"no session {session_id!r}") from None
        except ValueError as exc:
            raise ApiError(409, f"cannot stop: {exc}") from None
        security_log.warning("session %s: stop requested by %s", session_id, who.name)
        return {
            "session_id": sess.session_id,
            "status": sess.status,
            "stop_requested_by": sess.stop_requested_by,
            "stop_requested_at": sess.stop_requested_at,
        }

    # admin: identities ----------------------------------------------------------------
    @admin.post("/devices/{device}/revoke")
    def revoke(device: str, who: Principal = as_admin) -> dict[str, Any]:
        """Refuse every token of ``device`` issued until now, on every verifier that reads the
        revocation list (the broker cuts live connections on its next sweep)."""
        try:
            check_segment("device id", device)
        except TopicError as exc:
            raise ApiError(422, str(exc)) from None
        path = auth.revocations_path() if auth is not None else None
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
        return {"device": device, "revoked_at": when, "revoked_by": who.name}

    @admin.get("/keys")
    def keys(_: Principal = as_admin) -> dict[str, Any]:
        """What the verifiers accept: the key ids of the JWK set, or HS256 for a secret."""
        if auth is None:
            raise ApiError(409, "authentication is off (insecure mode): no keys are in use")
        if auth.secret is not None:
            return {"algorithm": "HS256"}
        source = Path(auth.keys or "")
        key_dir = KeyDir(source)
        try:
            jwks = load_jwks(source if source.is_file() else key_dir.jwks_path)
            active = key_dir.active_kid() if source.is_dir() and key_dir.exists() else None
        except KeyDirError as exc:
            raise ApiError(500, f"cannot read the public keys: {exc}") from None
        return {
            "keys": [{"kid": k["kid"], "alg": k["alg"]} for k in jwks["keys"]],
            "active": active,
        }

    app.include_router(viewer)
    app.include_router(operator)
    app.include_router(admin)
    return app
