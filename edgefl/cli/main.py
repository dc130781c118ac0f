"""`edgefl`: operate brokers, combiners, the controller, simulated fleets and the demo."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgefl.cli.aggregators import AggregatorParam, aggregators, config_error, parse_params
from edgefl.cli.bridge import bridge_config
from edgefl.cli.ca import ca_app
from edgefl.cli.common import err_console, require_auth, setup_logging
from edgefl.cli.db import db_app
from edgefl.cli.fleet import fleet_app
from edgefl.cli.keys import keys_app
from edgefl.cli.ops import register as register_ops
from edgefl.cli.package import package_app

if TYPE_CHECKING:
    from edgefl.auth.credentials import Logins
    from edgefl.controller import Controller
    from edgefl.store.base import SessionRecord

app = typer.Typer(
    help="edgefl: federated learning for IoT fleets over MQTT.",
    no_args_is_help=True,
    add_completion=False,
)

LogLevel = typer.Option("warning", "--log-level", help="debug, info, warning or error")


@app.callback()
def _observability(
    log_format: str = typer.Option(
        None, "--log-format", help="text or json: JSON lines with session/round/device ids"
    ),
    tracing: str = typer.Option(
        None, "--tracing", help="none, console or otlp (OTEL_EXPORTER_OTLP_ENDPOINT)"
    ),
    ca_cert: Path = typer.Option(
        None,
        "--ca-cert",
        help="mqtts:// brokers: verify the broker against this CA (e.g. `edgefl ca`'s) "
        "instead of the system's; sets EDGEFL_CA_CERT",
    ),
    client_cert: Path = typer.Option(
        None, "--client-cert", help="mqtts:// brokers: a client certificate for mutual TLS"
    ),
    client_key: Path = typer.Option(None, "--client-key", help="its private key"),
) -> None:
    """Options before the command: they set EDGEFL_LOG_FORMAT and EDGEFL_TRACING
    (docs/observability.md), and the TLS files every MQTT connection of the command uses
    (EDGEFL_CA_CERT, EDGEFL_CLIENT_CERT, EDGEFL_CLIENT_KEY; docs/security.md)."""
    from edgefl.cli.common import set_observability, set_tls_files

    set_observability(log_format, tracing)
    set_tls_files(ca_cert, client_cert, client_key)


def _wait_for_signal() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


@app.command()
def demo(
    devices: int = typer.Option(20, min=1, help="simulated devices"),
    regions: int = typer.Option(2, min=1, help="regions, one combiner each"),
    rounds: int = typer.Option(20, min=1, help="federated rounds"),
    model: str = typer.Option("softmax", help="softmax (regression), mlp, or cnn (onnx only)"),
    trainer: str = typer.Option(
        "numpy",
        help="numpy (built-in reference), onnx or litert: devices train an exported model "
        "package fetched over MQTT",
    ),
    aggregator: str = typer.Option("fedavg", help="see `edgefl aggregators`"),
    broker: str = typer.Option(
        None,
        help="broker URL (mqtt://host:port); default: embedded (with a fresh JWT secret). An "
        "external broker needs EDGEFL_JWT_KEYS or EDGEFL_JWT_SECRET, or --insecure",
    ),
    insecure: bool = typer.Option(
        False, help="with --broker: connect without tokens (development only)"
    ),
    dashboard: bool = typer.Option(True, help="serve the dashboard while training"),
    dashboard_port: int = typer.Option(8080, help="dashboard port on 127.0.0.1"),
    serve_after: bool = typer.Option(
        None,
        help="keep the dashboard up after training until Ctrl-C (default: when run in a terminal)",
    ),
    workdir: Path = typer.Option(Path("edgefl-demo"), help="where state and models are kept"),
    log_level: str = LogLevel,
) -> None:
    """Train the digits task on a simulated fleet, end to end over MQTT; print one JSON line."""
    from edgefl.demo import DemoOptions, DemoRun

    setup_logging(log_level)
    # the embedded broker gets a fresh secret per run; an external one needs real material
    auth = require_auth(insecure) if broker is not None else None
    if trainer not in ("numpy", "onnx", "litert"):
        raise typer.BadParameter("trainer must be numpy, onnx or litert")
    if trainer == "numpy" and model not in ("softmax", "mlp"):
        raise typer.BadParameter("the numpy trainer has softmax and mlp; cnn needs --trainer onnx")
    if trainer != "numpy":
        from edgefl.tasks.digits_packages import recipe

        try:
            recipe(trainer, model)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    opts = DemoOptions(
        devices=devices,
        regions=regions,
        rounds=rounds,
        model=model,
        trainer=trainer,
        aggregator=aggregator,
        broker_url=broker,
        auth=auth,
        dashboard=dashboard,
        dashboard_port=dashboard_port,
        workdir=workdir,
    )
    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    with DemoRun(opts) as run, progress:
        task = progress.add_task("rounds", total=rounds, info="starting")

        def on_round(rec, _sess) -> None:  # noqa: ANN001
            acc = rec.metrics.get("accuracy", float("nan"))
            progress.update(
                task,
                completed=rec.round,
                info=f"round {rec.round}: accuracy {acc:.4f}, "
                f"{(rec.finished or 0) - rec.started:.3f}s",
            )

        def on_status(message: str) -> None:
            if message.startswith("dashboard"):  # how to log in must outlive the status line
                progress.console.print(message)
            progress.update(task, info=message)

        result = run.run(on_round=on_round, on_status=on_status)
        progress.stop()
        if run.dashboard_url:
            result["dashboard"] = run.dashboard_url
        print(json.dumps(result), flush=True)
        linger = sys.stdout.isatty() if serve_after is None else serve_after
        if run.dashboard_url and linger:
            err_console.print(
                f"dashboard still at {run.dashboard_url} ({run.dashboard_login}) — Ctrl-C to quit"
            )
            _wait_for_signal()


LoginsOption: Path = typer.Option(
    None,
    "--logins",
    exists=True,
    file_okay=False,
    help="use provisioned server logins (edgefl fleet provision's DIR): Mosquitto compares "
    "passwords, so it needs these rather than fresh tokens",
)


def _provisioned(folder: Path) -> Logins:
    from edgefl.auth.credentials import ProvisionedLogins

    try:
        return ProvisionedLogins(folder)
    except FileNotFoundError as exc:
        raise typer.BadParameter(f"--logins: {exc}") from None


@app.command()
def broker(
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(1883, help="listen port"),
    insecure: bool = typer.Option(False, help="allow anonymous clients (development only)"),
    project: str = typer.Option(None, help="accept only this project's tokens (default: any)"),
    sweep: float = typer.Option(
        2.0, min=0.1, help="seconds between re-checks of live connections' tokens"
    ),
    log_level: str = LogLevel,
) -> None:
    """Run the embedded amqtt broker (JWTs from EDGEFL_JWT_KEYS or EDGEFL_JWT_SECRET).

    Live connections are re-checked every --sweep seconds: a revoked (EDGEFL_REVOCATIONS,
    edgefl fleet revoke) or expired token is disconnected within that, plus 1 s.
    """
    from edgefl.broker.embedded import EmbeddedBroker

    setup_logging(log_level)
    auth = require_auth(insecure)
    with EmbeddedBroker(
        host, port, auth=auth, allow_anonymous=auth is None, project=project, sweep_s=sweep
    ) as b:
        err_console.print(f"broker listening on {b.url}")
        _wait_for_signal()
        err_console.print(f"broker stats: {json.dumps(b.stats())}")


@app.command()
def combiner(
    region: str = typer.Option(..., help="the region this combiner serves"),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", help="broker URL"),
    project: str = typer.Option("default", help="project name"),
    insecure: bool = typer.Option(False, help="connect without a token (development only)"),
    logins: Path = LoginsOption,
    log_level: str = typer.Option("info", "--log-level"),
    pool_member: str = typer.Option(
        None,
        help="join the region's combiner pool under this name (unique per region); without "
        "it, this is the region's only combiner",
    ),
    max_held_updates: int = typer.Option(
        1000, min=1, help="robust aggregators: updates held per round (docs/algorithms.md)"
    ),
    max_held_mb: int = typer.Option(1024, min=1, help="robust aggregators: MiB held per round"),
) -> None:
    """Run a regional combiner (or one member of its pool) until interrupted."""
    from edgefl.deploy import Deployment

    setup_logging(log_level, "edgefl-combiner")
    auth = None if logins else require_auth(insecure)
    with Deployment(Path("."), project=project, broker_url=broker, auth=auth) as dep:
        if logins:
            dep.credentials = _provisioned(logins)
        held: dict[str, Any] = {
            "max_held_updates": max_held_updates,
            "max_held_bytes": max_held_mb << 20,
        }
        if pool_member:
            dep.start_combiners([region], pool=1, members=[pool_member], **held)
        else:
            dep.start_combiners([region], **held)
        _wait_for_signal()


@app.command()
def simulate(
    devices: int = typer.Option(10, min=1, help="virtual devices, each with its own connection"),
    regions: int = typer.Option(1, min=1, help="devices are spread round-robin over regions"),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", help="broker URL"),
    project: str = typer.Option("default", help="project name"),
    insecure: bool = typer.Option(False, help="connect without tokens (development only)"),
    log_level: str = LogLevel,
) -> None:
    """Run N simulated devices on the digits partition until interrupted.

    Device k (0-based) is named dev-0000, dev-0001, ... (more digits past
    9999), lives in region-(k mod R) of region-0 .. region-(R-1) and uses
    seed index k. It trains on part k of the canonical digits partition for
    N devices: Dirichlet(0.5) over the labels with seed 42, on the train
    split standardised with its own mean and deviation (docs/digits.md).
    A device whose part is empty declines its tasks. Each device has its
    own MQTT connection.
    """
    from edgefl.auth.credentials import Credentials
    from edgefl.deploy import region_names
    from edgefl.fleet.simulate import start_fleet

    setup_logging(log_level)
    auth = require_auth(insecure)
    fleet = start_fleet(
        broker,
        devices,
        region_names(regions),
        project=project,
        credentials=Credentials(auth, project),
    )
    err_console.print(f"{devices} devices connected to {broker}")
    try:
        _wait_for_signal()
    finally:
        err_console.print(f"stopping; {fleet.completed_tasks} tasks completed")
        fleet.stop()


@app.command()
def controller(
    broker: str = typer.Option("mqtt://127.0.0.1:1883", help="broker URL"),
    project: str = typer.Option("default", help="project name"),
    state: str = typer.Option("sqlite:///edgefl-state/state.db", help="state store URL"),
    models: Path = typer.Option(Path("edgefl-state/models"), help="model blob folder"),
    resume: str = typer.Option(None, help="resume this session id instead of creating one"),
    retry: bool = typer.Option(
        False, help="with --resume: run a failed session again, with a fresh attempt budget"
    ),
    lease_ttl: float = typer.Option(
        10.0, min=1.0, help="seconds a crashed controller's hold on the session outlives it"
    ),
    serve: bool = typer.Option(
        False,
        "--serve",
        help="run as a service until interrupted: run the sessions queued through the REST API "
        "(edgefl session create/start/resume), one at a time, and take over those whose "
        "controller died; the session options below are then ignored",
    ),
    poll: float = typer.Option(1.0, min=0.1, help="with --serve: seconds between looks for work"),
    session_id: str = typer.Option(None, help="id for a new session"),
    rounds: int = typer.Option(10, min=1),
    min_devices: int = typer.Option(1, min=1),
    max_devices: int = typer.Option(None, min=1),
    round_timeout: float = typer.Option(60.0, help="seconds"),
    buffer_size: int = typer.Option(None, min=1),
    aggregator: str = typer.Option("fedavg", help="see `edgefl aggregators`"),
    aggregator_param: list[str] = AggregatorParam,
    model: str = typer.Option("softmax", help="digits task model: softmax or mlp"),
    package: Path = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="a model package (edgefl package build): devices train it; metrics come from them",
    ),
    lr: float = typer.Option(0.1, help="devices' learning rate"),
    epochs: int = typer.Option(1, min=1, help="local epochs per round"),
    batch_size: int = typer.Option(32, min=1, help="local minibatch size"),
    compression: str = typer.Option(
        "none", help="none, float32, float16, int8 or topk (docs/compression-and-privacy.md)"
    ),
    topk_fraction: float = typer.Option(0.1, help="share of entries top-k sends"),
    dp_clip_norm: float = typer.Option(None, help="turn DP on: clip each update's delta"),
    dp_epsilon: float = typer.Option(None, help="DP: calibrate noise to this epsilon"),
    dp_noise_multiplier: float = typer.Option(None, help="DP: or set the noise multiplier"),
    async_buffer: int = typer.Option(
        None, min=1, help="FedBuff (async session): a model version every K updates"
    ),
    max_staleness: int = typer.Option(4, min=0, help="FedBuff: refuse updates older than this"),
    staleness_exponent: float = typer.Option(0.5, min=0, help="FedBuff: s(tau)=(1+tau)^-a"),
    fleet: Path = typer.Option(
        None,
        "--fleet",
        exists=True,
        file_okay=False,
        help="the provisioning output dir (edgefl fleet provision): device statuses count only "
        "under their registered region; revocations apply without a restart",
    ),
    telemetry: str = typer.Option(
        None,
        "--telemetry",
        help="telemetry sink: a path or jsonl://PATH (default: telemetry.jsonl beside the "
        "models folder), influxdb://host:8086/DB (InfluxDB 1.x) or influxdb2://host:8086/BUCKET "
        "(2.x/3.x; token from EDGEFL_INFLUX_TOKEN); see docs/telemetry.md",
    ),
    insecure: bool = typer.Option(False, help="connect without a token (development only)"),
    logins: Path = LoginsOption,
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Create (or resume) a session and run it to the end; or, with --serve, run queued ones.

    With --package, devices train that exported model; without, the built-in digits model
    (and the controller evaluates it on the digits test split).
    """
    from edgefl.controller import SessionConfig, SessionFailed
    from edgefl.controller.async_rounds import async_options
    from edgefl.controller.config import check_aggregator
    from edgefl.deploy import Deployment
    from edgefl.tasks import digits

    setup_logging(log_level, "edgefl-controller")
    agg_params = parse_params(aggregator_param)
    if resume is None and not serve:  # a bad parameter is a usage error, before any connect
        try:
            check_aggregator(aggregator, agg_params, {})
        except ValueError as exc:
            raise typer.BadParameter(config_error(exc)) from None
    auth = None if logins else require_auth(insecure)
    with Deployment(
        models.parent,
        project=project,
        broker_url=broker,
        auth=auth,
        state_url=state,
        models_dir=models,
    ) as dep:
        if logins:
            dep.credentials = _provisioned(logins)
        resumed = dep.store.get_session(resume) if resume else None
        with_package = package is not None or bool(resumed and resumed.config.get("package"))
        registry = None
        if fleet is not None:
            from edgefl.controller.registry import FleetRegistry

            try:
                registry = FleetRegistry(fleet)
            except (OSError, ValueError) as exc:
                raise typer.BadParameter(f"--fleet {fleet}: {exc}") from None
        try:  # opened before the controller, so it is flushed after the controller stops
            sink = dep.open_sink(telemetry or models.parent / "telemetry.jsonl")
        except ValueError as exc:
            raise typer.BadParameter(f"--telemetry: {exc}") from None
        ctl = dep.start_controller(
            sink=sink,
            evaluator=None if with_package else digits.evaluator,
            lease_ttl_s=lease_ttl,
            registry=registry,
        )
        if serve:
            _serve(ctl, poll)
            return
        if resume is None:
            kwargs = {"session_id": session_id} if session_id else {}
            digest = None
            if package is not None:
                try:
                    digest = ctl.add_package(package.read_bytes()).digest
                except ValueError as exc:
                    raise typer.BadParameter(f"{package}: {exc}") from None
            try:
                cfg = SessionConfig(
                    rounds=rounds,
                    min_devices=min_devices,
                    max_devices=max_devices,
                    round_timeout_s=round_timeout,
                    buffer_size=buffer_size,
                    aggregator=aggregator,
                    aggregator_params=agg_params,
                    train={"model": model, "lr": lr, "batch_size": batch_size, "epochs": epochs},
                    package=digest,
                    compression=compression,
                    topk_fraction=topk_fraction,
                    dp=None
                    if dp_clip_norm is None
                    else {
                        "clip_norm": dp_clip_norm,
                        "target_epsilon": dp_epsilon,
                        "noise_multiplier": dp_noise_multiplier,
                    },
                    **async_options(async_buffer, max_staleness, staleness_exponent),
                    **kwargs,
                )
            except ValueError as exc:  # pydantic's ValidationError: name the bad setting
                raise typer.BadParameter(config_error(exc)) from None
            ctl.create_session(cfg, None if digest else digits.initial_weights(model))
            resume = cfg.session_id
        try:
            sess = ctl.run(
                resume,
                on_round=lambda rec, _s: err_console.print(
                    f"round {rec.round}: "
                    f"{json.dumps({k: round(v, 4) for k, v in rec.metrics.items()})}"
                ),
                retry_failed=retry,
            )
        except SessionFailed as exc:
            err_console.print(f"[red]edgefl controller: {exc}")
            raise typer.Exit(1) from None
        print(
            json.dumps(
                {
                    "session_id": sess.session_id,
                    "status": sess.status,
                    "rounds": sess.current_round,
                    "model_version": sess.model_version,
                }
            )
        )


