"""Operator commands over the REST API (``edgefl.client``): sessions, rounds, models.

They talk to an ``edgefl dashboard`` (or demo) server, never to the store or the broker, so
they work from any workstation that can reach the API: ``--api URL`` (``EDGEFL_API``) and
``--token JWT`` (``EDGEFL_TOKEN``, from ``edgefl token``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefl.api.schemas import Member
from edgefl.cli.aggregators import AggregatorParam, config_error, parse_params
from edgefl.client import TERMINAL, APIClient, ClientError


def _console(stderr: bool = False) -> Console:
    """A console made when the command runs, so it sizes itself to the terminal it has then."""
    return Console(stderr=stderr)


session_app = typer.Typer(
    help="Create, start, stop, resume, list and watch sessions through the REST API.",
    no_args_is_help=True,
)

ApiUrl = typer.Option(
    "http://127.0.0.1:8080", "--api", envvar="EDGEFL_API", help="the edgefl API server's URL"
)
Token = typer.Option(
    None,
    "--token",
    envvar="EDGEFL_TOKEN",
    help="bearer JWT (edgefl token --role viewer|operator); none for an --insecure server",
)


@contextmanager
def _client(api: str, token: str | None) -> Iterator[APIClient]:
    """A client whose errors end the command with the problem's detail, not a traceback."""
    try:
        with APIClient(api, token) as client:
            yield client
    except ClientError as exc:
        _console(stderr=True).print(f"[red]edgefl: {exc}")
        raise typer.Exit(1) from None


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


