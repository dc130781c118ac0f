"""Bearer-token (JWT) authorisation for the REST API, and its RFC 9457 problem responses.

People hold ``viewer`` < ``operator`` < ``admin``; a route names the least role it needs.
Service identities (device, combiner, controller) are for MQTT only and get 403 on every
route: a stolen device token must not read a fleet's sessions. Tokens are checked by the same
``TokenVerifier`` as the broker's (HS256 or EdDSA/ES256 keys, the revocation list, the
project), so revoking a person or a token id reaches the API without a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefl.auth.tokens import AuthConfig, AuthError, Claims, Role, TokenVerifier

log = logging.getLogger("edgefl.security")
api_log = logging.getLogger("edgefl.api")

PROBLEM_JSON = "application/problem+json"
REALM = 'Bearer realm="edgefl"'
# people's roles, weakest first; a role may do everything the ones before it may
PEOPLE: tuple[Role, ...] = (Role.viewer, Role.operator, Role.admin)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a verified token's claims, or nobody (``claims=None``, insecure mode)."""

    claims: Claims | None

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

    def __init__(self, auth: AuthConfig | None, project: str | None) -> None:
        self.config = auth
        self.project = project
        self.verifier: TokenVerifier | None = (
            auth.verifier(project=project) if auth is not None else None
        )

    def require(self, least: Role) -> Callable[[Request], Principal]:
        """A FastAPI dependency admitting people holding ``least`` or a stronger role."""
        allowed = PEOPLE[PEOPLE.index(least) :]

        def dependency(request: Request) -> Principal:
            if self.verifier is None:
                return Principal(None)
            claims = self._verify(request)
            if claims.role not in allowed:
                raise ApiError(
                    403,
                    f"role {claims.role.value!r} of {claims.subject!r} may not do this: it needs "
                    f"{' or '.join(r.value for r in allowed)}",
                    type_="urn:edgefl:problem:forbidden",
                )
            return Principal(claims)

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
