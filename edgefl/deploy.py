"""One builder for a tiered deployment: broker, stores, combiners, controller, fleet, dashboard.

The demo, the CLI and the integration tests all wire their parts through ``Deployment``, so
credentials, store locations and shutdown order are decided in one place.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefl.auth.credentials import Credentials, Logins
from edgefl.auth.tokens import AuthConfig, Role, as_auth, generate_secret
from edgefl.combiner import Combiner, CombinerConfig
from edgefl.controller import Controller
from edgefl.controller.rounds import Evaluator
from edgefl.controller.telemetry_forward import RoundDetails
from edgefl.observability.logs import SessionLogWriter, session_logs_enabled
from edgefl.store import make_store
from edgefl.store.base import Store
from edgefl.store.blobs import FileBlobStore
from edgefl.telemetry import TelemetrySink, open_sink

if TYPE_CHECKING:
    from edgefl.api.server import DashboardServer
    from edgefl.fleet.simulate import Fleet, TrainerFactory

log = logging.getLogger(__name__)


def region_names(n: int) -> list[str]:
    """``region-0 .. region-{n-1}``: the simulator's and the demo's region names."""
    return [f"region-{i}" for i in range(n)]


def random_project() -> str:
    """A fresh project name: isolates deployments that share a broker (retained messages)."""
    return f"t{uuid.uuid4().hex[:10]}"


class Deployment:
    """Builds the parts of a deployment and owns them: ``close`` stops them in reverse order.

    ``broker_url=None`` starts the embedded amqtt broker (bound to ``project``) with ``auth``,
    or a fresh JWT secret without it, so every component authenticates even in a throwaway
    run. With an external broker, ``auth`` is the deployment's token material (an
    ``AuthConfig``: HS256 secret or keys; or a bare secret), or None for an explicitly
    insecure development broker. ``secret=`` is the older spelling of a bare secret.
    ``region_urls`` maps a region to its regional broker (bridged to ``broker_url``, where the
    controller connects; see ``edgefl.broker.bridge``): that region's combiner and devices
    connect there. Regions not in it use ``broker_url``.
    Not thread-safe: build from one thread, then hand the parts to whoever runs them.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        project: str = "default",
        broker_url: str | None = None,
        auth: AuthConfig | str | None = None,
        secret: str | None = None,
        state_url: str | None = None,
        models_dir: Path | str | None = None,
        region_urls: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.project = project
        self._stack = ExitStack()
        self.broker: Any = None
        if auth is not None and secret is not None:
            raise ValueError("give a Deployment auth= or secret=, not both")
        config = as_auth(auth if auth is not None else secret)
        if broker_url is None:
            from edgefl.broker.embedded import EmbeddedBroker

            config = config or AuthConfig(secret=generate_secret())
            self.broker = EmbeddedBroker(auth=config, project=project).start()
            self._stack.callback(self.broker.stop)
            broker_url = self.broker.url
        self.url: str = broker_url
        self.region_urls: dict[str, str] = dict(region_urls or {})
        self.auth: AuthConfig | None = config
        self.credentials: Logins = Credentials(config, project)
        self.state_url = state_url or f"sqlite:///{(self.workdir / 'state.db').resolve()}"
        self.models_dir = Path(models_dir) if models_dir else self.workdir / "models"
        self.logs_dir = self.workdir / "logs"  # per-session log files (SessionLogWriter)
        self.regions: list[str] = []
        self.combiners: list[Combiner] = []
        self._store: Store | None = None

    def region_url(self, region: str) -> str:
        """Where a region's combiner and devices connect: its regional broker, if it has one."""
        return self.region_urls.get(region, self.url)

    # parts -----------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The state store, opened on first use and closed with the deployment."""
        if self._store is None:
            if self.state_url.startswith("sqlite:///"):
                Path(self.state_url.removeprefix("sqlite:///")).parent.mkdir(
                    parents=True, exist_ok=True
                )
            self._store = make_store(self.state_url)
            self._stack.callback(self._store.close)
        return self._store

    def start_combiners(
        self,
        regions: int | list[str],
        pool: int = 0,
        members: list[str] | None = None,
        **config: Any,
    ) -> list[Combiner]:
        """One combiner per region (``regions`` may be a count or explicit names), or with
        ``pool`` a pool of that many members per region (``members``: their names, default
        ``combiner-{region}-{i}``)."""
        names = region_names(regions) if isinstance(regions, int) else list(regions)
        if members is not None and pool and len(members) != pool:
            raise ValueError(f"{len(members)} member names for a pool of {pool}")
        started = []
        for region in names:
            options: dict[str, Any] = {
                **self.credentials.login(f"combiner-{region}", Role.combiner, region),
                **config,
            }
            ids = (members or [f"combiner-{region}-{i}" for i in range(pool)]) if pool else [None]
            for member in ids:
                extra: dict[str, Any] = {"combiner_id": member, "pool": True} if member else {}
                cfg = CombinerConfig(
                    self.region_url(region),
                    project=self.project,
                    region=region,
                    **options,
                    **extra,
                )
                started.append(self._own(Combiner(cfg).start()))
        self.regions.extend(names)
        self.combiners.extend(started)
        return started

    def start_controller(
        self,
        *,
        evaluator: Evaluator | None = None,
        sink: TelemetrySink | None = None,
        **kwargs: Any,
    ) -> Controller:
        """The controller, connected, on this deployment's store and model folder.

        Its ``round`` telemetry points get the round's details from the store (RoundDetails).
        What this process logs about each of the project's sessions is kept in
        ``logs_dir/{session}.jsonl`` (``EDGEFL_SESSION_LOGS=off`` stops it), which the
        dashboard exports (``GET /api/sessions/{id}/logs``).
        """
        if session_logs_enabled():
            self._own(SessionLogWriter(self.logs_dir, self.project).attach())
        if sink is not None:
            sink = RoundDetails(sink, self.store)
        options: dict[str, Any] = {
            **self.credentials.login("controller", Role.controller),
            **kwargs,
        }
        ctl = Controller(
            self.url,
            self.store,
            FileBlobStore(self.models_dir),
            project=self.project,
            evaluator=evaluator,
            sink=sink,
            **options,
        )
        return self._own(ctl.start())

    def open_sink(self, url: str | Path | None) -> TelemetrySink:
        """The telemetry sink ``url`` names (``edgefl.telemetry.open_sink``: a path,
        ``jsonl://``, ``influxdb://``, ``influxdb2://``), closed (flushed) with the deployment.

        Open it before the controller: parts close in reverse, so the controller stops first.
        """
        return self._own(open_sink(url))

    def start_fleet(
        self,
        n_devices: int,
        *,
        partition_size: int | None = None,
        trainer_factory: TrainerFactory | None = None,
        device_urls: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Fleet:
        """Simulated devices on the digits partition, spread round-robin over the regions.

        A device connects to ``device_urls[region]`` if given (e.g. a regional broker's TLS
        device listener, with ``agent_options={"ca_file": ...}``), else to ``region_url``.
        """
        from edgefl.fleet.simulate import numpy_trainer, start_fleet

        if not self.regions:
            raise RuntimeError("start the combiners (and so the regions) before the fleet")
        urls = {r: self.region_url(r) for r in self.regions} | dict(device_urls or {})
        fleet = start_fleet(
            urls,
            n_devices,
            self.regions,
            project=self.project,
            credentials=self.credentials,
            partition_size=partition_size,
            trainer_factory=trainer_factory or numpy_trainer,
            **kwargs,
        )
        return self._own(fleet)
        fleet = start_fleet(
            self.url,
            n_devices,
            self.regions,
            project=self.project,
            credentials=self.credentials,
            partition_size=partition_size,
            trainer_factory=trainer_factory or numpy_trainer,
            **kwargs,
        )
        return self._own(fleet)

    def start_dashboard(self, port: int = 8080, host: str = "127.0.0.1") -> DashboardServer:
        from edgefl.api.server import DashboardServer

        server = DashboardServer(
            self.store,
            host=host,
            port=port,
            auth=self.auth,
            insecure=self.auth is None,  # only where the deployment itself is insecure
            project=self.project,
            logs=self.logs_dir,
        )
        return self._own(server.start())

    def own(self, part: Any) -> Any:
        """Stop ``part`` (anything with ``stop()`` or ``close()``) when the deployment closes."""
        return self._own(part)

    def _own(self, part: Any) -> Any:
        stop = getattr(part, "stop", None) or part.close
        self._stack.callback(_quietly, stop, part)
        return part

    # lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quietly(stop: Any, part: Any) -> None:
    try:
        stop()
    except Exception:
        log.exception("stopping %r failed", part)
