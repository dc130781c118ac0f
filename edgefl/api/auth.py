"""Bearer-token (JWT) authorisation for the REST API, and its RFC 9457 problem responses.

People hold ``viewer`` < ``operator`` < ``admin``; a route names the least role it needs.
Service identities (device, combiner, controller) are for MQTT only and get 403 on every
route: a stolen device token must not read a fleet's sessions. Tokens are checked by the same
``TokenVerifier`` as the broker's (HS256 or EdDSA/ES256 keys, the revocation list), so
revoking a person or a token id reaches the API without a restart.

Teams (docs/security.md, "Teams and project scoping"): a token proves *who* calls (``sub``)
and caps what they may do (its role is a ceiling). Their role in a project is their
membership's there, capped by the token's role; a project without any memberships keeps the
old rule, the token's role in the token's project. Each request resolves this afresh from the
store, so an invitation, a role change or a removal counts from the next request on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefl.auth.tokens import AuthConfig, AuthError, Claims, Role, TokenVerifier
from edgefl.store.base import Store

log = logging.getLogger("edgefl.security")
api_log = logging.getLogger("edgefl.api")

PROBLEM_JSON = "application/problem+json"
REALM = 'Bearer realm="edgefl"'
# people's roles, weakest first; a role may do everything the ones before it may
PEOPLE: tuple[Role, ...] = (Role.viewer, Role.operator, Role.admin)


def weaker(a: Role, b: Role) -> Role:
    """The lesser of two people's roles (a token's ceiling against a membership)."""
    return a if PEOPLE.index(a) <= PEOPLE.index(b) else b


def at_least(role: Role | None, least: Role) -> bool:
    """Whether ``role`` (None: no role) admits what needs ``least``."""
    return role is not None and PEOPLE.index(role) >= PEOPLE.index(least)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a verified token's claims, or nobody (``claims=None``, insecure mode).

    ``roles`` is the caller's effective role in each project they may see (this request's
    view of the memberships); ``None`` means every project (insecure mode).
    """

    claims: Claims | None
    roles: Mapping[str, Role] | None = field(default=None, compare=False)

    def role_in(self, project: str) -> Role | None:
        """The caller's role in ``project``, or None when it is not theirs."""
        if self.roles is None:
            return Role.admin
        return self.roles.get(project)

    def can(self, project: str, least: Role) -> bool:
        """Whether the caller holds ``least`` or more in ``project``."""
        return at_least(self.role_in(project), least)

    @property
    def projects(self) -> list[str] | None:
        """The projects the caller may see, by name; None: every one (insecure mode)."""
        return None if self.roles is None else sorted(self.roles)

    @property
    def name(self) -> str:
        """``subject (role)``: how the store and the logs name the caller."""
        if self.claims is None:
            return "anonymous (insecure mode)"
        return f"{self.claims.subject} ({self.claims.role.value})"


class ApiError(StarletteHTTPException):
    """An HTTP error with a problem ``type`` of its own (a URN; ``about:blank`` otherwise)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, detail, headers)
        self.type = type_


class ApiAuth:
    """Turns the ``Authorization`` header into a ``Principal``, or raises 401/403.

    ``auth=None`` is the explicit insecure mode: every request is let through as an
    anonymous principal, and that is logged loudly once, when the app is built.
    """

    def __init__(
        self, auth: AuthConfig | None, project: str | None, store: Store | None = None
    ) -> None:
        self.config = auth
        self.project = project
        self.store = store
        # no project check in the verifier: a member of this API's project may hold a token
        # naming another one (``resolve`` decides, with the memberships)
        self.verifier: TokenVerifier | None = auth.verifier() if auth is not None else None

    def resolve(self, claims: Claims) -> dict[str, Role]:
        """The caller's effective role per project, from the store's memberships.

        A member's role is their membership's, capped by the token's role. The token's own
        project, while it has no members at all, keeps the token's role (schema 6's rule).
        An API bound to one project keeps only that one.
        """
        roles: dict[str, Role] = {}
        if self.store is not None:
            for m in self.store.list_members(user=claims.subject):
                roles[m.project] = weaker(Role(m.role), claims.role)
        home = claims.project
        if home not in roles and (self.store is None or self.store.count_members(home) == 0):
            roles[home] = claims.role
        if self.project is not None:
            roles = {p: r for p, r in roles.items() if p == self.project}
        return roles

    def principal(self, claims: Claims) -> Principal:
        """The caller with their roles; 401 when an API bound to one project is not theirs
        (as when the verifier itself checked the project)."""
        roles = self.resolve(claims)
        if self.project is not None and not roles:
            raise self._unauthorized(
                f"token is for project {claims.project!r}, not {self.project!r}", "invalid_token"
            )
        return Principal(claims, roles)

    def require(self, least: Role) -> Callable[[Request], Principal]:
        """A FastAPI dependency admitting people holding ``least`` or a stronger role."""
        allowed = PEOPLE[PEOPLE.index(least) :]

        def dependency(request: Request) -> Principal:
            if self.verifier is None:
                return Principal(None)
            claims = self._verify(request)
            if claims.role not in allowed:  # the token's role is a ceiling
                raise forbidden(
                    f"role {claims.role.value!r} of {claims.subject!r} may not do this: it needs "
                    f"{' or '.join(r.value for r in allowed)}"
                )
            return self.principal(claims)

        return dependency

    def _verify(self, request: Request) -> Claims:
        assert self.verifier is not None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise self._unauthorized("no bearer token: send Authorization: Bearer <jwt>", None)
        if scheme.lower() != "bearer" or not token.strip():
            raise self._unauthorized(
                "the Authorization header must be 'Bearer <jwt>'", "invalid_request"
            )
        try:
            return self.verifier.verify(token.strip())
        except AuthError as exc:
            log.info("API refused a token from %s: %s", _client(request), exc)
            raise self._unauthorized(str(exc), "invalid_token") from None

    @staticmethod
    def _unauthorized(detail: str, error: str | None) -> ApiError:
        # RFC 6750: no error code when no credentials were sent at all
        challenge = REALM if error is None else f'{REALM}, error="{error}"'
        return ApiError(
            401,
            detail,
            type_="urn:edgefl:problem:unauthorized",
            headers={"WWW-Authenticate": challenge},
        )


def forbidden(detail: str) -> ApiError:
    """A 403 problem: the caller is known but their role does not allow this."""
    return ApiError(403, detail, type_="urn:edgefl:problem:forbidden")


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


def problem(
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An RFC 9457 problem document: type, title (the status phrase), status, detail."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def install_problem_handlers(app: FastAPI) -> None:
    """Every error the app answers, its own and the framework's (404, 405, 422, 500), is a
    problem document, so clients parse one shape."""

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return problem(
            exc.status_code,
            detail,
            type_=getattr(exc, "type", "about:blank"),
            headers=dict(exc.headers) if exc.headers else None,
        )

    async def on_invalid(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        where = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return problem(422, f"invalid request: {where}", errors=errors)

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        api_log.exception("%s %s failed", request.method, request.url.path)
        return problem(500, "the server failed to answer; its log says why")

    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(Exception, on_crash)