@session_app.command("list")
def list_sessions(
    limit: int = typer.Option(20, min=1, max=1000, help="sessions per page"),
    offset: int = typer.Option(0, min=0, help="sessions to skip (newest first)"),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """The sessions, newest first, with their progress."""
    console = _console()
    with _client(api, token) as client:
        page = client.sessions(limit=limit, offset=offset)
    table = Table(title=f"sessions {offset + 1}-{offset + len(page.items)} of {page.total}")
    for col in ("session", "project", "status", "round", "aggregator", "model", "updated"):
        table.add_column(col)
    for s in page.items:
        table.add_row(
            s.session_id,
            s.project,
            s.status,
            f"{s.current_round}/{s.rounds or '?'}",
            s.aggregator or "-",
            s.model_version,
            _when(s.updated),
        )
    console.print(table)
    if page.next_offset is not None:
        console.print(f"more: --offset {page.next_offset}")


@session_app.command("show")
def show_session(session_id: str, api: str = ApiUrl, token: str | None = Token) -> None:
    """One session: its state, why it stopped or failed, and its configuration."""
    console = _console()
    with _client(api, token) as client:
        s = client.session(session_id)
    table = Table(show_header=False, title=f"session {s.session_id}")
    for key, value in (
        ("project", s.project),
        ("status", s.status),
        ("round", f"{s.current_round}/{s.rounds or '?'}"),
        ("model", s.model_version),
        ("reason", s.reason or "-"),
        ("stop requested by", s.stop_requested_by or "-"),
        ("created", _when(s.created)),
        ("updated", _when(s.updated)),
        ("config", json.dumps(s.config, sort_keys=True)),
    ):
        table.add_row(key, value)
    console.print(table)


@session_app.command("create")
def create_session(
    rounds: int = typer.Option(10, min=1, help="successful rounds to run"),
    min_devices: int = typer.Option(1, min=1, help="accepted updates a round needs"),
    max_devices: int = typer.Option(None, min=1, help="cap on devices per round"),
    round_timeout: float = typer.Option(60.0, min=0.1, help="seconds a round waits for updates"),
    aggregator: str = typer.Option("fedavg", help="see `edgefl aggregators`"),
    aggregator_param: list[str] = AggregatorParam,
    model: str = typer.Option(
        None,
        help="softmax or mlp (built-in digits), or an uploaded package's SHA-256 (default: "
        "softmax, or with --initial-model the model that version was trained as)",
    ),
    initial_model: str = typer.Option(
        None,
        "--initial-model",
        help="start from a stored version: 'active' (the project's active model, see "
        "edgefl models activate) or a version id; default: the model's initial weights",
    ),
    lr: float = typer.Option(0.1, help="devices' learning rate"),
    epochs: int = typer.Option(1, min=1, help="local epochs per round"),
    batch_size: int = typer.Option(32, min=1, help="local minibatch size"),
    session_id: str = typer.Option(None, "--id", help="the session id (default: by date)"),
    start: bool = typer.Option(False, "--start", help="queue it at once"),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """Create a session (operator); a serving controller runs it once started."""
    from edgefl.api.schemas import SessionCreate, TrainParams

    console = _console()
    try:
        spec = SessionCreate(
            session_id=session_id,
            model=model,
            initial_model=initial_model,
            rounds=rounds,
            min_devices=min_devices,
            max_devices=max_devices,
            round_timeout_s=round_timeout,
            aggregator=aggregator,
            aggregator_params=parse_params(aggregator_param),
            train=TrainParams(lr=lr, epochs=epochs, batch_size=batch_size),
        )
    except ValueError as exc:
        raise typer.BadParameter(config_error(exc)) from None
    with _client(api, token) as client:
        sess = client.create_session(spec)
        console.print(f"session {sess.session_id} created ({sess.rounds} rounds)")
        if initial_model:
            console.print(f"starting from {initial_model}: round 0 is {sess.model_version}")
        if start:
            queued = client.start_session(sess.session_id)
            console.print(f"session {queued.session_id} {queued.status}")
    print(sess.session_id)


@session_app.command("start")
def start_session(session_id: str, api: str = ApiUrl, token: str | None = Token) -> None:
    """Queue a created session (operator): a serving controller runs it next."""
    with _client(api, token) as client:
        sess = client.start_session(session_id)
    _console().print(f"session {sess.session_id} {sess.status}")


@session_app.command("resume")
def resume_session(session_id: str, api: str = ApiUrl, token: str | None = Token) -> None:
    """Queue a failed or stopped session again (operator), with a fresh attempt budget."""
    with _client(api, token) as client:
        sess = client.resume_session(session_id)
    _console().print(f"session {sess.session_id} {sess.status} after round {sess.current_round}")


@session_app.command("stop")
def stop_session(session_id: str, api: str = ApiUrl, token: str | None = Token) -> None:
    """Ask the session's controller to stop it (operator). It stays resumable."""
    console = _console()
    with _client(api, token) as client:
        res = client.stop_session(session_id)
    console.print(f"stop of {res.session_id} requested by {res.stop_requested_by}")


@session_app.command("logs")
def session_logs(
    session_id: str,
    round_: int = typer.Option(None, "--round", min=0, help="only this round's lines"),
    level: str = typer.Option(None, help="only lines at this level or above (e.g. warning)"),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """Print the session's log lines as the controller kept them (JSON, one a line)."""
    with _client(api, token) as client:
        records = client.session_logs(session_id, round_, level)
    for rec in records:
        print(json.dumps(rec, ensure_ascii=False))


@session_app.command("watch")
def watch_session(
    session_id: str,
    interval: float = typer.Option(1.0, min=0.1, help="seconds between polls of the API"),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """Follow a session live: a progress bar and each round's metrics, until it ends.

    Exits 0 when the session completes, 1 when it failed or was stopped.
    """
    console = _console()
    printed: set[str] = set()
    with _client(api, token) as client:
        sess = client.session(session_id)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            bar = progress.add_task(
                session_id, total=sess.rounds or None, completed=sess.current_round, status=""
            )
            while True:
                for r in client.all_rounds(session_id):
                    if r.status == "running" or r.task_id in printed:
                        continue
                    printed.add(r.task_id)
                    outcome = _metrics(r.metrics) if r.status == "completed" else r.reason
                    progress.console.print(  # one line per round: grep-able in logs
                        f"round {r.round} (attempt {r.attempt}) {r.status}: "
                        f"{r.participants}/{r.selected} devices, {outcome}",
                        soft_wrap=True,
                    )
                progress.update(
                    bar,
                    completed=sess.current_round,
                    status=f"{sess.status} round {sess.current_round}/{sess.rounds or '?'}",
                )
                if sess.status in TERMINAL:
                    break
                time.sleep(interval)
                sess = client.session(session_id)
        done = [r for r in client.all_rounds(session_id) if r.status == "completed"]
    final = _metrics(done[-1].metrics) if done else "no completed round"
    console.print(
        f"session {session_id} {sess.status} after round {sess.current_round}: final {final}",
        soft_wrap=True,
    )
    if sess.reason:
        console.print(f"reason: {sess.reason}")
    if sess.status != "completed":
        raise typer.Exit(1)


def rounds(
    session_id: str,
    round_: int = typer.Option(
        None, "--round", min=1, help="one round: its participants and rejections"
    ),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """A session's rounds with their metrics, or one round's devices (--round N)."""
    console = _console()
    with _client(api, token) as client:
        if round_ is None:
            attempts = client.all_rounds(session_id)
        else:
            detail = client.round(session_id, round_)
    if round_ is None:
        table = Table(title=f"rounds of {session_id}")
        for col in ("round", "try", "status", "devices", "rejected", "secs", "metrics / reason"):
            table.add_column(col)
        for r in attempts:
            table.add_row(
                str(r.round),
                str(r.attempt),
                r.status,
                f"{r.participants}/{r.selected}",
                str(r.rejected),
                f"{r.duration_s:.1f}" if r.duration_s is not None else "-",
                _metrics(r.metrics) if r.status == "completed" else r.reason,
            )
        console.print(table)
        return
    console.print(
        f"round {detail.round} attempt {detail.attempt} ({detail.attempts} in all) "
        f"{detail.status}: {_metrics(detail.metrics) or detail.reason}"
    )
    table = Table(title="participants")
    for col in ("device", "region", "examples", "metrics"):
        table.add_column(col)
    for p in detail.participants:
        table.add_row(p.device, p.region or "-", str(p.examples), _metrics(p.metrics))
    console.print(table)
    if detail.rejections:
        rejected = Table(title="rejected updates")
        rejected.add_column("device")
        rejected.add_column("reason")
        for j in detail.rejections:
            rejected.add_row(j.device, j.reason)
        console.print(rejected)


def models(
    target: str = typer.Argument(
        ..., metavar="SESSION | activate", help="a session (its versions), or 'activate'"
    ),
    version: str = typer.Argument(None, help="with activate: the version to promote"),
    lineage: str = typer.Option(None, "--lineage", help="a version: its chain of parents"),
    project: str = typer.Option(
        None, "--project", help="with activate: the project (default: the token's)"
    ),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """A session's model versions (oldest first; * marks the project's active model), one
    version's lineage (--lineage V), or `edgefl models activate VERSION` (operator): promote
    a version as the project's active model, which `session create --initial-model active`
    starts from."""
    console = _console()
    if target == "activate":
        if not version:
            raise typer.BadParameter("name the version: edgefl models activate VERSION")
        with _client(api, token) as client:
            proj = client.activate_model(version, project)
        console.print(f"active model of project {proj.project}: {proj.active_model}")
        return
    if version is not None:
        raise typer.BadParameter(f"unexpected {version!r}: edgefl models SESSION [--lineage V]")
    with _client(api, token) as client:
        listed = client.lineage(target, lineage).chain if lineage else None
        if listed is None:
            listed = client.all_models(target)
    title = f"lineage of {lineage}" if lineage else f"models of {target}"
    table = Table(title=title)
    for col in ("version", "active", "round", "parent", "size", "digest", "created"):
        table.add_column(col)
    for m in listed:
        table.add_row(
            m.version,
            "*" if m.active else "",
            str(m.round) if m.round is not None else "-",
            m.parent or "-",
            str(m.size),
            m.digest[:16],
            _when(m.created),
        )
    console.print(table)
    active = next((m.version for m in listed if m.active), None)
    if active:
        console.print(f"* active model: {active}")


def telemetry(
    device: str = typer.Option(None, "--device", help="one device only"),
    metric: str = typer.Option(None, "--metric", help="one metric only (e.g. train_loss)"),
    since: str = typer.Option(None, "--since", help="from: an age (10m, 2h), unix s or ISO"),
    until: str = typer.Option(None, "--until", help="to (same forms as --since)"),
    limit: int = typer.Option(100, min=1, max=1000, help="newest points, at most"),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """Device telemetry, newest first: the history when the API server reads InfluxDB
    (edgefl dashboard --telemetry influxdb://...), else each device's last point."""
    console = _console()
    with _client(api, token) as client:
        points = client.telemetry(device, since, limit, metric=metric, until=until)
    source = points[0].source if points else "-"
    table = Table(title=f"telemetry ({len(points)} points, source {source})")
    for col in ("time", "device", "region", "metrics"):
        table.add_column(col)
    for p in points:
        table.add_row(_when(p.ts), p.device, p.region, _metrics(p.metrics))
    console.print(table)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(0.0, time.time() - ts)
    return f"{secs:.0f}s ago" if secs < 120 else _when(ts)


# the telemetry the devices table shows (GET /api/devices/{device} has all of it)
SHOWN_TELEMETRY = ("cpu_percent", "mem_used_percent", "temp_c", "train_loss")


def _brief(metrics: dict[str, float]) -> str:
    """A device's last telemetry in a table cell: the health readings, then training loss."""
    shown = {k: metrics[k] for k in SHOWN_TELEMETRY if k in metrics}
    return _metrics(shown or dict(list(metrics.items())[:3]))


def devices(
    region: str = typer.Option(None, "--region", help="only this region's devices"),
    state: str = typer.Option(None, "--state", help="online or offline"),
    limit: int = typer.Option(100, min=1, max=1000, help="devices per page"),
    offset: int = typer.Option(0, min=0, help="devices to skip"),
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """The devices as the controllers last saw them: state, task, update counts, telemetry."""
    if state not in (None, "online", "offline"):
        raise typer.BadParameter("--state must be online or offline")
    console = _console()
    with _client(api, token) as client:
        page = client.devices(region=region, state=state, limit=limit, offset=offset)
        recent = {p.device: p for p in client.telemetry(limit=1000)}
    table = Table(title=f"devices {offset + 1}-{offset + len(page.items)} of {page.total}")
    for col in ("device", "region", "state", "last seen", "task", "acc/decl/rej"):
        table.add_column(col)
    table.add_column("telemetry")
    for d in page.items:
        point = recent.get(d.device)
        table.add_row(
            d.device,
            d.region,
            "[green]online" if d.state == "online" else "[red]offline",
            _ago(d.last_seen),
            d.current_task or "-",
            f"{d.accepted}/{d.declined}/{d.rejected}",
            _brief(point.metrics) if point else "-",
        )
    console.print(table)
    if page.next_offset is not None:
        console.print(f"more: --offset {page.next_offset}")


def combiners(api: str = ApiUrl, token: str | None = Token) -> None:
    """The regional combiners: state, current round, updates accepted and rejected."""
    console = _console()
    with _client(api, token) as client:
        page = client.combiners(limit=1000)
    table = Table(title=f"combiners ({page.total})")
    for col in ("region", "combiner", "state", "last seen", "round", "accepted", "rejected"):
        table.add_column(col)
    for c in page.items:
        table.add_row(
            c.region,
            c.combiner,
            "[green]online" if c.state == "online" else "[red]offline",
            _ago(c.last_seen),
            str(c.current_round or "-"),
            str(c.accepted),
            str(c.rejected),
        )
    console.print(table)


members_app = typer.Typer(
    help="A project's team: list, invite, change roles and remove people (project admins).",
    no_args_is_help=True,
)
ProjectOpt = typer.Option(..., "--project", "-p", help="the project whose team this is")
RoleArg = typer.Argument(..., help="admin, operator or viewer")


def _members_table(project: str, rows: list[Member]) -> Table:
    table = Table(title=f"members of {project}")
    for col in ("user", "role", "invited by", "since"):
        table.add_column(col)
    for m in rows:
        table.add_row(m.user, m.role, m.invited_by or "-", _when(m.created))
    return table


@members_app.command("list")
def members_list(project: str = ProjectOpt, api: str = ApiUrl, token: str | None = Token) -> None:
    """The project's members (an admin sees all; anyone else only themselves)."""
    with _client(api, token) as client:
        rows = client.members(project)
    if not rows:
        _console().print(f"project {project} has no members: its tokens' roles apply")
        return
    _console().print(_members_table(project, rows))


@members_app.command("add")
def members_add(
    user: str = typer.Argument(..., help="the person: the sub of their tokens"),
    role: str = typer.Option("viewer", "--role", help="admin, operator or viewer"),
    project: str = ProjectOpt,
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """Invite a person into the project (the first invitation makes you its first admin)."""
    with _client(api, token) as client:
        added = client.add_member(project, user, role)
    _console().print(f"{added.user} is {added.role} of {added.project}")


@members_app.command("set-role")
def members_set_role(
    user: str = typer.Argument(..., help="the member"),
    role: str = RoleArg,
    project: str = ProjectOpt,
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """Change a member's role (the last admin cannot be demoted)."""
    with _client(api, token) as client:
        changed = client.set_member_role(project, user, role)
    _console().print(f"{changed.user} is now {changed.role} of {changed.project}")


@members_app.command("remove")
def members_remove(
    user: str = typer.Argument(..., help="the member"),
    project: str = ProjectOpt,
    api: str = ApiUrl,
    token: str | None = Token,
) -> None:
    """Remove a member: their next request no longer sees the project."""
    with _client(api, token) as client:
        client.remove_member(project, user)
    _console().print(f"{user} removed from {project}")


def register(app: typer.Typer) -> None:
    """Mount ``session``, ``members``, ``rounds``, ``models``, ``telemetry``, ``devices`` and
    ``combiners`` on ``edgefl``."""
    app.add_typer(session_app, name="session")
    app.add_typer(members_app, name="members")
    app.command("rounds")(rounds)
    app.command("models")(models)
    app.command("telemetry")(telemetry)
    app.command("devices")(devices)
    app.command("combiners")(combiners)