def _serve(ctl: Controller, poll: float) -> None:
    """``edgefl controller --serve``: run queued sessions until SIGINT/SIGTERM."""
    from edgefl.controller.service import ControllerService
    from edgefl.tasks import digits

    def on_session(sess: SessionRecord) -> None:
        print(
            json.dumps(
                {
                    "session_id": sess.session_id,
                    "status": sess.status,
                    "rounds": sess.current_round,
                    "model_version": sess.model_version,
                    "reason": sess.reason,
                }
            ),
            flush=True,
        )

    service = ControllerService(
        ctl,
        poll_s=poll,
        evaluator_for=lambda cfg: None if cfg.package else digits.evaluator,
        on_round=lambda rec, s: err_console.print(
            f"{s.session_id} round {rec.round}: "
            f"{json.dumps({k: round(v, 4) for k, v in rec.metrics.items()})}"
        ),
        on_session=on_session,
    )
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    err_console.print(
        f"controller serving project {ctl.project}: runs sessions queued through the REST API "
        "(Ctrl-C to stop)"
    )
    service.serve()


@app.command()
def dashboard(
    state: str = typer.Option(
        "sqlite:///edgefl-state/state.db", help="state store URL (where the controller ran)"
    ),
    models: Path = typer.Option(
        Path("edgefl-state/models"), help="model blob folder, for model downloads (optional)"
    ),
    project: str = typer.Option(
        None,
        help="serve only this project (its sessions, its tokens); by default every project, "
        "each caller seeing only the projects they belong to (docs/security.md 4a)",
    ),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(8080),
    insecure: bool = typer.Option(False, help="serve without authentication (development only)"),
    telemetry: str = typer.Option(
        None,
        "--telemetry",
        envvar="EDGEFL_TELEMETRY",
        help="InfluxDB 1.x the controller's --telemetry writes (influxdb://host:8086/DB): "
        "GET /api/telemetry then answers history queries from it; default: each device's "
        "last point from the state store",
    ),
    log_level: str = LogLevel,
) -> None:
    """Serve the REST API and dashboard for a state store (JWT bearer auth, as the broker).

    Log in on the page with a token: edgefl token --subject you --role viewer (or operator,
    to stop sessions; admin, to revoke devices).
    """
    import uvicorn

    from edgefl.api.app import create_app
    from edgefl.api.server import StateStoreError, open_state

    setup_logging(log_level)
    auth = require_auth(insecure)
    try:
        store = open_state(state)
    except StateStoreError as exc:
        err_console.print(f"edgefl dashboard: {exc}")
        raise typer.Exit(2) from None
    blobs = None
    if models.is_dir():
        from edgefl.store.blobs import FileBlobStore

        blobs = FileBlobStore(models)
    else:
        err_console.print(f"no model folder at {models}: model downloads answer 404 (--models)")
    app_ = create_app(
        store, auth, insecure=insecure, project=project, blobs=blobs, logs=models.parent / "logs"
    )
    if telemetry:
        from edgefl.api.routes.telemetry import use_history
        from edgefl.telemetry import open_history

        try:
            history = open_history(telemetry)
        except ValueError as exc:
            store.close()
            raise typer.BadParameter(str(exc), param_hint="--telemetry") from None
        use_history(app_, history)
        err_console.print(f"telemetry history from InfluxDB {history.describe()}")
    err_console.print(f"dashboard at http://{host}:{port}/ (project {project})")
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        store.close()


@app.command("token")
def token(
    subject: str = typer.Option(..., help="device id, combiner name or user"),
    role: str = typer.Option(..., help="admin, operator, viewer, device, combiner, controller"),
    project: str = typer.Option("default"),
    region: str = typer.Option(None, help="required for devices; optional for combiners"),
    ttl: int = typer.Option(86400, help="lifetime in seconds"),
) -> None:
    """Issue a JWT signed with the active key of EDGEFL_JWT_KEYS, or with EDGEFL_JWT_SECRET."""
    from edgefl.auth.credentials import Credentials
    from edgefl.auth.keys import KeyDirError
    from edgefl.protocol.topics import TopicError

    try:
        issued = Credentials(require_auth(False), project, ttl_s=ttl).token(subject, role, region)
    except (KeyDirError, TopicError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    print(issued)


app.add_typer(package_app, name="package")
app.add_typer(fleet_app, name="fleet")
app.add_typer(ca_app, name="ca")
app.command("bridge-config")(bridge_config)
app.command("aggregators")(aggregators)
app.add_typer(keys_app, name="keys")
register_ops(app)  # session list|show|stop|watch, rounds, models (over the REST API)
app.add_typer(db_app, name="db")


if __name__ == "__main__":
    app()
