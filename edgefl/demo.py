"""The zero-setup main job: embedded broker, controller, regional combiners, a simulated
fleet on the canonical digits task, and the dashboard — all in one process, all over MQTT.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from edgefl.auth.tokens import Role, TokenIssuer, generate_secret
from edgefl.combiner import Combiner, CombinerConfig
from edgefl.controller import Controller, SessionConfig
from edgefl.fleet.simulate import region_names, start_fleet
from edgefl.store import make_store
from edgefl.store.base import RoundRecord, SessionRecord
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from edgefl.telemetry import JsonLinesSink

log = logging.getLogger(__name__)

DEFAULT_LR = {"softmax": 0.1, "mlp": 0.2}


@dataclass
class DemoOptions:
    devices: int = 20
    regions: int = 2
    rounds: int = 20
    model: str = "softmax"
    aggregator: str = "fedavg"
    broker_url: str | None = None  # None: the embedded amqtt broker
    dashboard: bool = True
    dashboard_port: int = 8080
    workdir: Path = Path("edgefl-demo")
    round_timeout_s: float = 30.0
    project: str = "demo"


class DemoRun:
    """Owns every component of a demo run so that they are stopped in the right order."""

    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.broker = None
        self.server = None
        self.components: list = []
        self.dashboard_url: str | None = None

    def __enter__(self) -> DemoRun:
        return self

    def __exit__(self, *exc: object) -> None:
        for comp in reversed(self.components):
            try:
                comp.stop()
            except Exception:
                log.exception("stopping %s failed", comp)
        if self.server is not None:
            self.server.stop()
        if self.broker is not None:
            self.broker.stop()

    def run(self, on_round=None, on_status=None) -> dict:  # noqa: ANN001
        o = self.opts
        status = on_status or (lambda _msg: None)
        t_start = time.time()
        o.workdir.mkdir(parents=True, exist_ok=True)
        issuer: TokenIssuer | None = None
        if o.broker_url is None:
            from edgefl.broker.embedded import EmbeddedBroker

            secret = generate_secret()  # fresh per run: every component authenticates with a JWT
            self.broker = EmbeddedBroker(secret=secret).start()
            url = self.broker.url
            issuer = TokenIssuer(secret)
            status(f"embedded broker on {url} (JWT auth)")
        else:
            url = o.broker_url
            status(f"using broker {url}")

        def creds(subject: str, role: Role, region: str | None = None) -> dict:
            if issuer is None:
                return {}
            return {
                "username": subject,
                "password": issuer.issue(subject, role, o.project, region=region),
            }

        store = make_store(f"sqlite:///{(o.workdir / 'state.db').resolve()}")
        self.components.append(store_closer(store))
        blobs = FileBlobStore(o.workdir / "models")
        if o.dashboard:
            from edgefl.api.server import DashboardServer

            self.server = DashboardServer(store, port=o.dashboard_port).start()
            self.dashboard_url = self.server.url
            status(f"dashboard at {self.server.url}")
        regions = region_names(o.regions)
        for region in regions:
            cfg = CombinerConfig(
                url,
                project=o.project,
                region=region,
                **creds(f"combiner-{region}", Role.combiner, region),
            )
            self.components.append(Combiner(cfg).start())
        sink = JsonLinesSink(o.workdir / "telemetry.jsonl")
        self.components.append(sink_closer(sink))
        ctl = Controller(
            url,
            store,
            blobs,
            project=o.project,
            evaluator=digits.evaluator,
            sink=sink,
            **creds("controller", Role.controller),
        )
        self.components.append(ctl.start())
        fleet = start_fleet(
            url,
            o.devices,
            regions,
            project=o.project,
            token_for=(lambda d, r: creds(d, Role.device, r)["password"]) if issuer else None,
        )
        self.components.append(fleet)
        status(f"{o.devices} devices online in {o.regions} regions")
        config = SessionConfig(
            session_id=time.strftime("demo-%Y%m%d-%H%M%S"),
            rounds=o.rounds,
            min_devices=o.devices,
            round_timeout_s=o.round_timeout_s,
            aggregator=o.aggregator,
            train={
                "model": o.model,
                "lr": DEFAULT_LR.get(o.model, 0.1),
                "batch_size": 32,
                "epochs": 1,
            },
        )
        ctl.create_session(config, digits.initial_weights(o.model))
        durations: list[float] = []

        def _on_round(rec: RoundRecord, sess: SessionRecord) -> None:
            durations.append((rec.finished or time.time()) - rec.started)
            if on_round:
                on_round(rec, sess)

        t_train = time.time()
        ctl.run(config.session_id, on_round=_on_round)
        rounds = [r for r in store.list_rounds(config.session_id) if r.status == "completed"]
        return {
            "final_accuracy": round(rounds[-1].metrics["accuracy"], 6),
            "final_loss": round(rounds[-1].metrics["loss"], 6),
            "rounds": len(rounds),
            "devices": o.devices,
            "regions": o.regions,
            "model": o.model,
            "aggregator": o.aggregator,
            "broker": "embedded-amqtt" if o.broker_url is None else "external",
            "round_s_median": round(statistics.median(durations), 4),
            "train_s": round(time.time() - t_train, 3),
            "total_s": round(time.time() - t_start, 3),
            "session_id": config.session_id,
            "state": str(o.workdir / "state.db"),
        }


class sink_closer:  # noqa: N801
    def __init__(self, sink: JsonLinesSink) -> None:
        self.sink = sink

    def stop(self) -> None:
        self.sink.close()


class store_closer:  # noqa: N801 - a tiny adapter so the store closes with the other parts
    def __init__(self, store) -> None:  # noqa: ANN001
        self.store = store

    def stop(self) -> None:
        self.store.close()
