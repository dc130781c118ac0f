"""Teams: people belong to projects with a role in each, and see only their projects.

A real API (uvicorn on loopback, ``DashboardServer``) serving every project (``project=None``)
over a real store, SQLite and PostgreSQL (``tests/postgres.py``), called over HTTP with httpx
and HS256 tokens. Two projects, alpha and beta, each with a session, rounds, model versions
(with blobs), devices, a combiner and telemetry: a member of alpha must see none of beta in
any list, and get 404 (not 403) for each of beta's objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from edgefl.api.app import create_app
from edgefl.api.server import DashboardServer
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.cli.main import app as cli
from edgefl.client import APIClient
from edgefl.controller.controller import Controller
from edgefl.controller.model_versions import ModelRepository
from edgefl.packages.build import build_package
from edgefl.packages.digits_models import digits_softmax_onnx
from edgefl.packages.owners import OwnersError, PackageOwners
from edgefl.store import make_store
from edgefl.store.base import (
    CombinerChange,
    DeviceChange,
    LastAdminError,
    RoundRecord,
    SessionRecord,
    Store,
)
from edgefl.store.blobs import FileBlobStore
from edgefl.store.schema import SCHEMA_VERSION
from edgefl.store.sql import SqlStore

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A brand-new state store on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


@dataclass
class World:
    """The served API, its store, and each project's objects."""

    url: str
    auth: AuthConfig
    store: Store
    server: DashboardServer
    versions: dict[str, str]  # project -> a model version of its session (with a blob)

    def token(self, who: str, role: Role | str = Role.admin, project: str = "alpha") -> str:
        return self.auth.issuer().issue(who, role, project)

    def http(self, who: str, role: Role | str = Role.admin, project: str = "alpha") -> httpx.Client:
        bearer = {"Authorization": f"Bearer {self.token(who, role, project)}"}
        return httpx.Client(base_url=self.url, headers=bearer, timeout=10.0)


def _populate(store: Store, blobs: FileBlobStore, project: str, sid: str, dev: str) -> str:
    """A session with a completed round, two model versions, a device and a combiner."""
    store.create_session(SessionRecord(sid, project, {"rounds": 2}, "running", 1, "", 1.0, 2.0))
    repo = ModelRepository(store, blobs)
    first, _ = repo.save({"W": np.zeros((2, 2))}, parent=None, session_id=sid, round_=0)
    second, _ = repo.save({"W": np.ones((2, 2))}, parent=first.version, session_id=sid, round_=1)
    store.start_round(RoundRecord(f"{sid}:1:0", sid, 1, 0, "running", first.version, None, [dev]))
    store.finish_round(
        f"{sid}:1:0",
        status="completed",
        model_out=second.version,
        participants=[{"device": dev, "region": "r0", "n": 10, "metrics": {}}],
        metrics={"accuracy": 0.5},
        finished=3.0,
    )
    now = time.time()
    store.record_fleet(
        [DeviceChange(project, dev, region="r0", state="online", last_seen=now,
                      telemetry={"train_loss": 0.25}, telemetry_at=now)],
        [CombinerChange(project, "r0", combiner=f"combiner-{project}", state="online",
                        last_seen=now)],
    )  # fmt: skip
    return second.version


@pytest.fixture
def world(url: str, tmp_path) -> Iterator[World]:
    auth = AuthConfig(secret=generate_secret(), revocations=str(tmp_path / "revoked.json"))
    store = make_store(url)
    blobs = FileBlobStore(tmp_path / "models")
    versions = {
        "alpha": _populate(store, blobs, "alpha", "sA", "devA"),
        "beta": _populate(store, blobs, "beta", "sB", "devB"),
    }
    store.add_member("alpha", "ann", "viewer", "setup", bootstrap="ann")  # ann: first admin
    store.set_member_role("alpha", "ann", "admin")
    store.add_member("alpha", "vic", "viewer", "ann (admin)")
    store.add_member("beta", "bob", "admin", "setup")
    server = DashboardServer(store, port=0, auth=auth, blobs=blobs).start()
    try:
        yield World(server.url.rstrip("/"), auth, store, server, versions)
    finally:
        server.stop()
        store.close()


def _role(store: Store, project: str, user: str) -> str | None:
    found = store.get_member(project, user)
    return found.role if found is not None else None


