"""The zero-setup main job: embedded broker, controller, regional combiners, a simulated
fleet on the canonical digits task, and the dashboard — all in one process, all over MQTT.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefl.auth.tokens import AuthConfig
from edgefl.controller import SessionConfig
from edgefl.deploy import Deployment
from edgefl.store.base import RoundRecord, SessionRecord
from edgefl.tasks import digits
from edgefl.telemetry import JsonLinesSink

log = logging.getLogger(__name__)

DEFAULT_LR = {"softmax": 0.1, "mlp": 0.2}


@dataclass
class DemoOptions:
    """What ``edgefl demo`` runs; the defaults are the canonical 20-device digits task."""

    devices: int = 20
    regions: int = 2
    rounds: int = 20
    model: str = "softmax"
    trainer: str = "numpy"  # numpy (reference), onnx or litert: the fleet trains a package
    aggregator: str = "fedavg"
    broker_url: str | None = None  # None: the embedded amqtt broker
    # token material for an external broker (None there: explicitly insecure); the embedded
    # broker gets a fresh HS256 secret per run when this is None
    auth: AuthConfig | str | None = None
    dashboard: bool = True
    dashboard_port: int = 8080
    workdir: Path = Path("edgefl-demo")
    round_timeout_s: float = 30.0
    project: str = "demo"


class DemoRun:
    """Runs the demo on one ``Deployment``; leaving the ``with`` block stops every part."""

    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.deployment: Deployment | None = None
        self.dashboard_url: str | None = None
        self.dashboard_login: str | None = None  # how to log in to the dashboard

    def __enter__(self) -> DemoRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.deployment is not None:
            self.deployment.close()

    def run(
        self,
        on_round: Callable[[RoundRecord, SessionRecord], None] | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Train to the end and return the run's figures (the demo's JSON line)."""
        o = self.opts
        status = on_status or (lambda _msg: None)
        t_start = time.time()
        o.workdir.mkdir(parents=True, exist_ok=True)
        dep = self.deployment = Deployment(
            o.workdir, project=o.project, broker_url=o.broker_url, auth=o.auth
        )
        if o.broker_url is None:
            status(f"embedded broker on {dep.url} (JWT auth)")
        else:
            status(f"using broker {dep.url}")
        if o.dashboard:
            self.dashboard_url, self.dashboard_login = _start_dashboard(dep, o.dashboard_port)
            status(f"dashboard at {self.dashboard_url}: {self.dashboard_login}")
        dep.start_combiners(o.regions)
        sink = dep.own(JsonLinesSink(o.workdir / "telemetry.jsonl"))
        train: dict[str, Any] = {"model": o.model, "batch_size": 32, "epochs": 1}
        if o.trainer == "numpy":
            ctl = dep.start_controller(evaluator=digits.evaluator, sink=sink)
            train["lr"] = DEFAULT_LR.get(o.model, 0.1)
            dep.start_fleet(o.devices)
            package_digest, initial = None, digits.initial_weights(o.model)
        else:
            from device_agent.trainers.package_trainer import PackageTrainer
            from edgefl.fleet.evaluation import package_evaluator
            from edgefl.tasks import digits_packages

            built = digits_packages.build_digits_package(o.trainer, o.model, o.workdir)
            r = digits_packages.recipe(o.trainer, o.model)
            train.update(lr=r.lr, epochs=r.epochs)
            evaluator = package_evaluator(built)
            ctl = dep.start_controller(evaluator=evaluator, sink=sink)
            package = ctl.add_package(built.dumps())
            status(f"package {package.manifest['name']} ({o.trainer}, {package.digest[:12]})")
            # the devices start without a model: each fetches the session's package over MQTT
            dep.start_fleet(o.devices, trainer_factory=lambda _k, X, y: PackageTrainer(X, y))
            package_digest, initial = package.digest, None
        status(f"{o.devices} devices online in {o.regions} regions")
        config = SessionConfig(
            session_id=time.strftime("demo-%Y%m%d-%H%M%S"),
            rounds=o.rounds,
            min_devices=digits.devices_with_data(o.devices),  # empty devices decline
            round_timeout_s=o.round_timeout_s,
            aggregator=o.aggregator,
            train=train,
            package=package_digest,
        )
        ctl.create_session(config, initial)
        durations: list[float] = []

        def _on_round(rec: RoundRecord, sess: SessionRecord) -> None:
            durations.append((rec.finished or time.time()) - rec.started)
            if on_round:
                on_round(rec, sess)

        t_train = time.time()
        ctl.run(config.session_id, on_round=_on_round)
        rounds = [r for r in dep.store.list_rounds(config.session_id) if r.status == "completed"]
        return {
            "final_accuracy": round(rounds[-1].metrics["accuracy"], 6),
            "final_loss": round(rounds[-1].metrics["loss"], 6),
            "rounds": len(rounds),
            "devices": o.devices,
            "regions": o.regions,
            "model": o.model,
            "trainer": o.trainer,
            "aggregator": o.aggregator,
            "broker": "embedded-amqtt" if o.broker_url is None else "external",
            "round_s_median": round(statistics.median(durations), 4),
            "train_s": round(time.time() - t_train, 3),
            "total_s": round(time.time() - t_start, 3),
            "session_id": config.session_id,
            "state": str(o.workdir / "state.db"),
        }


def _start_dashboard(dep: Deployment, port: int) -> tuple[str, str]:
    """The dashboard on the deployment's token material, and how to log in to it.

    A deployment without any (an explicitly insecure external broker) still gets an
    authenticated dashboard, on a fresh secret of its own. The demo issues an operator token
    into ``dashboard-token`` (mode 0600) in the work folder.
    """
    from edgefl.api.server import DashboardServer
    from edgefl.auth.keys import KeyDirError
    from edgefl.auth.tokens import Role, generate_secret
    from edgefl.store.blobs import FileBlobStore

    auth = dep.auth or AuthConfig(secret=generate_secret())
    blobs = FileBlobStore(dep.models_dir)
    server = DashboardServer(
        dep.store, port=port, auth=auth, project=dep.project, blobs=blobs, logs=dep.logs_dir
    )
    dep.own(server.start())
    try:
        token = auth.issuer().issue("demo-operator", Role.operator, dep.project, ttl_s=7 * 86400)
    except KeyDirError:  # a verifier-only host: its operator issues tokens elsewhere
        return server.url, "log in with a token from `edgefl token --role viewer` (project "
        f"{dep.project}) where the signing key is"
    path = dep.workdir / "dashboard-token"
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n", encoding="utf-8")
    return server.url, f"log in with the operator token in {path}"
