"""Identities and permissions: JWTs with roles, and topic ACLs derived from the topic tree."""

from __future__ import annotations

from edgefl.auth.acl import allowed
from edgefl.auth.tokens import AuthError, Claims, Role, TokenIssuer, TokenVerifier, generate_secret

__all__ = [
    "AuthError",
    "Claims",
    "Role",
    "TokenIssuer",
    "TokenVerifier",
    "allowed",
    "generate_secret",
]