def _events(http: httpx.Client, path: str, until: str, timeout: float = 10.0) -> list[Any]:
    """The SSE events of ``path`` up to and including the first ``until`` one (name, data)."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    with http.stream("GET", path) as res:
        assert res.status_code == 200, res.read()
        name = "message"
        for line in res.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                seen.append((name, json.loads(line[len("data: ") :])))
                if name == until or time.monotonic() > deadline:
                    return seen
    return seen


def test_a_member_of_alpha_sees_nothing_of_beta(world: World) -> None:
    """Every list holds alpha's data only, and every beta object is a 404, for a viewer of
    alpha (whose token is an admin's: the membership decides, the token only caps it)."""
    with world.http("vic", Role.admin, "alpha") as vic:
        projects = vic.get("/api/projects").json()
        assert [(p["project"], p["role"]) for p in projects] == [("alpha", "viewer")]
        assert [s["session_id"] for s in vic.get("/api/sessions").json()] == ["sA"]
        assert vic.get("/api/sessions").headers["X-Total-Count"] == "1"
        assert [(d["project"], d["device"]) for d in vic.get("/api/devices").json()] == [
            ("alpha", "devA")
        ]
        assert vic.get("/api/devices").headers["X-Total-Count"] == "1"
        assert [c["project"] for c in vic.get("/api/combiners").json()] == ["alpha"]
        assert [p["device"] for p in vic.get("/api/telemetry").json()] == ["devA"]
        assert vic.get("/api/telemetry", params={"device": "devB"}).json() == []
        me = vic.get("/api/whoami").json()
        assert (me["project"], me["role"], me["projects"]) == (
            "alpha",
            "viewer",
            {"alpha": "viewer"},
        )
        # alpha's own objects answer
        assert vic.get("/api/sessions/sA").status_code == 200
        va = world.versions["alpha"]
        assert vic.get(f"/api/sessions/sA/models/{va}/download").status_code == 200
        assert vic.get("/api/devices/devA").json()["device"] == "devA"
        vb = world.versions["beta"]
        for path in (
            "/api/sessions/sB",
            "/api/sessions/sB/rounds",
            "/api/sessions/sB/rounds/1",
            "/api/sessions/sB/models",
            f"/api/sessions/sB/models/{vb}",
            f"/api/sessions/sB/models/{vb}/lineage",
            f"/api/sessions/sB/models/{vb}/download",
            "/api/sessions/sB/events",
            "/api/devices/devB?project=beta",
            "/api/projects/beta",
            "/api/projects/beta/members",
        ):
            res = vic.get(path)
            assert res.status_code == 404, (path, res.status_code, res.text)
            assert "beta" not in res.json().get("title", "")
        # the viewer cannot act in alpha, and beta is as unknown for acts as for reads
        assert vic.post("/api/sessions/sA/stop").status_code == 403
        assert vic.post("/api/sessions/sB/stop").status_code == 404
        assert vic.post("/api/projects/beta/members", json={"user": "vic"}).status_code == 404
        body = {"version": vb}
        assert vic.put("/api/projects/beta/active-model", json=body).status_code == 404
        # the live streams carry alpha only
        sessions = _events(vic, "/api/events", "sessions")[-1][1]
        assert [s["session_id"] for s in sessions] == ["sA"]
        fleet = _events(vic, "/api/fleet/events", "fleet")
        assert {d["project"] for n, d in fleet if n in ("device", "combiner")} == {"alpha"}
        assert fleet[-1][1]["devices"] == 1
        # a ticket-opened stream is scoped the same way
        ticket = vic.post("/api/sse-ticket").json()["ticket"]
        assert vic.get(f"/api/sessions/sB/events?ticket={ticket}").status_code == 404
    with world.http("bob", Role.viewer, "beta") as bob:  # and the other way round
        assert [s["session_id"] for s in bob.get("/api/sessions").json()] == ["sB"]
        assert bob.get("/api/sessions/sA").status_code == 404


def test_the_token_role_is_a_ceiling(world: World) -> None:
    """ann is alpha's admin, but a viewer token of hers only reads."""
    with world.http("ann", Role.viewer, "alpha") as ann:
        assert ann.get("/api/sessions/sA").status_code == 200
        assert ann.post("/api/sessions/sA/stop").status_code == 403
        assert ann.get("/api/projects").json()[0]["role"] == "viewer"
    with world.http("ann", Role.operator, "alpha") as ann:
        assert ann.post("/api/projects/alpha/members", json={"user": "x"}).status_code == 403


def test_invites_role_changes_and_removals_count_from_the_next_request(world: World) -> None:
    """carl holds an operator token for alpha but is no member: alpha has a team, so he sees
    nothing until ann invites him; his role follows hers for him; removed, he is out."""
    va = world.versions["alpha"]
    with world.http("ann") as ann, world.http("carl", Role.operator, "alpha") as carl:
        assert carl.get("/api/sessions").json() == []
        assert carl.get("/api/projects").json() == []
        assert carl.get("/api/sessions/sA").status_code == 404
        res = ann.post("/api/projects/alpha/members", json={"user": "carl", "role": "viewer"})
        assert res.status_code == 201, res.text
        assert res.json()["invited_by"] == "ann (admin)"
        assert res.headers["Location"] == "/api/projects/alpha/members/carl"
        assert [s["session_id"] for s in carl.get("/api/sessions").json()] == ["sA"]
        promote = {"version": va}
        assert carl.put("/api/projects/alpha/active-model", json=promote).status_code == 403
        res = ann.put("/api/projects/alpha/members/carl", json={"role": "operator"})
        assert res.status_code == 200 and res.json()["role"] == "operator"
        res = carl.put("/api/projects/alpha/active-model", json=promote)
        assert res.status_code == 200 and res.json()["active_model"] == va
        # a second invitation is a conflict, an unknown member a 404, a bad role a 422
        again = ann.post("/api/projects/alpha/members", json={"user": "carl"})
        assert again.status_code == 409
        assert (
            ann.put("/api/projects/alpha/members/zoe", json={"role": "viewer"}).status_code == 404
        )
        bad = ann.post("/api/projects/alpha/members", json={"user": "zoe", "role": "owner"})
        assert bad.status_code == 422
        assert ann.delete("/api/projects/alpha/members/carl").status_code == 204
        assert carl.get("/api/sessions").json() == []
        assert carl.get("/api/sessions/sA").status_code == 404
        assert carl.put("/api/projects/alpha/active-model", json=promote).status_code == 404
        assert ann.delete("/api/projects/alpha/members/carl").status_code == 404


def test_members_lists_show_admins_everyone_and_others_themselves(world: World) -> None:
    with world.http("ann") as ann, world.http("vic", Role.viewer) as vic:
        assert [(m["user"], m["role"]) for m in ann.get("/api/projects/alpha/members").json()] == [
            ("ann", "admin"),
            ("vic", "viewer"),
        ]
        assert [m["user"] for m in vic.get("/api/projects/alpha/members").json()] == ["vic"]
        assert vic.post("/api/projects/alpha/members", json={"user": "x"}).status_code == 403
        assert vic.delete("/api/projects/alpha/members/ann").status_code == 403


def test_the_last_admin_stays(world: World) -> None:
    """No change leaves alpha without an admin: not removing ann (by herself), not demoting
    her; once dora is admin too, ann may step down, and dora is then the last one."""
    with world.http("ann") as ann:
        res = ann.delete("/api/projects/alpha/members/ann")
        assert res.status_code == 409 and res.json()["type"] == "urn:edgefl:problem:last-admin"
        assert (
            ann.put("/api/projects/alpha/members/ann", json={"role": "operator"}).status_code == 409
        )
        assert (
            ann.post(
                "/api/projects/alpha/members", json={"user": "dora", "role": "admin"}
            ).status_code
            == 201
        )
        res = ann.put("/api/projects/alpha/members/ann", json={"role": "viewer"})
        assert res.status_code == 200
        assert ann.get("/api/projects/alpha/members").json() == [
            m for m in ann.get("/api/projects/alpha/members").json() if m["user"] == "ann"
        ]  # a viewer now: only herself
        assert ann.post("/api/projects/alpha/members", json={"user": "eve"}).status_code == 403
    with world.http("dora") as dora:
        assert dora.delete("/api/projects/alpha/members/dora").status_code == 409
        assert dora.delete("/api/projects/alpha/members/ann").status_code == 204
        assert [m["user"] for m in dora.get("/api/projects/alpha/members").json()] == [
            "dora",
            "vic",
        ]
    with pytest.raises(LastAdminError):
        world.store.set_member_role("alpha", "dora", "viewer")


def test_a_project_without_members_keeps_the_token_rule_until_its_first_invite(
    world: World,
) -> None:
    """gamma has sessions but no team: any gamma token holder has the token's role there
    (schema 6's behaviour, so an upgrade breaks nothing). gus, holding an admin token, invites
    val and becomes gamma's first admin; from then on a gamma token alone opens nothing."""
    world.store.create_session(SessionRecord("sG", "gamma", {}, "created", 0, "", 1.0, 1.0))
    with (
        world.http("gus", Role.admin, "gamma") as gus,
        world.http("zed", Role.operator, "gamma") as zed,
        world.http("val", Role.admin, "beta") as val,
    ):
        assert [s["session_id"] for s in zed.get("/api/sessions").json()] == ["sG"]
        assert [s["session_id"] for s in gus.get("/api/sessions").json()] == ["sG"]
        assert gus.get("/api/projects/gamma/members").json() == []
        assert val.get("/api/sessions").json() == []  # beta has a team; val is not in it
        res = gus.post("/api/projects/gamma/members", json={"user": "val", "role": "viewer"})
        assert res.status_code == 201
        team = gus.get("/api/projects/gamma/members").json()
        assert [(m["user"], m["role"]) for m in team] == [("gus", "admin"), ("val", "viewer")]
        assert zed.get("/api/sessions").json() == []
        assert zed.get("/api/sessions/sG").status_code == 404
        # val's token names beta, but gamma's team counts her in: memberships decide
        assert [s["session_id"] for s in val.get("/api/sessions").json()] == ["sG"]
        assert val.post("/api/sessions/sG/stop").status_code == 403


def test_a_removed_member_s_open_streams_end(world: World) -> None:
    """The streams re-resolve roles at their periodic check: removed from alpha, vic's stream
    of sA ends with an ``auth`` event (404) and her sessions stream drops sA."""
    live = world.server.app.state.live_events
    live.recheck_s = 0.2
    with world.http("ann") as ann, world.http("vic", Role.viewer) as vic:
        with vic.stream("GET", "/api/sessions/sA/events") as res:
            assert res.status_code == 200
            lines = res.iter_lines()
            for line in lines:
                if line == "event: session":
                    break
            assert ann.delete("/api/projects/alpha/members/vic").status_code == 204
            deadline = time.monotonic() + 10
            names = []
            for line in lines:
                if line.startswith("event: "):
                    names.append(line[len("event: ") :])
                if line.startswith("data: ") and names and names[-1] == "auth":
                    assert json.loads(line[len("data: ") :])["status"] == 404
                    break
                assert time.monotonic() < deadline, names
            assert names[-1] == "auth"
        assert vic.get("/api/sessions/sA/events").status_code == 404


def test_an_api_bound_to_one_project_admits_its_members_only(world: World, tmp_path) -> None:
    """create_app(project="alpha"): ann's token naming beta is let in (she is alpha's
    member), but an outsider's beta token is refused (401) as before teams."""
    server = DashboardServer(world.store, port=0, auth=world.auth, project="alpha").start()
    base = server.url.rstrip("/")
    try:
        ann = {"Authorization": f"Bearer {world.token('ann', Role.admin, 'beta')}"}
        res = httpx.get(f"{base}/api/sessions", headers=ann)
        assert [s["session_id"] for s in res.json()] == ["sA"]
        assert httpx.get(f"{base}/api/whoami", headers=ann).json()["project"] == "alpha"
        bob = {"Authorization": f"Bearer {world.token('bob', Role.admin, 'beta')}"}
        assert httpx.get(f"{base}/api/sessions", headers=bob).status_code == 401
    finally:
        server.stop()


def _package(tmp_path: Path, name: str) -> bytes:
    """A real model package (the digits softmax exported to ONNX); the name sets its digest."""
    model = tmp_path / "softmax.onnx"
    model.write_bytes(digits_softmax_onnx())
    return build_package(model, name=name, labels=10).dumps()


def _digests(http: httpx.Client) -> list[str]:
    res = http.get("/api/packages")
    assert res.status_code == 200, res.text
    assert res.headers["X-Total-Count"] == str(len(res.json()))
    return [p["digest"] for p in res.json()]


def test_packages_are_scoped_to_the_projects_that_added_them(world: World, tmp_path) -> None:
    """beta's package is unknown to alpha (list, get, session creation all as for a missing
    one); identical bytes uploaded by both projects are visible to both."""
    mine, shared = _package(tmp_path, "beta-only"), _package(tmp_path, "shared")
    beta_digest, shared_digest = _sha(mine), _sha(shared)
    nowhere = "0" * 64
    with world.http("bob", Role.admin, "beta") as bob, world.http("ann") as ann:
        assert bob.post("/api/packages", content=mine).status_code == 201  # his only project
        assert _digests(bob) == [beta_digest]
        with world.http("vic", Role.viewer, "alpha") as vic:
            assert _digests(vic) == []
            missing = vic.get(f"/api/packages/{nowhere}")
            hidden = vic.get(f"/api/packages/{beta_digest}")
            assert (hidden.status_code, missing.status_code) == (404, 404)
            assert hidden.json()["detail"] == missing.json()["detail"].replace(nowhere, beta_digest)
        assert _digests(ann) == [] and ann.get(f"/api/packages/{beta_digest}").status_code == 404
        # alpha cannot train beta's package: refused exactly as a package never uploaded
        for digest in (beta_digest, nowhere):
            res = ann.post("/api/sessions", json={"model": digest, "rounds": 1})
            assert res.status_code == 422, res.text
            assert res.json()["detail"].startswith(f"no package {digest} in this server's")
        assert ann.post("/api/packages?project=beta", content=mine).status_code == 404
        # the same bytes from both projects: stored once, owned by both, seen by both
        first = ann.post("/api/packages", content=shared)
        assert first.status_code == 201 and first.json()["digest"] == shared_digest
        assert _digests(bob) == [beta_digest]  # not beta's until beta adds it
        assert bob.get(f"/api/packages/{shared_digest}").status_code == 404
        again = bob.post("/api/packages", content=shared)
        assert again.status_code == 200 and again.json()["digest"] == shared_digest
        assert _digests(bob) == sorted([beta_digest, shared_digest])
        assert _digests(ann) == [shared_digest]
        assert ann.get(f"/api/packages/{shared_digest}").json()["size"] == len(shared)
        made = ann.post("/api/sessions", json={"model": shared_digest, "rounds": 1})
        assert made.status_code == 201, made.text
        assert made.json()["config"]["package"] == shared_digest
        assert bob.get(f"/api/packages/{shared_digest}").json()["sessions"] == []  # alpha's
        assert ann.get(f"/api/packages/{shared_digest}").json()["sessions"] == [
            made.json()["session_id"]
        ]
    owners = PackageOwners(FileBlobStore(tmp_path / "models"))
    assert owners.get(shared_digest) == {"alpha", "beta"} and owners.get(beta_digest) == {"beta"}


def test_an_upload_names_its_project_when_the_caller_has_several(world: World, tmp_path) -> None:
    """An operator of two projects must say which one an upload is for (422 naming both);
    a viewer of the named project gets 403, a stranger to it 404."""
    data = _package(tmp_path, "two-teams")
    world.store.add_member("beta", "ann", "operator", "bob (admin)")
    with world.http("ann") as ann:
        res = ann.post("/api/packages", content=data)
        assert res.status_code == 422 and "alpha, beta" in res.json()["detail"]
    with APIClient(world.url, world.token("ann")) as api:  # the Python client names it too
        assert api.upload_package(data, project="beta").digest == _sha(data)
    with world.http("bob", Role.admin, "beta") as bob:
        assert _digests(bob) == [_sha(data)]
    with world.http("vic", Role.admin, "alpha") as vic:
        assert _digests(vic) == []
        assert vic.post("/api/packages", content=data).status_code == 403  # viewer in alpha
        assert vic.post("/api/packages?project=beta", content=data).status_code == 404


def test_a_package_without_owners_is_seen_by_the_projects_training_it(
    world: World, tmp_path
) -> None:
    """A package stored before owners existed (no sidecar) belongs to no project: only the
    projects whose sessions train it see it, and an upload claims it."""
    data = _package(tmp_path, "legacy")
    digest = _sha(data)
    blobs = FileBlobStore(tmp_path / "models")
    blobs.put(f"pkg-{digest}", data)  # as an older edgefl stored it
    cfg = {"rounds": 1, "package": digest}
    world.store.create_session(SessionRecord("sB2", "beta", cfg, "created", 0, "", 4.0, 4.0))
    with world.http("bob", Role.viewer, "beta") as bob, world.http("ann") as ann:
        assert _digests(bob) == [digest]
        assert bob.get(f"/api/packages/{digest}").json()["sessions"] == ["sB2"]
        assert _digests(ann) == [] and ann.get(f"/api/packages/{digest}").status_code == 404
        assert ann.post("/api/sessions", json={"model": digest}).status_code == 422
        assert ann.post("/api/packages", content=data).status_code == 200  # claims it
        assert _digests(ann) == [digest]
    assert PackageOwners(blobs).get(digest) == {"alpha"}


def test_insecure_mode_shows_every_package_unless_bound_to_a_project(
    world: World, tmp_path
) -> None:
    """No auth: an unbound API shows every package, as before owners; one bound to alpha
    shows alpha's only, uploads for alpha, and refuses sessions on beta's package."""
    beta_pkg, alpha_pkg = _package(tmp_path, "beta-insecure"), _package(tmp_path, "alpha-insecure")
    blobs = FileBlobStore(tmp_path / "models")
    Controller("mqtt://127.0.0.1:1", world.store, blobs, project="beta").add_package(beta_pkg)
    bound = TestClient(create_app(world.store, None, insecure=True, project="alpha", blobs=blobs))
    assert bound.get("/api/packages").json() == []
    assert bound.get(f"/api/packages/{_sha(beta_pkg)}").status_code == 404
    assert bound.post("/api/sessions", json={"model": _sha(beta_pkg)}).status_code == 422
    assert bound.post("/api/packages", content=alpha_pkg).status_code == 201
    assert [p["digest"] for p in bound.get("/api/packages").json()] == [_sha(alpha_pkg)]
    assert PackageOwners(blobs).get(_sha(alpha_pkg)) == {"alpha"}
    anyone = TestClient(create_app(world.store, None, insecure=True, blobs=blobs))
    assert [p["digest"] for p in anyone.get("/api/packages").json()] == sorted(
        [_sha(alpha_pkg), _sha(beta_pkg)]
    )
    made = anyone.post("/api/sessions", json={"model": _sha(beta_pkg), "project": "alpha"})
    assert made.status_code == 201, made.text


def _add_owners(root: str, digest: str, projects: list[str]) -> None:
    owners = PackageOwners(FileBlobStore(root))
    for p in projects:
        owners.add(digest, p)


ADD_IN_A_PROCESS = """
import sys
from edgefl.packages.owners import PackageOwners
from edgefl.store.blobs import FileBlobStore
owners = PackageOwners(FileBlobStore(sys.argv[1]))
sys.stdin.read()  # every process is ready: all start adding at once
for p in sys.argv[3:]:
    owners.add(sys.argv[2], p)
"""


def test_owners_writes_from_threads_and_processes_lose_nothing(tmp_path) -> None:
    """Read-modify-write of one sidecar: a lock within the process, and ``flock`` on the
    model folder across processes, so no concurrent add overwrites another."""
    digest, N = "ab" * 32, 40  # N adds per thread and per process
    root = str(tmp_path / "models")
    FileBlobStore(root)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ADD_IN_A_PROCESS, root, digest]
            + [f"p{i}-{j}" for j in range(N)],
            env=env,
            stdin=subprocess.PIPE,
        )
        for i in range(3)
    ]
    threads = [
        threading.Thread(target=_add_owners, args=(root, digest, [f"t{i}-{j}" for j in range(N)]))
        for i in range(4)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    want = {f"{k}{i}-{j}" for k, n in (("t", 4), ("p", 3)) for i in range(n) for j in range(N)}
    owners = PackageOwners(FileBlobStore(root))
    assert owners.get(digest) == want
    assert owners.add(digest, "t0-0") is False  # already an owner: nothing written
    raw = json.loads((tmp_path / "models" / f"pkg-{digest}.owners").read_text())
    assert raw == {"format": 1, "projects": sorted(want)}
    (tmp_path / "models" / f"pkg-{digest}.owners").write_text('{"format": 2, "projects": []}')
    assert owners.get(digest) == frozenset()  # unreadable: nobody is shown it
    with pytest.raises(OwnersError, match="format 2"):
        owners.add(digest, "x")  # and it is never overwritten


def test_the_controller_records_its_project_when_it_adds_a_package(tmp_path) -> None:
    data = _package(tmp_path, "from-controller")
    blobs = FileBlobStore(tmp_path / "models")
    store = make_store(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        controller = Controller("mqtt://127.0.0.1:1", store, blobs, project="beta")
        assert controller.add_package(data).digest == _sha(data)  # no broker needed
        assert PackageOwners(blobs).get(_sha(data)) == {"beta"}
    finally:
        store.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_members_cli(world: World) -> None:
    """``edgefl members add|list|set-role|remove --project`` through the REST client."""
    runner = CliRunner()
    env = {"EDGEFL_API": world.url, "EDGEFL_TOKEN": world.token("ann")}

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["members", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    assert "fay is operator of alpha" in run("add", "fay", "--role", "operator", "-p", "alpha")
    assert _role(world.store, "alpha", "fay") == "operator"
    listed = run("list", "--project", "alpha")
    assert "fay" in listed and "ann (admin)" in listed
    assert "now viewer" in run("set-role", "fay", "viewer", "--project", "alpha")
    assert _role(world.store, "alpha", "fay") == "viewer"
    assert "removed" in run("remove", "fay", "--project", "alpha")
    assert world.store.get_member("alpha", "fay") is None
    refused = runner.invoke(cli, ["members", "remove", "ann", "-p", "alpha"], env=env)
    assert refused.exit_code == 1 and "last admin" in refused.output
    hidden = runner.invoke(cli, ["members", "list", "-p", "beta"], env=env)
    assert hidden.exit_code == 1 and "404" in hidden.output


def test_store_memberships_and_the_last_admin_rule(url: str) -> None:
    store = make_store(url)
    try:
        assert store.count_members("p") == 0
        store.add_member("p", "bea", "viewer", "al (admin)", bootstrap="al")
        assert [(m.user, m.role) for m in store.list_members("p")] == [
            ("al", "admin"),
            ("bea", "viewer"),
        ]
        assert [m.project for m in store.list_members(user="bea")] == ["p"]
        with pytest.raises(ValueError):
            store.add_member("p", "bea", "viewer")
        with pytest.raises(ValueError):
            store.add_member("p", "cy", "owner")
        with pytest.raises(LastAdminError):
            store.remove_member("p", "al")
        with pytest.raises(LastAdminError):
            store.set_member_role("p", "al", "operator")
        with pytest.raises(KeyError):
            store.remove_member("p", "nobody")
        store.set_member_role("p", "bea", "admin")
        store.remove_member("p", "al")
        assert store.get_member("p", "al") is None and store.count_members("p") == 1
        # the multi-project filters of the lists
        for name in ("p", "q", "r"):
            store.create_session(SessionRecord(f"s-{name}", name, {}, "created", 0, "", 1, 1))
        assert [s.session_id for s in store.list_sessions(["p", "r"])] == ["s-p", "s-r"]
        assert store.count_sessions(["q"]) == 1 and store.list_sessions([]) == []
    finally:
        store.close()


def test_migration_0003_to_0004_keeps_the_data(url: str) -> None:
    """A database at revision 0003 (schema 6) gains the empty memberships table and keeps
    its sessions and project settings; every project then keeps the token rule."""
    from alembic import command

    from edgefl.store.schema import alembic_config

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0003")
        conn.execute(
            text(
                "INSERT INTO sessions (session_id, project, config, status, current_round, "
                "model_version, created, updated) VALUES ('old', 'p', '{\"rounds\": 2}', "
                "'completed', 2, 'old-r0002', 1.0, 2.0)"
            )
        )
        conn.execute(
            text("INSERT INTO projects VALUES ('p', 'old-r0002', 'ann (operator)', 3.0, 3.0)")
        )
        assert "memberships" not in inspect(conn).get_table_names()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM edgefl_meta")).scalar() == "6"
    engine.dispose()
    store = SqlStore(url)
    try:
        assert store.schema.current and store.schema.schema_version == SCHEMA_VERSION >= 7
        sess = store.get_session("old")
        assert sess is not None and (sess.status, sess.config) == ("completed", {"rounds": 2})
        project = store.get_project("p")
        assert project is not None and project.active_model == "old-r0002"
        assert store.list_members() == [] and store.count_members("p") == 0
        store.add_member("p", "ann", "admin", "ann (admin)")
        assert _role(store, "p", "ann") == "admin"
    finally:
        store.close()
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM edgefl_meta")).scalar() == str(SCHEMA_VERSION)
        assert "memberships" in inspect(conn).get_table_names()
    engine.dispose()
