"""The read-only REST API and the dashboard page, over a state store.

There is NO authentication yet: anyone who can reach the port can read every session. Every
route is read-only, and the servers bind to loopback by default; keep it that way (or put an
authenticating proxy in front) until JWT roles land in ``require_viewer``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from edgefl.store.base import RoundRecord, SessionRecord, Store


def require_viewer() -> None:
    """Authorisation seam for every route but /api/health. It currently allows every request.

    JWT role checks (viewer and up) will plug in here: read the bearer token, verify it and
    raise ``HTTPException(401/403)``. Until then this function enforces nothing.
    """


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


def create_app(store: Store, *, title: str = "edgefl") -> FastAPI:
    """The dashboard page at ``/`` and the JSON API under ``/api``, reading ``store`` live.

    Every route only reads; the app neither caches nor closes ``store``, which must be safe
    to read from the server's worker threads. An unknown session id answers 404.
    """
    # /docs and /redoc load Swagger/ReDoc from a CDN, which offline sites cannot reach.
    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None)
    page = resources.files("edgefl.api").joinpath("static/index.html").read_text("utf-8")

    @app.get("/api/health")
    def health() -> dict[str, str]:
        """Outside the auth seam on purpose: liveness probes carry no token."""
        return {"status": "ok"}

    viewer = APIRouter(dependencies=[Depends(require_viewer)])

    def _session(session_id: str) -> SessionRecord:
        sess = store.get_session(session_id)
        if sess is None:
            raise HTTPException(404, f"no session {session_id!r}")
        return sess

    @viewer.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        """The single-page dashboard; it polls the JSON routes below."""
        return page

    @viewer.get("/api/sessions")
    def sessions() -> list[dict[str, Any]]:
        """Newest first, so the dashboard's default pick is simply the first one."""
        return [_session_summary(s) for s in reversed(store.list_sessions())]

    @viewer.get("/api/sessions/{session_id}")
    def session(session_id: str) -> dict[str, Any]:
        """One session's summary plus the config it was started with; 404 if unknown."""
        sess = _session(session_id)
        return {**_session_summary(sess), "config": sess.config}

    @viewer.get("/api/sessions/{session_id}/rounds")
    def rounds(session_id: str) -> list[dict[str, Any]]:
        """Every round attempt of a session, by (round, attempt); 404 if the session is unknown."""
        _session(session_id)
        return [_round_summary(r) for r in store.list_rounds(session_id)]

    @viewer.get("/api/sessions/{session_id}/models")
    def models(session_id: str) -> list[dict[str, Any]]:
        """The model versions a session produced, oldest first (metadata only, never the blobs)."""
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

    app.include_router(viewer)
    return app
