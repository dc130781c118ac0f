"""Live updates for the dashboard over Server-Sent Events (``text/event-stream``).

Three streams, all read-only (viewer and up):

* ``GET /api/events``: ``sessions`` (every session's summary, newest first, the shape of
  ``GET /api/sessions``) at once and again whenever any session changes. It runs until the
  client goes away.
* ``GET /api/sessions/{id}/events``: ``session`` (its summary), ``round`` (one round attempt,
  the shape of an item of ``GET .../rounds``, whenever it starts or finishes) and ``model``
  (one model version with its parent) — first the whole state, then only what changed. When
  the session is ``completed``, ``failed`` or ``stopped`` it sends ``end`` and closes, so a
  browser's EventSource must close itself on ``end`` rather than reconnect.
* ``GET /api/fleet/events``: the fleet as the controllers record it. ``device`` (the shape of
  ``GET /api/devices/{device}``: state, last seen, task, counts and last telemetry) and
  ``combiner`` (an item of ``GET /api/combiners``) for every one at first, then for each one
  that changed; ``device_removed`` when a device leaves the listed set (it went offline under
  ``?state=online``, say); and ``fleet`` (how many devices match, how many are listed, how
  many are online) whenever those counts change. ``?region=`` and ``?state=`` filter the
  devices as ``GET /api/devices`` does, and ``?limit=`` (500, at most 1000) caps them, so a
  large fleet is narrowed in the database rather than shipped whole. It is polled every
  ``fleet_poll_s`` (1 s: the controllers write the fleet tables about once a second). It is
  not under ``/api/devices/`` because ``/api/devices/{device}`` would take ``events`` as a
  device id (a valid one).

Both send a ``: heartbeat`` comment after 15 s of silence (so proxies and the browser keep
the connection), and ``auth`` (a problem document) followed by the end of the stream once the
token behind it stops verifying: it is checked again every few seconds, so revoking a person
or letting the token expire reaches an open page without any polling from the browser.

Every stream carries only the caller's projects (docs/security.md, "Teams and project
scoping"), and their roles are resolved again at each of those checks: a person removed from
a project stops getting its sessions and fleet within seconds, and a stream of one of its
sessions ends with ``auth`` (status 404).

The API process learns of changes by reading the store (the controller may be another
process): it polls the store every ``poll_s`` (0.5 s) per open stream and pushes only what
differs from what that stream already sent.

Authentication. A browser's ``EventSource`` cannot send an ``Authorization`` header, and a JWT
in the URL would end up in access logs, proxy logs and browser history, where it would stay
valid for days. So the page first calls ``POST /api/sse-ticket`` with its bearer token and
gets a random ticket that is valid for 30 s and for one stream only (it is consumed when the
stream opens), and opens ``.../events?ticket=...``. A logged ticket is useless: spent or
expired. The ticket stands for the token it was issued against, which the stream keeps
re-verifying. Tickets live in this API process's memory: behind several API replicas the
ticket call and the stream must reach the same one (sticky sessions), or use the bearer
header, which every stream accepts too (for clients that can send headers: httpx, curl, the
CLI).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgefl.api.auth import PEOPLE, ApiAuth, ApiError, Principal
from edgefl.api.routes import devices, models, rounds, sessions
from edgefl.api.routes.deps import MAX_LIMIT, scope_of
from edgefl.auth.tokens import AuthError, Role
from edgefl.store.base import SessionRecord, Store

log = logging.getLogger("edgefl.api")

TERMINAL = ("completed", "failed", "stopped")
FLEET_LIMIT = 500  # devices a fleet stream lists unless asked for fewer (or up to MAX_LIMIT)
STREAM_HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx would otherwise hold events back in its buffer
}


def sse(event: str, data: Any) -> str:
    """One SSE message: an event name and a single line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class _Grant:
    """What a ticket (or a bearer header) stands for: a principal, and its token to re-check."""

    principal: Principal
    token: str | None  # None in insecure mode
    expires: float = 0.0  # tickets only: monotonic seconds


