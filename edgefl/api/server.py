"""Serve the API/dashboard from a background thread (for `edgefl demo` and tests)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from edgefl.store.base import Store


class DashboardServer:
    """uvicorn serving ``create_app(store)`` on a daemon thread, bound to loopback by default.

    It owns that thread, not the store. ``start`` blocks until the socket listens; ``stop``
    asks uvicorn to exit and waits up to 5 s. ``port=0`` picks a free port at ``start``.
    """

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 8080) -> None:
        from edgefl.api.app import create_app

        self.host = host
        self.port = port
        self._server = uvicorn.Server(
            uvicorn.Config(
                create_app(store),
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
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
