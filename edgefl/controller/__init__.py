"""The controller: sessions, rounds, model versions; merges regional partials."""

from edgefl.controller.config import SessionConfig
from edgefl.controller.controller import Controller
from edgefl.controller.errors import SessionBusy, SessionFailed

__all__ = ["Controller", "SessionBusy", "SessionConfig", "SessionFailed"]
