"""``edgefl.client.APIClient`` and the CLI built on it, against uvicorn serving a real
deployment on the embedded broker. ``session watch`` follows a session while it runs."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.api.server import DashboardServer
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.cli.main import app as cli
from edgefl.client import APIClient, APIError, APIUnreachable, ClientError
from edgefl.controller import Controller, SessionConfig
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from tests.harness import Deployment


@dataclass
class Served:
    url: str
    auth: AuthConfig
    project: str
    dep: Deployment
    controller: Controller
    session_id: str  # a completed session

    def token(self, role: Role = Role.viewer) -> str:
        return self.auth.issuer().issue("cli", role, self.project)

    def client(self, role: Role = Role.viewer) -> APIClient:
        return APIClient(self.url, self.token(role))


@pytest.fixture(scope="module")
def served(embedded_broker, tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("client")
    auth = AuthConfig(secret=generate_secret())
    dep = Deployment(embedded_broker.url, root)
    try:
        dep.start_combiners(1)
        dep.start_fleet(3)
        ctl = dep.controller()
        sid, _ = dep.run_session(ctl, session_id="cli-1", rounds=2, min_devices=3)
        server = DashboardServer(
            dep.store, port=0, auth=auth, project=dep.project, blobs=FileBlobStore(dep.models_dir)
        ).start()
        dep.own(server)
        yield Served(server.url.rstrip("/"), auth, dep.project, dep, ctl, sid)
    finally:
        dep.close()


def test_the_client_mirrors_the_api(served: Served) -> None:
    store = served.dep.store
    with served.client() as api:
        assert api.health() and api.whoami().role == "viewer"
        page = api.sessions(limit=1)
        assert [s.session_id for s in page.items] == [served.session_id]
        assert (page.total, page.next_offset) == (1, None)
        assert [s.session_id for s in api.iter_sessions()] == [served.session_id]
        sess = api.session(served.session_id)
        assert (sess.status, sess.current_round, sess.config["rounds"]) == ("completed", 2, 2)
        rounds = api.rounds(served.session_id, limit=1)
        assert (len(rounds.items), rounds.total, rounds.next_offset) == (1, 2, 1)
        everything = api.all_rounds(served.session_id)
        assert [r.task_id for r in everything] == [
            r.task_id for r in store.list_rounds(served.session_id)
        ]
        one = api.round(served.session_id, 2)
        assert {p.device for p in one.participants} == set(one.selected) and one.rejections == []
        assert one.metrics == store.list_rounds(served.session_id)[-1].metrics
        models = api.all_models(served.session_id)
        assert [m.version for m in models] == [
            m.version for m in store.list_models(served.session_id)
        ]
        lineage = api.lineage(served.session_id, models[-1].version)
        assert [m.version for m in lineage.chain] == [m.version for m in reversed(models)]
        blob = api.download_model(served.session_id, models[-1].version)
        assert hashlib.sha256(blob).hexdigest() == models[-1].digest
        [project] = api.projects().items
        assert (project.project, project.sessions) == (served.project, 1)
        assert api.packages().items == []


def test_client_errors_carry_the_problem_document(served: Served) -> None:
    with served.client() as api:
        with pytest.raises(APIError) as missing:
            api.session("nope")
        err = missing.value
        assert err.status == 404 and err.title == "Not Found" and "'nope'" in err.detail
        assert err.problem == {
            "type": "about:blank",
            "title": "Not Found",
            "status": 404,
            "detail": "no session 'nope'",
        }
        with pytest.raises(APIError) as forbidden:
            api.stop_session(served.session_id)  # a viewer may not stop
        assert forbidden.value.status == 403
        assert forbidden.value.type == "urn:edgefl:problem:forbidden"
        assert "role 'viewer'" in forbidden.value.detail
    with served.client(Role.operator) as api:
        with pytest.raises(APIError) as invalid:
            api.upload_package(b"\xa1\x61a\x01")  # a CBOR map, but no package
        assert invalid.value.status == 422
        assert invalid.value.type == "urn:edgefl:problem:invalid-package"
        assert "not an edgefl model package" in invalid.value.detail
        with pytest.raises(APIError, match="409 Conflict: cannot stop"):
            api.stop_session(served.session_id)
    with APIClient(served.url, "not-a-jwt") as api, pytest.raises(APIError) as bad_token:
        api.sessions()
    assert bad_token.value.status == 401
    assert bad_token.value.type == "urn:edgefl:problem:unauthorized"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with APIClient(dead, "x", timeout=2) as api, pytest.raises(APIUnreachable, match=dead):
        api.sessions()
    assert issubclass(APIUnreachable, ClientError) and issubclass(APIError, ClientError)


def _run(served: Served, *args: str, role: Role = Role.viewer) -> Any:
    env = {"EDGEFL_API": served.url, "EDGEFL_TOKEN": served.token(role), "COLUMNS": "200"}
    return CliRunner().invoke(cli, list(args), env=env)


def test_cli_lists_shows_and_tabulates(served: Served) -> None:
    sid = served.session_id
    listed = _run(served, "session", "list")
    assert listed.exit_code == 0, listed.output
    assert sid in listed.output and "completed" in listed.output and "2/2" in listed.output
    shown = _run(served, "session", "show", sid)
    assert shown.exit_code == 0 and '"min_devices": 3' in shown.output
    rounds = _run(served, "rounds", sid)
    assert rounds.exit_code == 0 and "3/3" in rounds.output and "accuracy=" in rounds.output
    one = _run(served, "rounds", sid, "--round", "1")
    device = served.dep.store.list_rounds(sid)[0].participants[0]["device"]
    assert one.exit_code == 0 and device in one.output and "region-0" in one.output
    last = served.dep.store.list_models(sid)[-1].version
    models = _run(served, "models", sid, "--lineage", last)
    assert models.exit_code == 0 and f"lineage of {last}" in models.output
    assert all(m.version in models.output for m in served.dep.store.list_models(sid))
    missing = _run(served, "session", "show", "nope")
    assert missing.exit_code == 1 and "404 Not Found: no session 'nope'" in missing.output
    stop = _run(served, "session", "stop", sid)
    assert stop.exit_code == 1 and "403 Forbidden" in stop.output
    for command in (["session", "list"], ["session", "watch"], ["rounds"], ["models"]):
        helped = CliRunner().invoke(cli, [*command, "--help"])
        assert helped.exit_code == 0 and "--api" in helped.output and "--token" in helped.output


def test_cli_session_watch_follows_a_running_session_to_its_final_metrics(
    served: Served,
) -> None:
    config = SessionConfig(
        session_id="watched", rounds=3, min_devices=3, train={"lr": 0.1, "batch_size": 32}
    )
    served.controller.create_session(config, digits.initial_weights())
    ran: dict[str, float] = {}

    def run() -> None:  # starts after watch's first polls: it must follow a live session
        time.sleep(1.0)
        ran["started"] = time.monotonic()
        served.controller.run("watched")

    runner = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    runner.start()
    try:
        watched = _run(served, "session", "watch", "watched", "--interval", "0.2")
    finally:
        runner.join(timeout=60)
    assert watched.exit_code == 0, watched.output
    out = watched.output
    rounds = served.dep.store.list_rounds("watched")
    assert [r.status for r in rounds] == ["completed"] * 3
    for r in rounds:  # each round's line, with its metrics as the store has them
        assert f"round {r.round} (attempt 0) completed: 3/3 devices" in out
    final = " ".join(f"{k}={v:.4g}" for k, v in sorted(rounds[-1].metrics.items()))
    assert f"session watched completed after round 3: final {final}" in out
    assert out.index("round 1 (attempt 0)") < out.index("round 3 (attempt 0)") < out.index(final)
    assert ran["started"] - started >= 1.0 and time.monotonic() - started < 60
