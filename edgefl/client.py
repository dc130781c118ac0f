"""``APIClient``: the edgefl REST API from Python, one method per route, parsed into the same
pydantic models the server answers with (``edgefl.api.schemas``).

Every error answer becomes an ``APIError`` carrying the server's RFC 9457 problem document;
a server that cannot be reached is ``APIUnreachable``. Both are ``ClientError``, so a script
catches one type. Needs the ``server`` extra (httpx, pydantic).

    with APIClient("http://127.0.0.1:8080", token) as api:
        for s in api.iter_sessions():
            print(s.session_id, s.status)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from edgefl.api.schemas import (
    CombinerSummary,
    DeviceDetail,
    DeviceSummary,
    Keys,
    Lineage,
    Member,
    ModelSummary,
    PackageSummary,
    Page,
    ProjectSummary,
    Revoked,
    RoundDetail,
    RoundSummary,
    SessionCreate,
    SessionDetail,
    SessionSummary,
    StopAccepted,
    TelemetryPoint,
    WhoAmI,
)

M = TypeVar("M", bound=BaseModel)

TERMINAL = ("completed", "failed", "stopped")


class ClientError(Exception):
    """Anything that kept a call from getting its answer."""


class APIUnreachable(ClientError):
    """No HTTP answer at all: wrong URL, server down, network cut, timeout."""


class APIError(ClientError):
    """The server answered with an error; ``problem`` is its RFC 9457 document.

    An answer that was not a problem document (a proxy's HTML page) gets one made up from
    the status line and the body's start, so ``problem`` always has type, title, status and
    detail.
    """

    def __init__(self, problem: dict[str, Any]) -> None:
        self.problem = problem
        self.status: int = int(problem.get("status", 0))
        self.type: str = str(problem.get("type", "about:blank"))
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        super().__init__(f"{self.status} {self.title}: {self.detail}")

    @classmethod
    def from_response(cls, res: httpx.Response) -> APIError:
        """The problem document of an error response (or one made from its status line)."""
        body: Any = None
        if "json" in res.headers.get("content-type", ""):
            try:
                body = res.json()
            except ValueError:
                body = None
        if not isinstance(body, dict) or "status" not in body:
            try:
                title = HTTPStatus(res.status_code).phrase
            except ValueError:
                title = "Error"
            body = {
                "type": "about:blank",
                "title": title,
                "status": res.status_code,
                "detail": res.text[:500] or title,
            }
        return cls(body)


class APIClient:
    """A bearer-token client of one edgefl API server (``base_url``, e.g. http://host:8080).

    ``token`` is a JWT from ``edgefl token`` (None for an insecure development server).
    ``transport`` lets tests or embedders route the calls elsewhere (an ASGI app, a proxy).
    Close it, or use it as a context manager.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    # plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> APIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call; ``APIError`` for any 4xx/5xx answer, ``APIUnreachable`` for none."""
        try:
            res = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise APIUnreachable(
                f"cannot reach the edgefl API at {self.base_url}: {exc or type(exc).__name__}"
            ) from exc
        if res.status_code >= 400:
            raise APIError.from_response(res)
        return res

    def _get(self, path: str, model: type[M], **params: Any) -> M:
        return model.model_validate(self.request("GET", path, params=params).json())

    def _page(
        self, path: str, model: type[M], limit: int | None, offset: int, **filters: Any
    ) -> Page[M]:
        params: dict[str, Any] = {"offset": offset}
        if limit is not None:
            params["limit"] = limit
        params.update({k: v for k, v in filters.items() if v is not None})
        res = self.request("GET", path, params=params)
        items = TypeAdapter(list[model]).validate_python(res.json())  # type: ignore[valid-type]
        total = int(res.headers.get("x-total-count", len(items)))
        nxt = res.links.get("next", {}).get("url")
        next_offset = None
        if nxt:
            query = httpx.URL(nxt).params.get("offset")
            next_offset = int(query) if query is not None else offset + len(items)
        return Page[model](  # type: ignore[valid-type]
            items=items,
            total=total,
            offset=offset,
            limit=limit if limit is not None else len(items),
            next_offset=next_offset,
        )

    def _all(self, path: str, model: type[M], **filters: Any) -> Iterator[M]:
        """Every item of a list, following ``Link: rel=next`` page by page."""
        offset: int | None = 0
        while offset is not None:
            page = self._page(path, model, None, offset, **filters)
            yield from page.items
            offset = page.next_offset

    # identity ----------------------------------------------------------------------------
    def health(self) -> bool:
        """Whether the server answers its (unauthenticated) liveness probe."""
        return bool(self.request("GET", "/api/health").json().get("status") == "ok")

    def whoami(self) -> WhoAmI:
        return self._get("/api/whoami", WhoAmI)

    def keys(self) -> Keys:
        """Admin: the key ids the verifiers accept (or just HS256)."""
        return self._get("/api/keys", Keys)

    def revoke_device(self, device: str) -> Revoked:
        """Admin: refuse every token of ``device`` issued until now."""
        res = self.request("POST", f"/api/devices/{_seg(device)}/revoke")
        return Revoked.model_validate(res.json())

    # projects ----------------------------------------------------------------------------
    def projects(self, limit: int | None = None, offset: int = 0) -> Page[ProjectSummary]:
        return self._page("/api/projects", ProjectSummary, limit, offset)

    def project(self, name: str) -> ProjectSummary:
        """One project's session counts and its active model."""
        return self._get(f"/api/projects/{_seg(name)}", ProjectSummary)

    def set_active_model(self, project: str, version: str | None) -> ProjectSummary:
        """Operator: promote ``version`` as ``project``'s active model (None clears it)."""
        path = f"/api/projects/{_seg(project)}/active-model"
        res = self.request("PUT", path, json={"version": version})
        return ProjectSummary.model_validate(res.json())

    def activate_model(self, version: str, project: str | None = None) -> ProjectSummary:
        """Operator: promote ``version`` in ``project``, by default the project the token is
        for (or the server's only project, on an insecure server)."""
        return self.set_active_model(project or self.default_project(), version)

    def default_project(self) -> str:
        """The project this client works in: its token's, or the server's only one."""
        mine = self.whoami().project
        if mine:
            return mine
        names = [p.project for p in self.projects(limit=2).items]
        if len(names) != 1:
            raise ClientError("this server has several projects (or none): name one")
        return names[0]

    # members (teams) ---------------------------------------------------------------------
    def members(self, project: str) -> list[Member]:
        """The project's team (admins), or only the caller's own membership (others)."""
        res = self.request("GET", f"/api/projects/{_seg(project)}/members")
        return TypeAdapter(list[Member]).validate_python(res.json())

    def add_member(self, project: str, user: str, role: str = "viewer") -> Member:
        """Admin: invite ``user`` (their tokens' ``sub``) into ``project`` with ``role``."""
        path = f"/api/projects/{_seg(project)}/members"
        res = self.request("POST", path, json={"user": user, "role": role})
        return Member.model_validate(res.json())

    def set_member_role(self, project: str, user: str, role: str) -> Member:
        """Admin: change a member's role (409 when it would demote the last admin)."""
        path = f"/api/projects/{_seg(project)}/members/{_seg(user)}"
        res = self.request("PUT", path, json={"role": role})
        return Member.model_validate(res.json())

    def remove_member(self, project: str, user: str) -> None:
        """Admin: remove a member (409 for the project's last admin)."""
        self.request("DELETE", f"/api/projects/{_seg(project)}/members/{_seg(user)}")

    # sessions ----------------------------------------------------------------------------
    def sessions(self, limit: int | None = None, offset: int = 0) -> Page[SessionSummary]:
        """One page of sessions, newest first."""
        return self._page("/api/sessions", SessionSummary, limit, offset)

    def iter_sessions(self) -> Iterator[SessionSummary]:
        """Every session, newest first, across pages."""
        return self._all("/api/sessions", SessionSummary)

    def session(self, session_id: str) -> SessionDetail:
        return self._get(f"/api/sessions/{_seg(session_id)}", SessionDetail)

    def create_session(self, spec: SessionCreate | None = None, **fields: Any) -> SessionDetail:
        """Operator: create a session (``created``) from ``spec`` or its fields (``rounds=``,
        ``model=`` a built-in name or an uploaded package's digest, ``train={"lr": ...}``...).
        """
        body = spec if spec is not None else SessionCreate(**fields)
        res = self.request("POST", "/api/sessions", json=body.model_dump(exclude_none=True))
        return SessionDetail.model_validate(res.json())

    def start_session(self, session_id: str) -> SessionSummary:
        """Operator: queue a created session; a serving controller runs it."""
        res = self.request("POST", f"/api/sessions/{_seg(session_id)}/start")
        return SessionSummary.model_validate(res.json())

    def resume_session(self, session_id: str) -> SessionSummary:
        """Operator: queue a failed or stopped session again, with a fresh attempt budget."""
        res = self.request("POST", f"/api/sessions/{_seg(session_id)}/resume")
        return SessionSummary.model_validate(res.json())

    def stop_session(self, session_id: str) -> StopAccepted:
        """Operator: ask the session's controller to stop it (it stays resumable)."""
        res = self.request("POST", f"/api/sessions/{_seg(session_id)}/stop")
        return StopAccepted.model_validate(res.json())

    def session_logs(
        self, session_id: str, round_: int | None = None, level: str | None = None
    ) -> list[dict[str, Any]]:
        """Viewer: the session's JSON log records, oldest first (``GET .../logs``, NDJSON)."""
        params: dict[str, Any] = {}
        if round_ is not None:
            params["round"] = round_
        if level is not None:
            params["level"] = level
        res = self.request("GET", f"/api/sessions/{_seg(session_id)}/logs", params=params)
        return [json.loads(line) for line in res.text.splitlines() if line.strip()]

    # rounds ------------------------------------------------------------------------------
    def rounds(
        self, session_id: str, limit: int | None = None, offset: int = 0
    ) -> Page[RoundSummary]:
        return self._page(f"/api/sessions/{_seg(session_id)}/rounds", RoundSummary, limit, offset)

    def all_rounds(self, session_id: str) -> list[RoundSummary]:
        """Every attempt of every round of a session, across pages."""
        return list(self._all(f"/api/sessions/{_seg(session_id)}/rounds", RoundSummary))

    def round(self, session_id: str, round_: int, attempt: int | None = None) -> RoundDetail:
        """A round's last attempt (or ``attempt``) with participants and rejections."""
        params = {} if attempt is None else {"attempt": attempt}
        path = f"/api/sessions/{_seg(session_id)}/rounds/{int(round_)}"
        return self._get(path, RoundDetail, **params)

    # models ------------------------------------------------------------------------------
    def models(
        self, session_id: str, limit: int | None = None, offset: int = 0
    ) -> Page[ModelSummary]:
        return self._page(f"/api/sessions/{_seg(session_id)}/models", ModelSummary, limit, offset)

    def all_models(self, session_id: str) -> list[ModelSummary]:
        return list(self._all(f"/api/sessions/{_seg(session_id)}/models", ModelSummary))

    def model(self, session_id: str, version: str) -> ModelSummary:
        return self._get(f"/api/sessions/{_seg(session_id)}/models/{_seg(version)}", ModelSummary)

    def lineage(self, session_id: str, version: str) -> Lineage:
        """The version and its parents back to the session's initial model."""
        path = f"/api/sessions/{_seg(session_id)}/models/{_seg(version)}/lineage"
        return self._get(path, Lineage)

    def download_model(self, session_id: str, version: str) -> bytes:
        """The model blob (CBOR tensors), checked here against the digest the server sent."""
        path = f"/api/sessions/{_seg(session_id)}/models/{_seg(version)}/download"
        res = self.request("GET", path)
        etag = res.headers.get("etag", "").strip('"')
        if etag and hashlib.sha256(res.content).hexdigest() != etag:
            raise ClientError(f"the download of {version} does not match its digest {etag}")
        return res.content

    # devices, combiners, telemetry ------------------------------------------------------
    def devices(
        self,
        region: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> Page[DeviceSummary]:
        """One page of devices (by id), optionally of one region or state."""
        return self._page("/api/devices", DeviceSummary, limit, offset, region=region, state=state)

    def iter_devices(
        self, region: str | None = None, state: str | None = None
    ) -> Iterator[DeviceSummary]:
        """Every device (of a region, in a state), across pages."""
        return self._all("/api/devices", DeviceSummary, region=region, state=state)

    def device(self, device: str) -> DeviceDetail:
        """One device with its attributes, current task and last telemetry."""
        return self._get(f"/api/devices/{_seg(device)}", DeviceDetail)

    def combiners(self, limit: int | None = None, offset: int = 0) -> Page[CombinerSummary]:
        return self._page("/api/combiners", CombinerSummary, limit, offset)

    def telemetry(
        self,
        device: str | None = None,
        since: float | str | None = None,
        limit: int = 100,
        *,
        metric: str | None = None,
        until: float | str | None = None,
    ) -> list[TelemetryPoint]:
        """Telemetry points, newest first: the history when the server reads InfluxDB (each
        point's ``source`` is "influxdb"), else each device's last point ("store").
        ``since``/``until`` are unix seconds, ages ("10m", "2h") or ISO 8601."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("device", device), ("metric", metric), ("since", since),
                           ("until", until)):  # fmt: skip
            if value is not None:
                params[key] = value
        res = self.request("GET", "/api/telemetry", params=params)
        return TypeAdapter(list[TelemetryPoint]).validate_python(res.json())

    # packages ----------------------------------------------------------------------------
    def packages(self, limit: int | None = None, offset: int = 0) -> Page[PackageSummary]:
        return self._page("/api/packages", PackageSummary, limit, offset)

    def package(self, digest: str) -> PackageSummary:
        return self._get(f"/api/packages/{_seg(digest)}", PackageSummary)

    def upload_package(self, data: bytes, project: str | None = None) -> PackageSummary:
        """Operator: store a package (checked by the server as the controller checks it) for
        ``project`` (default: the API's, or the caller's only one as operator); a session
        of that project then names its ``digest``."""
        res = self.request(
            "POST",
            "/api/packages",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            params={} if project is None else {"project": project},
        )
        return PackageSummary.model_validate(res.json())


def _seg(value: str) -> str:
    """A path segment, percent-encoded, so an id can never change the route it names."""
    return quote(str(value), safe="")


__all__ = ["TERMINAL", "APIClient", "APIError", "APIUnreachable", "ClientError"]
