"""The REST API and the dashboard page, over a state store (and optionally the blob store).

Every route but ``/`` (the page, which holds no data) and ``/api/health`` needs a bearer JWT
(``edgefl.api.auth``): viewers read projects, sessions, rounds, models and packages;
operators stop sessions and upload packages; admins revoke devices, list keys and manage their
projects' members. Roles are per project, and every answer is scoped to the caller's projects.
Errors are RFC 9457 problem documents, lists are paginated (``?limit=&offset=``, ``X-Total-Count``,
``Link``). Without token material the app refuses to build unless explicitly ``insecure``.
The resources live in ``edgefl.api.routes``, one module each.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from edgefl.api.auth import ApiAuth, install_problem_handlers
from edgefl.api.events import LiveEvents
from edgefl.api.routes import (
    devices,
    identity,
    members,
    models,
    packages,
    projects,
    rounds,
    session_control,
    sessions,
    telemetry,
)
from edgefl.api.routes import logs as session_logs
from edgefl.api.routes.deps import ApiContext
from edgefl.api.schemas import Health
from edgefl.auth.tokens import AuthConfig
from edgefl.packages.format import DEFAULT_MAX_SIZE
from edgefl.store.base import BlobStore, RoundRecord, SessionRecord, Store

log = logging.getLogger("edgefl.api")
security_log = logging.getLogger("edgefl.security")


def _session_summary(s: SessionRecord) -> dict[str, Any]:
    """A session as ``GET /api/sessions`` lists it (for the event streams)."""
    return sessions.summary(s).model_dump()


def _round_summary(r: RoundRecord) -> dict[str, Any]:
    """A round attempt as ``GET /api/sessions/{id}/rounds`` lists it (for the event streams)."""
    return rounds.summary(r).model_dump()


def create_app(
    store: Store,
    auth: AuthConfig | None = None,
    *,
    insecure: bool = False,
    project: str | None = None,
    blobs: BlobStore | None = None,
    title: str = "edgefl",
    max_package_bytes: int = DEFAULT_MAX_SIZE,
    logs: Path | None = None,
) -> FastAPI:
    """The dashboard page at ``/`` and the JSON API under ``/api``, reading ``store`` live.

    ``auth`` is the deployment's token material; ``auth=None`` raises ``ValueError`` unless
    ``insecure=True``, which serves everything to anyone and says so in the log. Each caller
    sees only their projects (memberships, or their token's project while it has none:
    docs/security.md, "Teams and project scoping"). ``project`` binds the API to one project:
    callers who are not its are refused and its sessions are the only ones shown (None: every
    project the caller belongs to). ``blobs`` is the controller's model folder, for model
    downloads and packages; uploads over ``max_package_bytes`` are refused (413). ``logs`` is
    the controller's session log folder (``GET /api/sessions/{id}/logs``). The app
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
    # /docs and /redoc load Swagger/ReDoc from a CDN, which offline sites cannot reach.
    app = FastAPI(
        title=title, version="1", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json"
    )
    guard = ApiAuth(auth, project, store)
    app.state.edgefl = ApiContext(
        store=store,
        guard=guard,
        auth=auth,
        project=project,
        blobs=blobs,
        max_package_bytes=max_package_bytes,
        logs=logs,
    )
    install_problem_handlers(app)
    page = resources.files("edgefl.api").joinpath("static/index.html").read_text("utf-8")

    @app.get("/api/health", response_model=Health, tags=["health"])
    def health() -> Health:
        """Outside authentication on purpose: liveness probes carry no token."""
        return Health(status="ok")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        """The single-page dashboard: public, since it holds no data until a token is given."""
        return page

    app.include_router(identity.router)
    app.include_router(projects.router)
    app.include_router(members.router)
    app.include_router(sessions.router)
    app.include_router(session_control.router)
    app.include_router(session_logs.router)
    app.include_router(devices.router)
    app.include_router(telemetry.router)
    app.include_router(rounds.router)
    app.include_router(models.router)
    app.include_router(packages.router)
    app.state.live_events = LiveEvents(store, guard, project)
    app.include_router(app.state.live_events.router)
    return app
