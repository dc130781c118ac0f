"""The REST API over a real SQLite store (and blob store), called with a viewer's JWT."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from edgefl.api.app import create_app
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.controller.model_versions import ModelRepository
from edgefl.protocol.tensors import loads_tensors
from edgefl.store import make_store
from edgefl.store.base import ModelRecord, RoundRecord, SessionRecord, Store
from edgefl.store.blobs import FileBlobStore

AUTH = AuthConfig(secret=generate_secret())
ROOT = Path(__file__).resolve().parents[1]
PROBLEM = "application/problem+json"


def _client(store: Store, role: Role = Role.viewer, **kwargs) -> TestClient:
    """The app bound to project ``p``, with a bearer token of ``role`` on every request."""
    client = TestClient(create_app(store, AUTH, project="p", **kwargs))
    token = AUTH.issuer().issue("alice", role, "p")
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def _filled_store(path) -> Store:
    store = make_store(f"sqlite:///{path}")
    store.create_session(
        SessionRecord("old", "p", {"rounds": 1}, "completed", 1, "old-r0001", 0.5, 0.6)
    )
    store.create_session(
        SessionRecord(
            "s1", "p", {"rounds": 5, "aggregator": "fedavg"}, "running", 2, "s1-r0002", 1.0, 2.0
        )
    )
    store.add_model(ModelRecord("s1-r0000", None, "s1", 0, "00" * 32, 5, 1.0))
    for r in (1, 2):
        store.add_model(
            ModelRecord(f"s1-r{r:04d}", f"s1-r{r - 1:04d}", "s1", r, "11" * 32, 5, 1.0 + r)
        )
        store.start_round(
            RoundRecord(
                f"s1:{r}:0",
                "s1",
                r,
                0,
                "running",
                f"s1-r{r - 1:04d}",
                None,
                ["a", "b"],
                started=10.0 * r,
            )
        )
        store.finish_round(
            f"s1:{r}:0",
            status="completed",
            model_out=f"s1-r{r:04d}",
            participants=[{"device": "a", "n": 1, "metrics": {}}],
            metrics={"accuracy": 0.4 * r, "loss": 1.0 / r},
            finished=10.0 * r + 0.5,
        )
    store.start_round(
        RoundRecord("s1:3:0", "s1", 3, 0, "running", "s1-r0002", None, ["a", "b", "c"], started=30)
    )
    # another project's session in the same store: never shown to project p's tokens
    store.create_session(SessionRecord("q1", "q", {"rounds": 1}, "running", 0, "q-r0", 3.0, 3.0))
    return store


@pytest.fixture
def store(tmp_path):
    store = _filled_store(tmp_path / "s.db")
    yield store
    store.close()


def test_sessions(store: Store) -> None:
    client = _client(store)
    assert client.get("/api/health").json() == {"status": "ok"}
    listed = client.get("/api/sessions")
    sessions = listed.json()
    assert [s["session_id"] for s in sessions] == ["s1", "old"]  # newest first, project p only
    assert listed.headers["x-total-count"] == "2" and 'rel="next"' not in listed.headers["link"]
    assert sessions[0] == {
        "session_id": "s1",
        "project": "p",
        "status": "running",
        "current_round": 2,
        "rounds": 5,
        "aggregator": "fedavg",
        "model_version": "s1-r0002",
        "reason": "",
        "stop_requested_by": "",
        "created": 1.0,
        "updated": 2.0,
    }
    one = client.get("/api/sessions/s1").json()
    assert one["config"] == {"rounds": 5, "aggregator": "fedavg"}
    assert one["status"] == "running" and one["rounds"] == 5


def test_rounds(store: Store) -> None:
    client = _client(store)
    rounds = client.get("/api/sessions/s1/rounds").json()
    assert [(r["round"], r["status"]) for r in rounds] == [
        (1, "completed"),
        (2, "completed"),
        (3, "running"),
    ]
    assert [r["metrics"].get("accuracy") for r in rounds] == [0.4, 0.8, None]
    first, _, running = rounds
    assert (first["duration_s"], first["participants"], first["selected"]) == (0.5, 1, 2)
    assert (first["started"], first["finished"], first["attempt"]) == (10.0, 10.5, 0)
    assert (first["model_in"], first["model_out"], first["reason"]) == ("s1-r0000", "s1-r0001", "")
    assert (running["duration_s"], running["finished"], running["selected"]) == (None, None, 3)
    assert client.get("/api/sessions/old/rounds").json() == []


def test_models_carry_lineage(store: Store) -> None:
    client = _client(store)
    models = client.get("/api/sessions/s1/models").json()
    assert [(m["version"], m["parent"], m["round"]) for m in models] == [
        ("s1-r0000", None, 0),
        ("s1-r0001", "s1-r0000", 1),
        ("s1-r0002", "s1-r0001", 2),
    ]
    assert set(models[0]) == {"version", "parent", "round", "digest", "size", "created", "active"}
    assert models[0]["digest"] == "00" * 32 and models[0]["size"] == 5


def test_unknown_sessions_are_404_problems(store: Store) -> None:
    client = _client(store)
    for path in ("", "/rounds", "/models", "/models/s1-r0001/download"):
        res = client.get(f"/api/sessions/nope{path}")
        assert res.status_code == 404 and res.headers["content-type"] == PROBLEM
        body = res.json()
        assert body["status"] == 404 and body["title"] == "Not Found" and "nope" in body["detail"]
        assert body["type"] == "about:blank"
    # a session of another project is as unknown as a missing one
    assert client.get("/api/sessions/q1").status_code == 404
    assert client.post("/api/sessions/q1/stop").status_code == 403  # a viewer may not stop
    assert _client(store, Role.operator).post("/api/sessions/q1/stop").status_code == 404
    assert store.get_session("q1").stop_requested_by == ""


def test_framework_errors_are_problems_too(store: Store) -> None:
    client = _client(store)
    missing = client.get("/api/no-such-route")
    assert (missing.status_code, missing.headers["content-type"]) == (404, PROBLEM)
    assert missing.json()["detail"] == "Not Found"
    wrong = client.delete("/api/sessions")
    assert (wrong.status_code, wrong.json()["title"]) == (405, "Method Not Allowed")
    bad = _client(store, Role.admin).post("/api/devices/a+b/revoke")  # not a topic segment
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM
    assert "device id" in bad.json()["detail"]


def test_dashboard_page_is_public_and_self_contained(store: Store) -> None:
    page = TestClient(create_app(store, AUTH)).get("/")  # no token: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ("session-status", "round-count", "rounds-table", "accuracy-chart"):
        assert f'id="{element}"' in page.text
    for element in ("login-form", "token-input", "login-error", "logout"):
        assert f'id="{element}"' in page.text
    assert "sessionStorage" in page.text and "Bearer" in page.text
    # no CDN: works offline (the SVG namespace is a name, never fetched)
    text = page.text.replace('"http://www.w3.org/2000/svg"', '""')
    assert "http://" not in text and "https://" not in text


def test_every_data_route_needs_a_token(store: Store) -> None:
    client = TestClient(create_app(store, AUTH, project="p"))
    for path in ("/api/sessions", "/api/sessions/s1", "/api/sessions/s1/rounds", "/api/whoami"):
        res = client.get(path)
        assert res.status_code == 401, path
        assert res.headers["www-authenticate"] == 'Bearer realm="edgefl"'
        assert res.json()["type"] == "urn:edgefl:problem:unauthorized"
    assert client.get("/api/health").status_code == 200  # probes carry no token
    assert client.get("/docs").status_code == 404  # Swagger UI would need a CDN


def test_without_token_material_the_app_refuses_unless_insecure(store: Store, caplog) -> None:
    with pytest.raises(ValueError, match="insecure=True"):
        create_app(store)
    with caplog.at_level(logging.WARNING, logger="edgefl.security"):
        client = TestClient(create_app(store, insecure=True))
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    # insecure serves everything without a token, every project included
    assert {s["session_id"] for s in client.get("/api/sessions").json()} == {"s1", "old", "q1"}
    assert client.get("/api/whoami").json()["insecure"] is True
    res = client.post("/api/devices/d1/revoke")  # no revocation list to write to
    assert res.status_code == 409 and "revocation list" in res.json()["detail"]


def test_model_download_streams_the_checked_blob(tmp_path) -> None:
    store = make_store(f"sqlite:///{tmp_path / 's.db'}")
    blobs = FileBlobStore(tmp_path / "models")
    try:
        store.create_session(SessionRecord("s1", "p", {"rounds": 1}, "running", 0, "", 1.0, 1.0))
        weights = {"W": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones(3)}
        record, blob = ModelRepository(store, blobs).save(
            weights, parent=None, session_id="s1", round_=0
        )
        client = _client(store, blobs=blobs)
        res = client.get(f"/api/sessions/s1/models/{record.version}/download")
        assert res.status_code == 200 and res.content == blob
        assert res.headers["content-type"] == "application/cbor"
        assert res.headers["etag"] == f'"{hashlib.sha256(blob).hexdigest()}"'
        assert f'filename="{record.version}.cbor"' in res.headers["content-disposition"]
        got = loads_tensors(res.content)
        assert np.array_equal(got["W"], weights["W"]) and np.array_equal(got["b"], weights["b"])

        unknown = client.get("/api/sessions/s1/models/s1-r0009-00000000/download")
        assert unknown.status_code == 404 and "no model version" in unknown.json()["detail"]
        (tmp_path / "models" / record.version).write_bytes(blob[:-1] + b"\x00")  # bit rot
        rotten = client.get(f"/api/sessions/s1/models/{record.version}/download")
        assert rotten.status_code == 500 and "digest" in rotten.json()["detail"]

        no_blobs = _client(store)  # an API server that cannot reach the blob store
        res = no_blobs.get(f"/api/sessions/s1/models/{record.version}/download")
        assert res.status_code == 404 and res.headers["content-type"] == PROBLEM
        assert "no model blob store" in res.json()["detail"]
    finally:
        store.close()


def _cli(*args: str, cwd, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefl.cli.main", "dashboard", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}
    return {**env, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}


def test_dashboard_command_refuses_without_auth_or_state(tmp_path) -> None:
    no_auth = _cli(cwd=tmp_path, env=_env())
    assert no_auth.returncode == 2
    assert "EDGEFL_JWT_KEYS" in no_auth.stderr and "--insecure" in no_auth.stderr
    no_state = _cli(cwd=tmp_path, env=_env(EDGEFL_JWT_SECRET=generate_secret()))
    assert no_state.returncode == 2 and "Traceback" not in no_state.stderr
    assert "no state store at" in no_state.stderr and "--state" in no_state.stderr
    assert str(tmp_path / "edgefl-state" / "state.db") in no_state.stderr.replace("\n", "")
    assert not (tmp_path / "edgefl-state").exists()  # nothing was created on the way


def test_dashboard_command_serves_the_store_to_tokens(store: Store, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = generate_secret()
    state = f"sqlite:///{tmp_path / 's.db'}"  # the fixture's store
    cli = [sys.executable, "-m", "edgefl.cli.main", "dashboard", "--state", state]
    proc = subprocess.Popen(
        [*cli, "--project", "p", "--port", str(port)],
        cwd=tmp_path,
        env=_env(EDGEFL_JWT_SECRET=secret),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/api/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "never listened"
                time.sleep(0.1)
        token = AuthConfig(secret=secret).issuer().issue("vic", Role.viewer, "p")
        listed = httpx.get(f"{url}/api/sessions", headers={"Authorization": f"Bearer {token}"})
        assert [s["session_id"] for s in listed.json()] == ["s1", "old"]
        assert httpx.get(f"{url}/api/sessions").status_code == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "no model folder" in err  # downloads are off, and it said so
