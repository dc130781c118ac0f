"""Structured JSON logs: the context fields on every line, the per-session log files and their
export (``GET /api/sessions/{id}/logs``, scoped like every session route), and a device agent
running with JSON logs and tracing asked for while OpenTelemetry cannot be imported."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgefl.api.server import DashboardServer
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.fleet.simulate import device_name
from edgefl.observability import tracing
from edgefl.observability.logs import (
    SessionLogWriter,
    configure_logging,
    log_context,
    make_handler,
    read_session_log,
)
from edgefl.tasks import digits
from tests.harness import Deployment, completed_accuracies

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level restored afterwards (pytest's own included)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_each_line_is_json_with_the_context_of_its_thread() -> None:
    buf = io.StringIO()
    log = logging.getLogger("edgefl.test.jsonlogs")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = make_handler(True, stream=buf)
    log.addHandler(handler)
    try:
        log.info("outside")
        with log_context(session="s1", round=3, task_id="s1:3:0", region="r0", device=None):
            log.info("in the round")
            with log_context(device="dev-7", transfer="s1:3:0"):
                log.warning("rejected update from %s", "dev-7")
            try:
                raise ValueError("bad tensor")
            except ValueError:
                log.exception("failed")
        log.info("with extra", extra={"device": "dev-9"})
    finally:
        log.removeHandler(handler)
    outside, in_round, rejected, failed, extra = _lines(buf)
    assert outside["msg"] == "outside" and "session" not in outside
    assert outside["logger"] == "edgefl.test.jsonlogs" and outside["level"] == "info"
    assert outside["ts"].endswith("+00:00")
    assert {k: in_round[k] for k in ("session", "round", "task_id", "region")} == {
        "session": "s1",
        "round": 3,
        "task_id": "s1:3:0",
        "region": "r0",
    }
    assert "device" not in in_round  # None values are left out
    assert rejected["device"] == "dev-7" and rejected["transfer"] == "s1:3:0"
    assert rejected["msg"] == "rejected update from dev-7" and rejected["level"] == "warning"
    assert "device" not in failed and failed["round"] == 3  # the inner context ended
    assert "ValueError: bad tensor" in failed["exc"]
    assert extra["device"] == "dev-9" and "session" not in extra


def test_log_lines_name_the_current_span_while_tracing() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    buf = io.StringIO()
    log = logging.getLogger("edgefl.test.jsonspans")
    log.propagate = False
    log.addHandler(make_handler(True, stream=buf))
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(exporter=exporter)
    try:
        with tracing.span("work"):
            log.warning("inside")
        log.warning("after")
    finally:
        tracing.shutdown_tracing()
    inside, after = _lines(buf)
    (span,) = exporter.get_finished_spans()
    assert inside["trace_id"] == format(span.context.trace_id, "032x")
    assert inside["span_id"] == format(span.context.span_id, "016x")
    assert "trace_id" not in after


def test_configure_logging_reads_the_environment(
    root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = io.StringIO()
    monkeypatch.setenv("EDGEFL_LOG_FORMAT", "json")
    configure_logging(level="info", stream=buf)
    logging.getLogger("edgefl.test").debug("not at info")
    with log_context(session="abc"):
        logging.getLogger("edgefl.test").info("hello")
    said, hello = _lines(buf)
    assert said["msg"] == "logging: JSON lines to a stream at info"
    assert hello == {**hello, "msg": "hello", "session": "abc", "level": "info"}
    monkeypatch.setenv("EDGEFL_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="EDGEFL_LOG_FORMAT must be json or text"):
        configure_logging(stream=buf)
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(False, level="chatty", stream=buf)


def test_session_files_keep_each_session_and_project_apart(tmp_path: Path) -> None:
    log = logging.getLogger("edgefl.test.sessions")
    log.setLevel(logging.INFO)
    mine = SessionLogWriter(tmp_path, project="p1").attach(log)
    try:
        with log_context(project="p1", session="s-a", round=1):
            log.info("a1")
            log.debug("below the writer's level")
        with log_context(project="p1", session="s-b"):
            log.info("b1")
        with log_context(project="p2", session="s-c"):
            log.info("another project's")
        with log_context(session="s-a"):
            log.warning("a2 (no project named: kept)")
        log.info("no session: kept nowhere")
    finally:
        mine.close()
    log.info("after close")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-a.jsonl", "s-b.jsonl"]
    a = [json.loads(line) for line in read_session_log(tmp_path, "s-a")]
    assert [r["msg"] for r in a] == ["a1", "a2 (no project named: kept)"]
    assert [json.loads(line)["msg"] for line in read_session_log(tmp_path, "s-b")] == ["b1"]
    # a torn last line (a crash mid-write) and a stranger's line are not exported
    with (tmp_path / "s-b.jsonl").open("a") as f:
        f.write(json.dumps({"session": "s-a", "msg": "mislabelled"}) + "\n" + '{"session": "s-')
    assert [json.loads(line)["msg"] for line in read_session_log(tmp_path, "s-b")] == ["b1"]
    assert list(read_session_log(tmp_path, "never-ran")) == []
    with pytest.raises(ValueError, match="cannot name a log file"):
        list(read_session_log(tmp_path, "../etc/passwd"))


def test_session_log_export_route(
    mosquitto: MosquittoProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgefl")  # what `edgefl controller` logs by default
    auth = AuthConfig(secret=generate_secret())
    with Deployment(mosquitto.url, tmp_path) as dep:
        dep.start_combiners(2)
        dep.start_fleet(4)
        ctl = dep.controller()
        first, rounds_a = dep.run_session(ctl, session_id="logs-a", rounds=2, min_devices=4)
        second, rounds_b = dep.run_session(ctl, session_id="logs-b", rounds=1, min_devices=4)
        assert completed_accuracies(rounds_a) == pytest.approx(digits.reference_run(4, 2), abs=1e-9)
        assert len(completed_accuracies(rounds_b)) == 1
        server = dep.own(
            # every project served: each caller sees their own (docs/security.md 4a)
            DashboardServer(dep.store, port=0, auth=auth, logs=dep.logs_dir).start()
        )
        bare = dep.own(DashboardServer(dep.store, port=0, auth=auth, project=dep.project).start())

        def get(url: str, path: str, project: str, **params: object) -> httpx.Response:
            token = auth.issuer().issue("viewer-1", Role.viewer, project)
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.get(url.rstrip("/") + path, headers=headers, params=params, timeout=10)

        res = get(server.url, f"/api/sessions/{first}/logs", dep.project)
        assert res.status_code == 200, res.text
        assert res.headers["content-type"].startswith("application/x-ndjson")
        records = [json.loads(line) for line in res.text.splitlines()]
        assert records and all(r["session"] == first for r in records)
        assert all(r["project"] == dep.project for r in records)
        done = [r for r in records if r["logger"] == "edgefl.controller.rounds"]
        assert [(r["round"], r["task_id"]) for r in done if " done: " in r["msg"]] == [
            (1, f"{first}:1:0"),
            (2, f"{first}:2:0"),
        ]
        partials = [r for r in records if "partial sent" in r["msg"]]
        assert sorted((r["round"], r["region"], r["combiner"]) for r in partials) == [
            (rnd, f"region-{k}", f"combiner-region-{k}") for rnd in (1, 2) for k in (0, 1)
        ]
        # the other session's lines are its own
        res = get(server.url, f"/api/sessions/{second}/logs", dep.project)
        other = [json.loads(line) for line in res.text.splitlines()]
        assert other and all(r["session"] == second for r in other)
        assert not {json.dumps(r) for r in other} & {json.dumps(r) for r in records}
        # filters
        one = get(server.url, f"/api/sessions/{first}/logs", dep.project, round=2)
        assert {json.loads(line)["round"] for line in one.text.splitlines()} == {2}
        bad = get(server.url, f"/api/sessions/{first}/logs", dep.project, level="loud")
        assert bad.status_code == 422
        # scoped: another project's viewer cannot tell the session exists
        assert get(server.url, f"/api/sessions/{first}/logs", "elsewhere").status_code == 404
        assert get(server.url, "/api/sessions/nope/logs", dep.project).status_code == 404
        # an API without a log folder says so
        res = get(bare.url, f"/api/sessions/{first}/logs", dep.project)
        assert res.status_code == 404 and "no session logs" in res.text


AGENT_WITHOUT_OTEL = (
    "import sys; sys.modules['opentelemetry'] = None; "  # any `import opentelemetry...` fails
    "from device_agent.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_agent_runs_with_json_logs_and_no_opentelemetry(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    n, k = 3, 2  # two simulated devices and this one (the partition's device k)
    x, y = digits.device_data(n, k)
    npz = tmp_path / "data.npz"
    np.savez(npz, X=x, y=y)
    env = {key: v for key, v in os.environ.items() if not key.startswith(("EDGEFL_", "OTEL_"))}
    env |= {"EDGEFL_LOG_FORMAT": "json", "EDGEFL_TRACING": "otlp", "PYTHONPATH": str(ROOT)}
    with Deployment(mosquitto.url, tmp_path / "dep") as dep:
        dep.start_combiners(1)
        dep.start_fleet(n - 1, partition_size=n)
        ctl = dep.controller()
        cmd = [
            sys.executable, "-c", AGENT_WITHOUT_OTEL,
            "--data-path", str(npz),
            "--broker-url", dep.url,
            "--project", dep.project,
            "--region", "region-0",
            "--device-id", device_name(k),
            "--seed", str(k),
            "--log-level", "debug",
        ]  # fmt: skip
        err_path = tmp_path / "agent.log"
        with err_path.open("wb") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            session, rounds = dep.run_session(ctl, rounds=2, min_devices=n)
            time.sleep(0.5)  # its last debug line follows the last PUBACK
            assert proc.poll() is None, err_path.read_text(errors="replace")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, err_path.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    text = err_path.read_text(errors="replace")
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(n, 2), abs=1e-9)
    for rec in rounds:
        assert device_name(k) in {p["device"] for p in rec.participants}
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    (warned,) = [r for r in lines if r["logger"] == "edgefl.observability.tracing"]
    assert warned["level"] == "warning" and "not installed" in warned["msg"], warned
    done = [r for r in lines if " done: " in r["msg"]]
    assert [(r["session"], r["round"], r["device"], r["region"]) for r in done] == [
        (session, 1, device_name(k), "region-0"),
        (session, 2, device_name(k), "region-0"),
    ]
    assert all("trace_id" not in r for r in lines)


def test_cli_flags_and_agent_config_switch_observability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from device_agent.config import load_config
    from edgefl.cli.main import app

    for name in ("EDGEFL_LOG_FORMAT", "EDGEFL_TRACING"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    monkeypatch.setenv("EDGEFL_JWT_SECRET", generate_secret())
    token = ["token", "--subject", "ops", "--role", "viewer"]
    bad = CliRunner().invoke(app, ["--log-format", "yaml", *token])
    assert bad.exit_code == 2 and "--log-format must be text or json" in bad.output
    bad = CliRunner().invoke(app, ["--tracing", "zipkin", *token])
    assert bad.exit_code == 2 and "--tracing must be one of none, console, otlp" in bad.output
    ok = CliRunner().invoke(app, ["--log-format", "json", "--tracing", "console", *token])
    assert ok.exit_code == 0, ok.output
    assert os.environ["EDGEFL_LOG_FORMAT"] == "json" and os.environ["EDGEFL_TRACING"] == "console"

    env = {"EDGEFL_DEVICE_ID": "d1", "EDGEFL_LOG_FORMAT": "json", "EDGEFL_TRACING": "otlp"}
    cfg = load_config(env=env, otlp_endpoint="http://collector:4318")
    assert (cfg.log_format, cfg.tracing, cfg.otlp_endpoint) == (
        "json",
        "otlp",
        "http://collector:4318",
    )
    with pytest.raises(ValueError, match="tracing must be none, console or otlp"):
        load_config(env={**env, "EDGEFL_TRACING": "jaeger"})
    with pytest.raises(ValueError, match="log_format must be text or json"):
        load_config(env={**env, "EDGEFL_LOG_FORMAT": "xml"})


def test_session_scope_names_the_session_between_rounds(tmp_path: Path) -> None:
    from edgefl.observability.hooks import session_scope

    log = logging.getLogger("edgefl.test.scope")
    log.setLevel(logging.INFO)

    class Runner:
        project = "p1"

        @session_scope
        def run(self, session_id: str, rounds: int) -> int:
            log.warning("stopped by request after round %d", rounds)
            return rounds

    writer = SessionLogWriter(tmp_path, project="p1").attach(log)
    try:
        assert Runner().run("s-9", 4) == 4
        log.warning("after the run")
    finally:
        writer.close()
    (line,) = read_session_log(tmp_path, "s-9")
    rec = json.loads(line)
    assert (rec["project"], rec["session"], rec["msg"]) == (
        "p1",
        "s-9",
        "stopped by request after round 4",
    )
    assert [p.name for p in tmp_path.iterdir()] == ["s-9.jsonl"]
