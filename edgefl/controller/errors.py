"""Why a session cannot run: raised by the controller, caught by the CLI and callers."""

from __future__ import annotations


class SessionFailed(RuntimeError):
    """A session that cannot go on (no quorum after all attempts, stopped, ...)."""


class SessionBusy(SessionFailed):
    """Another controller holds the session's lease: one session, one controller."""
