"""A serving deployment for API tests: combiners, a simulated fleet, a controller service
running queued sessions, and the REST API in front of them (real broker, real uvicorn)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edgefl.api.server import DashboardServer
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.controller.service import ControllerService
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from tests.harness import Deployment


@dataclass
class Fleet:
    url: str
    auth: AuthConfig
    dep: Deployment
    service: ControllerService

    def token(self, role: Role) -> str:
        return self.auth.issuer().issue("ops", role, self.dep.project)

    def http(self, role: Role = Role.viewer) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token(role)}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@contextmanager
def serving_fleet(broker_url: str, root: Path, devices: int, regions: int) -> Iterator[Fleet]:
    """Everything up and the fleet online; torn down in reverse on exit."""
    auth = AuthConfig(secret=generate_secret())
    dep = Deployment(broker_url, root)
    try:
        dep.start_combiners(regions)
        dep.start_fleet(devices)
        ctl = dep.controller()
        wait_for("the fleet online", lambda: len(ctl.presence.eligible()) >= devices, 20)
        service = ControllerService(
            ctl,
            poll_s=0.2,
            evaluator_for=lambda cfg: None if cfg.package else digits.evaluator,
        ).start()
        dep.own(service)
        server = DashboardServer(
            dep.store, port=0, auth=auth, project=dep.project, blobs=FileBlobStore(dep.models_dir)
        ).start()
        dep.own(server)
        yield Fleet(server.url.rstrip("/"), auth, dep, service)
    finally:
        dep.close()
