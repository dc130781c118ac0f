"""Every role, and every way a token can be bad, against one endpoint of each class.

The API runs in uvicorn (``DashboardServer``) on a loopback port and is called over HTTP with
httpx; tokens are EdDSA, from a real key directory with a real revocation list. The last
test stops a live session through the API and checks that the controller honours it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fastapi.testclient import TestClient

from edgefl.api.app import create_app
from edgefl.api.server import DashboardServer
from edgefl.auth.keys import KeyDir
from edgefl.auth.revocation import RevocationList, revoke_subject
from edgefl.auth.tokens import AuthConfig, AuthError, Role, generate_secret
from edgefl.controller import SessionConfig, SessionFailed
from edgefl.controller.model_versions import ModelRepository
from edgefl.store import make_store
from edgefl.store.base import SessionRecord, Store
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from tests.harness import Deployment, RogueDevice

PROJECT = "p"
PROBLEM = "application/problem+json"


@dataclass
class Api:
    """The served app and what the matrix needs to know about it."""

    url: str
    auth: AuthConfig
    store: Store
    kid: str
    version: str  # a model version of session s1, with its blob


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("roles")
    keys = KeyDir(root / "keys")
    kid = keys.init("EdDSA")
    auth = AuthConfig(keys=str(keys.path))  # revocations: keys/revoked.json
    store = make_store(f"sqlite:///{root / 'state.db'}")
    blobs = FileBlobStore(root / "models")
    store.create_session(SessionRecord("s1", PROJECT, {"rounds": 3}, "running", 0, "", 1.0, 1.0))
    record, _ = ModelRepository(store, blobs).save(
        {"W": np.zeros((2, 2))}, parent=None, session_id="s1", round_=0
    )
    server = DashboardServer(store, port=0, auth=auth, project=PROJECT, blobs=blobs).start()
    try:
        yield Api(server.url.rstrip("/"), auth, store, kid, record.version)
    finally:
        server.stop()
        store.close()


def _claims(role: str = "viewer", project: str = PROJECT) -> dict[str, object]:
    now = time.time()
    return {"iss": "edgefl", "sub": "eve", "role": role, "project": project, "iat": now,
            "exp": int(now) + 600}  # fmt: skip


@pytest.fixture(scope="module")
def tokens(api: Api) -> dict[str, str | None]:
    """Every identity of the matrix: people, services, and tokens that must be refused."""
    issuer = api.auth.issuer()
    issue = issuer.issue
    revoked = issue("mallory", Role.admin, PROJECT)
    revoke_subject(api.auth.revocations_path() or "", "mallory")  # after issue: refuses it
    stranger = ed25519.Ed25519PrivateKey.generate()
    return {
        "admin": issue("ada", Role.admin, PROJECT),
        "operator": issue("olga", Role.operator, PROJECT),
        "viewer": issue("vic", Role.viewer, PROJECT),
        "device": issue("dev-1", Role.device, PROJECT, region="region-0"),
        "combiner": issue("combiner-region-0", Role.combiner, PROJECT, region="region-0"),
        "controller": issue("controller", Role.controller, PROJECT),
        "expired": issue("ada", Role.admin, PROJECT, ttl_s=-60),
        "revoked": revoked,
        # our key id, someone else's key: the signature must not verify
        "wrong-signature": jwt.encode(
            _claims("admin"), stranger, algorithm="EdDSA", headers={"kid": api.kid}
        ),
        "alg-none": jwt.encode(_claims("admin"), None, algorithm="none", headers={"kid": api.kid}),
        "other-project": issue("ada", Role.admin, "q"),
        "no-token": None,
    }


# (method, path) of one endpoint per class; the download is the viewer's second class member
def _endpoints(api: Api) -> dict[str, tuple[str, str]]:
    return {
        "viewer:sessions": ("GET", "/api/sessions"),
        "viewer:download": ("GET", f"/api/sessions/s1/models/{api.version}/download"),
        "operator:stop": ("POST", "/api/sessions/s1/stop"),
        "admin:revoke": ("POST", "/api/devices/dev-9/revoke"),
        "admin:keys": ("GET", "/api/keys"),
    }


OK = {"viewer:sessions": 200, "viewer:download": 200, "operator:stop": 202}
OK |= {"admin:revoke": 200, "admin:keys": 200}
REFUSED = ("expired", "revoked", "wrong-signature", "alg-none", "other-project", "no-token")
EXPECTED: dict[str, dict[str, int]] = {
    "admin": OK,
    "operator": {k: (v if not k.startswith("admin") else 403) for k, v in OK.items()},
    "viewer": {k: (v if k.startswith("viewer") else 403) for k, v in OK.items()},
    **{svc: dict.fromkeys(OK, 403) for svc in ("device", "combiner", "controller")},
    **{bad: dict.fromkeys(OK, 401) for bad in REFUSED},
}


def test_role_by_endpoint_matrix(api: Api, tokens: dict[str, str | None]) -> None:
    endpoints = _endpoints(api)
    seen: dict[str, dict[str, int]] = {}
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for who in EXPECTED:  # admin first: it is the one whose stop request is recorded
            token = tokens[who]
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            seen[who] = {}
            for name, (method, path) in endpoints.items():
                res = http.request(method, path, headers=headers)
                seen[who][name] = res.status_code
                if res.status_code < 400:
                    continue
                assert res.headers["content-type"] == PROBLEM, (who, name)
                body = res.json()
                assert set(body) >= {"type", "title", "status", "detail"}, body
                assert body["status"] == res.status_code and body["detail"], (who, name, body)
                if res.status_code == 401:
                    challenge = res.headers["www-authenticate"]
                    assert challenge.startswith('Bearer realm="edgefl"'), challenge
                    assert ('error="invalid_token"' in challenge) == (token is not None)
                elif res.status_code == 403:
                    assert f"role '{who}'" in body["detail"], body
    assert seen == EXPECTED

    # what the allowed calls did
    assert api.store.get_session("s1").stop_requested_by == "ada (admin)"
    path = api.auth.revocations_path()
    assert path is not None and "dev-9" in RevocationList(path).subjects()
    old_device_token = api.auth.issuer().issue("dev-9", Role.device, PROJECT, region="region-0")
    revoke_subject(path, "dev-9")  # (the API's revocation is older than this token)
    with pytest.raises(AuthError, match="revoked"):
        api.auth.verifier(project=PROJECT).verify(old_device_token)


def test_reasons_and_admin_answers(api: Api, tokens: dict[str, str | None]) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as http:

        def get(path: str, who: str) -> httpx.Response:
            return http.get(path, headers={"Authorization": f"Bearer {tokens[who]}"})

        keys = get("/api/keys", "admin").json()
        assert keys == {"keys": [{"kid": api.kid, "alg": "EdDSA"}], "active": api.kid}
        assert get("/api/whoami", "operator").json()["role"] == "operator"
        for who, why in [
            ("expired", "expired"),
            ("revoked", "revoked"),
            ("wrong-signature", "signature"),
            ("alg-none", "alg"),
            ("other-project", "project"),
        ]:
            res = get("/api/sessions", who)
            assert res.status_code == 401 and why in res.json()["detail"], (who, res.text)
        res = get("/api/sessions", "device")
        assert res.status_code == 403 and "'device'" in res.json()["detail"]
        basic = http.get("/api/sessions", headers={"Authorization": "Basic YWxpY2U6eA=="})
        assert basic.status_code == 401
        assert 'error="invalid_request"' in basic.headers["www-authenticate"]


def test_a_secret_has_no_key_ids_and_no_revocation_list(tmp_path) -> None:
    auth = AuthConfig(secret=generate_secret())
    store = make_store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        client = TestClient(create_app(store, auth, project=PROJECT))
        admin = auth.issuer().issue("ada", Role.admin, PROJECT)
        client.headers["Authorization"] = f"Bearer {admin}"
        assert client.get("/api/keys").json() == {"algorithm": "HS256"}
        res = client.post("/api/devices/dev-1/revoke")
        assert res.status_code == 409 and res.headers["content-type"] == PROBLEM
        assert "EDGEFL_REVOCATIONS" in res.json()["detail"]
        stop = client.post("/api/sessions/nope/stop")
        assert stop.status_code == 404 and "nope" in stop.json()["detail"]
    finally:
        store.close()


def test_an_operator_stops_a_live_session_through_the_api(embedded_broker, tmp_path) -> None:
    """Mid-round (a silent device holds the round open for 60 s) and between rounds."""
    auth = AuthConfig(secret=generate_secret())
    dep = Deployment(embedded_broker.url, tmp_path)
    try:
        dep.start_combiners(1)
        dep.start_fleet(3)
        dep.own(RogueDevice(dep.url, dep.project, "region-0", "ghost", mode="silent"))
        ctl = dep.controller()
        server = DashboardServer(
            make_store(dep.state_url), port=0, auth=auth, project=dep.project
        ).start()
        dep.own(server)
        http = dep.own(httpx.Client(base_url=server.url.rstrip("/"), timeout=10))
        operator = {
            "Authorization": f"Bearer {auth.issuer().issue('olga', 'operator', dep.project)}"
        }
        viewer = {"Authorization": f"Bearer {auth.issuer().issue('vic', 'viewer', dep.project)}"}

        config = SessionConfig(
            session_id="stop-mid-round",
            rounds=5,
            min_devices=3,  # 3 devices + the silent ghost are online: all 4 are selected
            round_timeout_s=60,
            close_grace_s=3,
            train={"lr": 0.1, "batch_size": 32},
        )
        ctl.create_session(config, digits.initial_weights())
        sid = config.session_id
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["session"] = ctl.run(sid)
            except SessionFailed as exc:
                outcome["error"] = str(exc)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 30
        while True:  # until the round is in flight, waiting for the ghost
            rounds = http.get(f"/api/sessions/{sid}/rounds", headers=viewer).json()
            if rounds and rounds[-1]["status"] == "running":
                break
            assert time.monotonic() < deadline, rounds
            time.sleep(0.1)
        assert http.post(f"/api/sessions/{sid}/stop", headers=viewer).status_code == 403
        asked = time.monotonic()
        res = http.post(f"/api/sessions/{sid}/stop", headers=operator)
        assert res.status_code == 202 and res.json()["stop_requested_by"] == "olga (operator)"
        runner.join(timeout=30)
        took = time.monotonic() - asked
        assert not runner.is_alive()
        assert took < 20, f"the stop took {took:.1f}s: the round ran to its deadline"
        assert "stopped by request of olga (operator) after round 1" in str(outcome["error"])

        sess = http.get(f"/api/sessions/{sid}", headers=viewer).json()
        assert sess["status"] == "stopped" and "olga (operator)" in sess["reason"]
        assert sess["current_round"] == 1 and sess["stop_requested_by"] == ""
        rounds = http.get(f"/api/sessions/{sid}/rounds", headers=viewer).json()
        # the round in flight was closed early with the three updates it had, not failed
        assert [(r["round"], r["status"], r["participants"], r["selected"]) for r in rounds] == [
            (1, "completed", 3, 4)
        ]
        again = http.post(f"/api/sessions/{sid}/stop", headers=operator)
        assert again.status_code == 409 and "stopped" in again.json()["detail"]

        # between rounds: a request made before the loop starts stops it before round 1
        config2 = SessionConfig(
            session_id="stop-before", rounds=3, min_devices=3, train={"lr": 0.1, "batch_size": 32}
        )
        ctl.create_session(config2, digits.initial_weights())
        sid2 = config2.session_id
        assert http.post(f"/api/sessions/{sid2}/stop", headers=operator).status_code == 202
        with pytest.raises(SessionFailed, match=r"of olga \(operator\) after round 0"):
            ctl.run(sid2)
        assert ctl.store.list_rounds(sid2) == []
    finally:
        dep.close()


def test_the_demo_dashboard_takes_the_token_it_prints(tmp_path) -> None:
    from edgefl.demo import DemoOptions, DemoRun

    said: list[str] = []
    opts = DemoOptions(devices=2, regions=1, rounds=1, dashboard_port=0, workdir=tmp_path / "w")
    with DemoRun(opts) as run:
        result = run.run(on_status=said.append)
        assert run.dashboard_url and run.dashboard_login
        token_file = tmp_path / "w" / "dashboard-token"
        assert str(token_file) in run.dashboard_login
        assert any(str(token_file) in m and run.dashboard_url in m for m in said)
        assert token_file.stat().st_mode & 0o077 == 0  # the operator's token: owner only
        bearer = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        with httpx.Client(base_url=run.dashboard_url.rstrip("/"), timeout=10) as http:
            assert http.get("/api/sessions").status_code == 401
            sessions = http.get("/api/sessions", headers=bearer).json()
            assert [s["session_id"] for s in sessions] == [result["session_id"]]
            assert http.get("/api/whoami", headers=bearer).json()["role"] == "operator"
            done = http.post(f"/api/sessions/{result['session_id']}/stop", headers=bearer)
            assert done.status_code == 409  # an operator may stop, but it already completed
