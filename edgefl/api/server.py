"""Serve the API/dashboard from a background thread (for `edgefl demo` and tests), and open
the state store it reads for `edgefl dashboard`."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from edgefl.store.base import BlobStore, Store

if TYPE_CHECKING:
    from edgefl.auth.tokens import AuthConfig


class StateStoreError(Exception):
    """The state store cannot be opened; the message says what was looked for and what to do."""


STATE_HINT = (
    "Run the dashboard in the folder where `edgefl controller` ran (it keeps "
    "edgefl-state/state.db there), or point it at the store: --state "
    "sqlite:///path/to/state.db (or a postgresql:// URL)"
)


def open_state(url: str) -> Store:
    """An existing state store; never creates an empty SQLite file where none was found.

    Raises ``StateStoreError`` naming the URL or path it looked at, with ``STATE_HINT``.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from edgefl.store import make_store
    from edgefl.store.sql import SchemaError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StateStoreError(f"--state {url!r} is not a database URL. {STATE_HINT}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if not path.is_file():
            raise StateStoreError(
                f"no state store at {path.resolve()} (from --state {url}). {STATE_HINT}"
            )
    try:
        return make_store(url)
    except (SQLAlchemyError, SchemaError) as exc:
        raise StateStoreError(f"cannot open the state store {url}: {exc}. {STATE_HINT}") from None


class DashboardServer:
    """uvicorn serving ``create_app(store, auth, ...)`` on a daemon thread, on loopback by default.

    The keyword arguments are ``create_app``'s (``auth`` or ``insecure=True`` is required).
    It owns that thread, not the store. ``start`` blocks until the socket listens; ``stop``
    asks uvicorn to exit and waits up to 5 s. ``port=0`` picks a free port at ``start``.
    """

    def __init__(
        self,
        store: Store,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        auth: AuthConfig | None = None,
        insecure: bool = False,
        project: str | None = None,
        blobs: BlobStore | None = None,
        logs: Path | None = None,
    ) -> None:
        from edgefl.api.app import create_app

        self.host = host
        self.port = port
        app = create_app(store, auth, insecure=insecure, project=project, blobs=blobs, logs=logs)
        self.app = app
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The dashboard page's URL (the real port once started)."""
        return f"http://{self.host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> DashboardServer:
        """Serve in the background; ``RuntimeError`` if not listening within ``timeout``."""
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
            self._server.config.port = self.port
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(
                    f"dashboard could not listen on {self.host}:{self.port}"
                    " (port in use? pick another with --dashboard-port)"
                )
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait up to 5 s for its thread; safe before ``start``."""
        live = getattr(self.app.state, "live_events", None)
        if live is not None:
            live.close()  # open event streams end first, so the exit is prompt
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