class LiveEvents:
    """The SSE routes of one app, with their ticket book; ``router`` is what the app mounts.

    Events carry the REST resources' own summaries (``edgefl.api.routes``), so a stream says
    exactly what ``GET /api/sessions``, ``.../rounds`` and ``.../models`` would.
    """

    def __init__(
        self,
        store: Store,
        guard: ApiAuth,
        project: str | None = None,
        *,
        poll_s: float = 0.5,
        fleet_poll_s: float = 1.0,
        heartbeat_s: float = 15.0,
        recheck_s: float = 2.0,
        ticket_ttl_s: float = 30.0,
        max_tickets: int = 10_000,
    ) -> None:
        self.store = store
        self.guard = guard
        self.project = project
        self.poll_s = poll_s
        self.fleet_poll_s = fleet_poll_s
        self.heartbeat_s = heartbeat_s
        self.recheck_s = recheck_s
        self.ticket_ttl_s = ticket_ttl_s
        self.max_tickets = max_tickets
        self._tickets: dict[str, _Grant] = {}
        self._lock = threading.Lock()
        self._active = 0
        self._closing = False
        self.router = self._routes()

    def close(self) -> None:
        """End every open stream at its next poll, so a server can shut down promptly.

        Without this uvicorn waits on open streams until its own timeout (about 5 s with a
        dashboard tab open). Clients see a ``shutdown`` event and EventSource reconnects later.
        """
        self._closing = True

    @property
    def active(self) -> int:
        """Streams open right now: goes back down when a client leaves or a stream ends."""
        return self._active

    # tickets --------------------------------------------------------------------------
    def issue_ticket(self, principal: Principal, token: str | None) -> str:
        """A one-time ticket for ``principal``; 429 when too many are outstanding."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, g in self._tickets.items() if g.expires <= now]:
                del self._tickets[key]
            if len(self._tickets) >= self.max_tickets:
                raise ApiError(429, "too many unused stream tickets; try again in a minute")
            ticket = secrets.token_urlsafe(32)
            self._tickets[ticket] = _Grant(principal, token, now + self.ticket_ttl_s)
        return ticket

    def _redeem(self, ticket: str) -> _Grant:
        with self._lock:
            grant = self._tickets.pop(ticket, None)
        if grant is None or grant.expires <= time.monotonic():
            raise ApiError(
                401,
                "unknown, spent or expired stream ticket: POST /api/sse-ticket for a new one "
                "(a ticket opens one stream, within 30 s)",
                type_="urn:edgefl:problem:unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="edgefl", error="invalid_token"'},
            )
        return grant

    def _recheck(self, grant: _Grant) -> tuple[str | None, Principal]:
        """Why the grant's token no longer admits a viewer (or None while it does), and the
        caller with their roles as the store has them now."""
        verifier = self.guard.verifier
        if verifier is None or grant.token is None:
            return None, grant.principal
        try:
            claims = verifier.verify(grant.token)
        except AuthError as exc:
            return str(exc), grant.principal
        if claims.role not in PEOPLE:
            return f"role {claims.role.value!r} may not read the dashboard", grant.principal
        try:
            return None, self.guard.principal(claims)
        except ApiError as exc:  # no longer a member of this API's project
            return str(exc.detail), grant.principal

    # streams --------------------------------------------------------------------------
    def _visible(self, project: str, who: Principal) -> bool:
        return (self.project is None or project == self.project) and (
            who.role_in(project) is not None
        )

    def _session(self, session_id: str, who: Principal) -> SessionRecord:
        """The session, or 404 when it is missing or not the caller's project's."""
        sess = self.store.get_session(session_id)
        if sess is None or not self._visible(sess.project, who):
            raise ApiError(404, f"no session {session_id!r}")
        return sess

    async def _stream(
        self,
        request: Request,
        grant: _Grant,
        changes: Callable[[Principal], list[str]],
        poll_s: float | None = None,
        project: str | None = None,
    ) -> AsyncIterator[str]:
        """Sends ``changes(caller)`` every ``poll_s`` (default ``self.poll_s``) when
        non-empty, heartbeats, and auth checks (which also refresh the caller's roles; a
        stream of one ``project`` ends when it is no longer theirs).

        ``changes`` runs in a worker thread (it reads the store); an ``end`` message from it
        closes the stream. Leaving (client gone, server shutdown) cancels this generator.
        """
        import anyio

        self._active += 1
        who = grant.principal
        try:
            last_sent = last_check = time.monotonic()
            while True:
                now = time.monotonic()
                if now - last_check >= self.recheck_s:
                    last_check = now
                    why, who = await run_in_threadpool(self._recheck, grant)
                    if why is not None:
                        yield sse("auth", {"status": 401, "detail": why})
                        return
                    if project is not None and not self._visible(project, who):
                        detail = "not found: the stream's project is no longer the caller's"
                        yield sse("auth", {"status": 404, "detail": detail})
                        return
                messages = await run_in_threadpool(changes, who)
                if messages:
                    yield "".join(messages)
                    last_sent = time.monotonic()
                    if messages[-1].startswith("event: end\n"):
                        return
                elif time.monotonic() - last_sent >= self.heartbeat_s:
                    yield ": heartbeat\n\n"
                    last_sent = time.monotonic()
                if self._closing:
                    yield sse("shutdown", {"detail": "the server is shutting down"})
                    return
                if await request.is_disconnected():
                    return
                await anyio.sleep(self.poll_s if poll_s is None else poll_s)
        finally:
            self._active -= 1

    def _session_changes(self, session_id: str) -> Callable[[Principal], list[str]]:
        """A closure remembering what it sent, answering only what changed since."""
        sent_session: dict[str, Any] | None = None
        sent_rounds: dict[str, dict[str, Any]] = {}
        sent_models: set[str] = set()

        def changes(_who: Principal) -> list[str]:
            nonlocal sent_session
            sess = self.store.get_session(session_id)
            if sess is None:  # deleted under us: nothing more will come
                return [sse("end", {"session_id": session_id, "status": "gone"})]
            out: list[str] = []
            for r in self.store.list_rounds(session_id):
                summary = rounds.summary(r).model_dump()
                if sent_rounds.get(r.task_id) != summary:
                    sent_rounds[r.task_id] = summary
                    out.append(sse("round", summary))
            for m in self.store.list_models(session_id):
                if m.version not in sent_models:
                    sent_models.add(m.version)
                    out.append(sse("model", models.summary(m).model_dump()))
            summary = sessions.summary(sess).model_dump()
            if summary != sent_session:  # after its rounds: the counter never runs ahead
                sent_session = summary
                out.append(sse("session", summary))
            if sess.status in TERMINAL:
                out.append(sse("end", {"session_id": session_id, "status": sess.status}))
            return out

        return changes

    def _sessions_changes(self) -> Callable[[Principal], list[str]]:
        sent: list[dict[str, Any]] | None = None

        def changes(who: Principal) -> list[str]:
            nonlocal sent
            listed = [
                sessions.summary(s).model_dump()
                for s in reversed(self.store.list_sessions(scope_of(self.project, who)))
            ]
            if listed == sent:
                return []
            sent = listed
            return [sse("sessions", listed)]

        return changes

    def _fleet_changes(
        self, region: str | None, state: str | None, limit: int
    ) -> Callable[[Principal], list[str]]:
        """Devices and combiners that are new or differ from what this stream last sent.

        Keyed by (project, device) and (project, region), since an API bound to no project
        serves every project's fleet.
        """
        sent_devices: dict[tuple[str, str], dict[str, Any]] = {}
        sent_combiners: dict[tuple[str, str], dict[str, Any]] = {}
        sent_counts: dict[str, int] | None = None

        def changes(who: Principal) -> list[str]:
            nonlocal sent_counts
            store, project = self.store, scope_of(self.project, who)
            rows = store.list_devices(project, region=region, state=state, limit=limit)
            out: list[str] = []
            listed: set[tuple[str, str]] = set()
            for d in rows:
                key = (d.project, d.device)
                listed.add(key)
                body = devices.detail(d).model_dump()
                if sent_devices.get(key) != body:
                    sent_devices[key] = body
                    out.append(sse("device", body))
            for key in [k for k in sent_devices if k not in listed]:
                del sent_devices[key]
                out.append(sse("device_removed", {"project": key[0], "device": key[1]}))
            shown: set[tuple[str, str]] = set()
            for c in store.list_combiners(project):
                key = (c.project, c.region)
                shown.add(key)
                body = devices.combiner(c).model_dump()
                if sent_combiners.get(key) != body:
                    sent_combiners[key] = body
                    out.append(sse("combiner", body))
            for key in [k for k in sent_combiners if k not in shown]:
                del sent_combiners[key]
                out.append(sse("combiner_removed", {"project": key[0], "region": key[1]}))
            counts = {
                "matching": store.count_devices(project, region=region, state=state),
                "listed": len(rows),
                "devices": store.count_devices(project),
                "online": store.count_devices(project, state="online"),
            }
            if counts != sent_counts:  # last: the page knows the first state is complete
                sent_counts = counts
                out.append(sse("fleet", counts))
            return out

        return changes

    def _routes(self) -> APIRouter:
        router = APIRouter(prefix="/api", tags=["events"])
        as_viewer = Depends(self.guard.require(Role.viewer))
        bearer = self.guard.require(Role.viewer)

        def granted(request: Request, ticket: str | None = None) -> _Grant:
            """A ticket from the query, or else the bearer header (for clients that send one)."""
            if ticket:
                grant = self._redeem(ticket)
                why, who = self._recheck(grant)  # revoked in the ticket's 30 s: refused now
                if why is not None:
                    raise self.guard._unauthorized(why, "invalid_token")
                return _Grant(who, grant.token, grant.expires)
            principal = bearer(request)
            _, _, token = request.headers.get("authorization", "").partition(" ")
            return _Grant(principal, token.strip() or None)

        as_granted = Depends(granted)

        @router.post("/sse-ticket", status_code=201)
        def sse_ticket(request: Request, who: Principal = as_viewer) -> dict[str, Any]:
            """A one-time ticket that opens one event stream within 30 s (EventSource cannot
            send the bearer header, and the token itself must not go into a URL)."""
            _, _, token = request.headers.get("authorization", "").partition(" ")
            ticket = self.issue_ticket(who, token.strip() or None)
            return {"ticket": ticket, "expires_in": self.ticket_ttl_s}

        @router.get("/events", response_class=StreamingResponse)
        async def events(request: Request, grant: _Grant = as_granted) -> StreamingResponse:
            """Every session's summary now and on each change (``?ticket=`` or bearer)."""
            body = self._stream(request, grant, self._sessions_changes())
            return StreamingResponse(body, media_type="text/event-stream", headers=STREAM_HEADERS)

        @router.get("/sessions/{session_id}/events", response_class=StreamingResponse)
        async def session_events(
            session_id: str, request: Request, grant: _Grant = as_granted
        ) -> StreamingResponse:
            """One session's summary, rounds and models, then their changes until it ends."""
            sess = await run_in_threadpool(self._session, session_id, grant.principal)  # 404
            changes = self._session_changes(session_id)
            body = self._stream(request, grant, changes, project=sess.project)
            return StreamingResponse(body, media_type="text/event-stream", headers=STREAM_HEADERS)

        @router.get("/fleet/events", response_class=StreamingResponse, tags=["devices"])
        async def fleet_events(
            request: Request,
            region: str | None = Query(None, max_length=64, description="only this region's"),
            state: str | None = Query(
                None, pattern="^(online|offline)$", description="online or offline devices"
            ),
            limit: int = Query(FLEET_LIMIT, ge=1, le=MAX_LIMIT, description="devices listed"),
            grant: _Grant = as_granted,
        ) -> StreamingResponse:
            """Devices (with last telemetry) and combiners, then only their changes, until
            the client leaves; ``region``/``state`` filter the devices like GET /api/devices."""
            body = self._stream(
                request, grant, self._fleet_changes(region, state, limit), self.fleet_poll_s
            )
            return StreamingResponse(body, media_type="text/event-stream", headers=STREAM_HEADERS)

        return router
