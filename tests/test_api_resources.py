"""The REST resources over a real session: uvicorn (``DashboardServer``) on a free port, httpx,
and a session run on the embedded broker by the deployment harness, with a rogue device whose
malformed updates are refused, so the rounds carry rejections as well as participants.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from edgefl.api.app import create_app
from edgefl.api.server import DashboardServer
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.controller import Controller
from edgefl.packages.build import build_package
from edgefl.packages.digits_models import digits_softmax_onnx
from edgefl.protocol import encode
from edgefl.protocol.chunking import split_payload
from edgefl.protocol.tensors import encode_tensors
from edgefl.store.base import SessionRecord, Store
from edgefl.store.blobs import FileBlobStore
from tests.harness import Deployment, RogueDevice

PROBLEM = "application/problem+json"


@dataclass
class Live:
    """A finished session, served by the API bound to its project."""

    url: str
    auth: AuthConfig
    project: str
    store: Store
    models_dir: Path
    controller: Controller
    session_id: str

    def headers(self, role: Role = Role.viewer) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth.issuer().issue('ann', role, self.project)}"}

    def http(self, role: Role = Role.viewer) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(role), timeout=10)


def bad_update(rogue: RogueDevice, task: dict) -> None:
    """A selected device answers every task with tensors of the wrong shape: refused.

    Sent from a thread of its own: waiting for PUBACKs inside paho's callback would block the
    very loop that receives them."""
    threading.Thread(target=_send_bad_update, args=(rogue, task), daemon=True).start()


def _send_bad_update(rogue: RogueDevice, task: dict) -> None:
    payload = encode(
        "update",
        task_id=task["task_id"],
        device=rogue.device,
        model_version=task["model_version"],
        num_examples=10,
        metrics={},
        tensors=encode_tensors({"W": np.zeros((2, 2)), "b": np.zeros(2)}),
    )
    for chunk in split_payload(payload, 1 << 20, meta={"task_id": task["task_id"]}):
        rogue.publish_update(chunk.to_bytes())


@pytest.fixture(scope="module")
def live(embedded_broker, tmp_path_factory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("resources")
    auth = AuthConfig(secret=generate_secret())
    dep = Deployment(embedded_broker.url, root)
    try:
        dep.start_combiners(1)
        dep.start_fleet(3)
        dep.own(RogueDevice(dep.url, dep.project, "region-0", "rogue-1", "bad", bad_update))
        ctl = dep.controller()
        deadline = time.monotonic() + 20
        while len(ctl.presence.eligible()) < 4:
            assert time.monotonic() < deadline, "the fleet never came online"
            time.sleep(0.1)
        sid, _ = dep.run_session(
            ctl, session_id="res-1", rounds=2, min_devices=3, round_timeout_s=3, close_grace_s=1
        )
        server = DashboardServer(
            dep.store, port=0, auth=auth, project=dep.project, blobs=FileBlobStore(dep.models_dir)
        ).start()
        dep.own(server)
        yield Live(server.url.rstrip("/"), auth, dep.project, dep.store, dep.models_dir, ctl, sid)
    finally:
        dep.close()


def _links(res: httpx.Response) -> dict[str, str]:
    return {rel: link["url"] for rel, link in res.links.items()}


def test_sessions_are_paginated_with_totals_and_links(live: Live) -> None:
    for i in range(5):  # more sessions of the project, and one of another project
        live.store.create_session(
            SessionRecord(f"old-{i}", live.project, {"rounds": 1}, "completed", 1, "", i, i)
        )
    live.store.create_session(SessionRecord("alien", "other", {}, "running", 0, "", 9.0, 9.0))
    expected = [s.session_id for s in reversed(live.store.list_sessions())]
    expected.remove("alien")
    with live.http() as http:
        first = http.get("/api/sessions", params={"limit": 2})
        assert first.status_code == 200 and first.headers["x-total-count"] == str(len(expected))
        assert [s["session_id"] for s in first.json()] == expected[:2]
        links = _links(first)
        assert set(links) == {"first", "next"}
        assert "offset=2" in links["next"] and "limit=2" in links["next"]
        seen, res = [], first
        while True:  # follow rel=next to the end
            seen += [s["session_id"] for s in res.json()]
            if "next" not in res.links:
                break
            res = http.get(_links(res)["next"])
        assert seen == expected
        assert "prev" in res.links and res.headers["x-total-count"] == str(len(expected))
        beyond = http.get("/api/sessions", params={"offset": 100})
        assert beyond.json() == [] and beyond.headers["x-total-count"] == str(len(expected))
        for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
            res = http.get("/api/sessions", params=bad)
            assert res.status_code == 422 and res.headers["content-type"] == PROBLEM, bad
            assert next(iter(bad)) in res.json()["detail"]


def test_a_session_and_its_stop_rules(live: Live) -> None:
    with live.http() as http:
        one = http.get(f"/api/sessions/{live.session_id}").json()
        assert (one["status"], one["current_round"], one["rounds"]) == ("completed", 2, 2)
        assert one["config"]["min_devices"] == 3 and one["model_version"].startswith("res-1-r0002")
        assert http.post(f"/api/sessions/{live.session_id}/stop").status_code == 403
    with live.http(Role.operator) as http:
        done = http.post(f"/api/sessions/{live.session_id}/stop")
        assert done.status_code == 409 and "completed" in done.json()["detail"]
        assert http.get("/api/sessions/alien-or-none").status_code == 404


def test_rounds_list_and_one_round_with_participants_and_rejections(live: Live) -> None:
    records = live.store.list_rounds(live.session_id)
    with live.http() as http:
        res = http.get(f"/api/sessions/{live.session_id}/rounds")
        listed = res.json()
        assert res.headers["x-total-count"] == str(len(records)) == "2"
        assert [(r["round"], r["status"], r["participants"], r["selected"]) for r in listed] == [
            (1, "completed", 3, 4),
            (2, "completed", 3, 4),
        ]
        assert all(r["rejected"] == 1 for r in listed)
        paged = http.get(f"/api/sessions/{live.session_id}/rounds", params={"limit": 1})
        assert [r["round"] for r in paged.json()] == [1] and "next" in paged.links

        detail = http.get(f"/api/sessions/{live.session_id}/rounds/1").json()
        record = records[0]
        assert detail["task_id"] == record.task_id and detail["attempts"] == 1
        assert sorted(detail["selected"]) == sorted(record.devices)
        assert "rogue-1" in detail["selected"]
        got = {p["device"]: p for p in detail["participants"]}
        assert set(got) == {p["device"] for p in record.participants} and "rogue-1" not in got
        for p in record.participants:
            assert got[p["device"]]["region"] == "region-0"
            assert got[p["device"]]["examples"] == p["n"] > 0
            assert got[p["device"]]["metrics"] == p["metrics"]
        assert [j["device"] for j in detail["rejections"]] == ["rogue-1"]
        assert detail["rejections"][0]["reason"] == record.rejected[0]["reason"] != ""
        assert detail["metrics"] == record.metrics and "accuracy" in detail["metrics"]

        for path, why in [
            ("/rounds/9", "no round 9"),
            ("/rounds/1?attempt=3", "no attempt 3"),
        ]:
            res = http.get(f"/api/sessions/{live.session_id}{path}")
            assert res.status_code == 404 and why in res.json()["detail"], path


def test_models_lineage_follows_the_parent_chain(live: Live) -> None:
    stored = live.store.list_models(live.session_id)
    assert len(stored) == 3  # the initial model and one per round
    with live.http() as http:
        page = http.get(f"/api/sessions/{live.session_id}/models", params={"limit": 1, "offset": 1})
        assert [m["version"] for m in page.json()] == [stored[1].version]
        assert page.headers["x-total-count"] == "3" and set(page.links) == {"first", "prev", "next"}
        last = stored[-1].version
        lineage = http.get(f"/api/sessions/{live.session_id}/models/{last}/lineage").json()
        walked, at = [], live.store.get_model(last)
        while at is not None:  # the store's own parent pointers
            walked.append(at.version)
            at = live.store.get_model(at.parent) if at.parent else None
        assert [m["version"] for m in lineage["chain"]] == walked
        assert len(walked) == 3 and lineage["complete"] is True
        assert lineage["chain"][-1]["parent"] is None and lineage["chain"][-1]["round"] == 0
        one = http.get(f"/api/sessions/{live.session_id}/models/{last}").json()
        assert one["digest"] == stored[-1].digest and one["parent"] == stored[-2].version
        blob = http.get(f"/api/sessions/{live.session_id}/models/{last}/download").content
        assert hashlib.sha256(blob).hexdigest() == stored[-1].digest
        missing = http.get(f"/api/sessions/{live.session_id}/models/nope/lineage")
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]


def test_projects_count_the_sessions_of_the_bound_project(live: Live) -> None:
    mine = [s for s in live.store.list_sessions() if s.project == live.project]
    with live.http() as http:
        res = http.get("/api/projects")
        assert res.headers["x-total-count"] == "1"
        [project] = res.json()
        assert project["project"] == live.project and project["sessions"] == len(mine)
        by_status: dict[str, int] = {}
        for s in mine:
            by_status[s.status] = by_status.get(s.status, 0) + 1
        assert project["by_status"] == by_status
        assert http.get(f"/api/projects/{live.project}").json() == project
        assert http.get("/api/projects/other").status_code == 404  # not this API's project


def _package_bytes(tmp_path: Path) -> bytes:
    model = tmp_path / "softmax.onnx"
    model.write_bytes(digits_softmax_onnx())
    return build_package(model, name="digits-softmax", labels=10).dumps()


def test_package_upload_is_checked_stored_for_the_controller_and_listed(
    live: Live, tmp_path
) -> None:
    data = _package_bytes(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    with live.http() as viewer:
        assert viewer.get("/api/packages").json() == []
        refused = viewer.post("/api/packages", content=data)
        assert refused.status_code == 403 and refused.headers["content-type"] == PROBLEM
    with live.http(Role.operator) as http:
        res = http.post(
            "/api/packages", content=data, headers={"Content-Type": "application/octet-stream"}
        )
        assert res.status_code == 201, res.text
        body = res.json()
        assert res.headers["location"] == f"/api/packages/{digest}"
        assert (body["digest"], body["size"], body["name"]) == (digest, len(data), "digits-softmax")
        assert body["id"] == f"pkg-{digest[:32]}" and body["framework"] == "onnx"
        # where the controller looks for it when a session names the digest
        package, blob = live.controller.load_package(digest)
        assert blob == data and package.digest == digest
        again = http.post("/api/packages", content=data)
        assert again.status_code == 200 and again.json()["digest"] == digest
        listed = http.get("/api/packages")
        assert [p["digest"] for p in listed.json()] == [digest]
        assert listed.headers["x-total-count"] == "1"
        assert http.get(f"/api/packages/{digest}").json()["size"] == len(data)
        assert http.get(f"/api/packages/{'0' * 64}").status_code == 404

        broken = bytearray(data)
        broken[-5] ^= 0xFF  # inside the last file: its SHA-256 no longer matches the manifest
        for bad, why in [
            (bytes(broken), "sha256"),
            (b'{"not": "a package"}', "not an edgefl model package"),
            (b"", "empty"),
        ]:
            res = http.post("/api/packages", content=bad)
            assert res.status_code == 422 and res.headers["content-type"] == PROBLEM, why
            problem = res.json()
            assert problem["type"] == "urn:edgefl:problem:invalid-package"
            assert why in problem["detail"].lower(), problem
        text = {"Content-Type": "text/plain"}
        wrong_type = http.post("/api/packages", content=data, headers=text)
        assert wrong_type.status_code == 415
    # the package, and beside it the projects that added it (docs/storage.md 4.1)
    stored = sorted(p.name for p in live.models_dir.glob("pkg-*"))
    assert stored == [f"pkg-{digest}", f"pkg-{digest}.owners"]
    owners = json.loads((live.models_dir / f"pkg-{digest}.owners").read_text())
    assert owners == {"format": 1, "projects": [live.project]}


def test_package_uploads_over_the_cap_are_refused(tmp_path) -> None:
    from edgefl.store import make_store

    store = make_store(f"sqlite:///{tmp_path / 's.db'}")
    auth = AuthConfig(secret=generate_secret())
    try:
        blobs = FileBlobStore(tmp_path / "models")
        app = create_app(store, auth, project="p", blobs=blobs, max_package_bytes=4096)
        client = TestClient(app)
        client.headers["Authorization"] = f"Bearer {auth.issuer().issue('o', Role.operator, 'p')}"
        res = client.post("/api/packages", content=_package_bytes(tmp_path))  # ~14 kB
        assert res.status_code == 413 and res.headers["content-type"] == PROBLEM
        assert "4096-byte cap" in res.json()["detail"]
        assert not list((tmp_path / "models").iterdir())
        no_blobs = TestClient(create_app(store, auth, project="p"))
        no_blobs.headers.update(client.headers)
        res = no_blobs.get("/api/packages")
        assert res.status_code == 409 and "--models" in res.json()["detail"]
    finally:
        store.close()


def test_the_openapi_document_lists_every_resource_with_models(live: Live) -> None:
    doc = httpx.get(f"{live.url}/api/openapi.json", timeout=10).json()
    paths = doc["paths"]
    wanted = {
        ("get", "/api/projects"): "ProjectSummary",
        ("get", "/api/projects/{project}"): "ProjectSummary",
        ("get", "/api/sessions"): "SessionSummary",
        ("get", "/api/sessions/{session_id}"): "SessionDetail",
        ("post", "/api/sessions/{session_id}/stop"): "StopAccepted",
        ("get", "/api/sessions/{session_id}/rounds"): "RoundSummary",
        ("get", "/api/sessions/{session_id}/rounds/{round_}"): "RoundDetail",
        ("get", "/api/sessions/{session_id}/models"): "ModelSummary",
        ("get", "/api/sessions/{session_id}/models/{version}"): "ModelSummary",
        ("get", "/api/sessions/{session_id}/models/{version}/lineage"): "Lineage",
        ("get", "/api/packages"): "PackageSummary",
        ("get", "/api/packages/{digest}"): "PackageSummary",
        ("post", "/api/packages"): "PackageSummary",
        ("get", "/api/whoami"): "WhoAmI",
        ("get", "/api/keys"): "Keys",
        ("post", "/api/devices/{device}/revoke"): "Revoked",
    }
    for (method, path), model in wanted.items():
        op = paths[path][method]
        ok = next(code for code in op["responses"] if code.startswith("2"))
        schema = op["responses"][ok]["content"]["application/json"]["schema"]
        ref = schema.get("$ref") or schema.get("items", {}).get("$ref", "")
        assert ref == f"#/components/schemas/{model}", (method, path, schema)
    download = paths["/api/sessions/{session_id}/models/{version}/download"]["get"]
    assert "application/cbor" in download["responses"]["200"]["content"]
    upload = paths["/api/packages"]["post"]["requestBody"]["content"]
    assert upload["application/octet-stream"]["schema"]["format"] == "binary"
    schemas = doc["components"]["schemas"]
    assert {"device", "region", "examples", "metrics"} <= set(schemas["Participant"]["properties"])
    assert set(schemas["Rejection"]["properties"]) == {"device", "reason"}
    for path in ("/api/sessions", "/api/sessions/{session_id}/rounds", "/api/packages"):
        names = {p["name"] for p in paths[path]["get"]["parameters"]}
        assert {"limit", "offset"} <= names, path
