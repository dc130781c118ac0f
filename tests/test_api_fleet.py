"""Sessions made and run through the REST API, and the fleet as the controllers record it.

Real parts throughout: uvicorn serving the API over httpx, a serving controller
(``ControllerService``, as ``edgefl controller --serve``) on the embedded broker with
simulated devices in two regions, and the state store they share. A session is created and
started through the API, the serving controller runs it to the digits reference's accuracy,
and the devices and combiners are listed with the states and counts the rounds produced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from edgefl.auth.tokens import Role
from edgefl.cli.main import app as cli
from edgefl.protocol import encode
from edgefl.protocol.chunking import split_payload
from edgefl.protocol.tensors import encode_tensors
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from tests.harness import RogueDevice
from tests.serving import Fleet, serving_fleet, wait_for

PROBLEM = "application/problem+json"
DEVICES = 4


@pytest.fixture(scope="module")
def fleet(embedded_broker, tmp_path_factory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    with serving_fleet(embedded_broker.url, root, DEVICES, regions=2) as f:
        yield f


def _session(http: httpx.Client, sid: str) -> dict[str, Any]:
    res = http.get(f"/api/sessions/{sid}")
    assert res.status_code == 200, res.text
    return dict(res.json())


def _ended(http: httpx.Client, sid: str) -> dict[str, Any] | None:
    s = _session(http, sid)
    return s if s["status"] in ("completed", "failed", "stopped") else None


def test_a_session_created_and_started_through_the_api_runs_on_the_serving_controller(
    fleet: Fleet,
) -> None:
    body = {"session_id": "api-1", "rounds": 3, "min_devices": DEVICES, "round_timeout_s": 20}
    with fleet.http(Role.operator) as ops, fleet.http() as viewer:
        assert viewer.post("/api/sessions", json=body).status_code == 403
        created = ops.post("/api/sessions", json={**body, "train": {"lr": 0.1}})
        assert created.status_code == 201, created.text
        assert created.headers["location"] == "/api/sessions/api-1"
        sess = created.json()
        assert (sess["status"], sess["current_round"], sess["rounds"]) == ("created", 0, 3)
        assert sess["config"]["train"] == {
            "lr": 0.1,
            "batch_size": 32,
            "epochs": 1,
            "model": "softmax",
        }
        # the initial model is stored as the controller stores it: blob and record
        [initial] = fleet.dep.store.list_models("api-1")
        assert (initial.round, initial.parent, initial.version) == (0, None, sess["model_version"])
        assert FileBlobStore(fleet.dep.models_dir).exists(initial.version)
        time.sleep(1.0)  # created is not queued: the serving controller leaves it alone
        assert _session(viewer, "api-1")["status"] == "created"
        again = ops.post("/api/sessions", json=body)
        assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
        assert viewer.post("/api/sessions/api-1/start").status_code == 403
        started = ops.post("/api/sessions/api-1/start")
        assert started.status_code == 202 and started.json()["status"] == "queued"
        assert ops.post("/api/sessions/api-1/start").status_code in (409,)  # not created now
        done = wait_for("api-1 to end", lambda: _ended(viewer, "api-1"))
        assert (done["status"], done["current_round"]) == ("completed", 3), done
        rounds = viewer.get("/api/sessions/api-1/rounds").json()
        accs = [r["metrics"]["accuracy"] for r in rounds]
        assert [r["status"] for r in rounds] == ["completed"] * 3
        # the exact FedAvg of the single-process reference, and it learned
        assert accs == pytest.approx(digits.reference_run(DEVICES, 3), abs=1e-9)
        assert accs[-1] > 0.8
        assert "api-1" in fleet.service.ran

        # the fleet as the controller recorded it (flushed about every second)
        def settled() -> list[dict[str, Any]] | None:
            listed = viewer.get("/api/devices").json()
            ok = len(listed) == DEVICES and all(
                d["accepted"] >= 3 and d["current_task"] == "" for d in listed
            )
            return listed if ok else None

        devices = wait_for("device counts", settled, 15)
        assert {d["state"] for d in devices} == {"online"}
        assert {(d["accepted"], d["declined"], d["rejected"]) for d in devices} == {(3, 0, 0)}
        assert sorted({d["region"] for d in devices}) == ["region-0", "region-1"]
        west = viewer.get("/api/devices", params={"region": "region-0", "limit": 1})
        assert west.headers["x-total-count"] == "2" and len(west.json()) == 1
        assert 'rel="next"' in west.headers["link"]
        assert viewer.get("/api/devices", params={"state": "offline"}).json() == []
        assert viewer.get("/api/devices", params={"state": "gone"}).status_code == 422
        name = devices[0]["device"]

        def with_telemetry() -> dict[str, Any] | None:
            one = viewer.get(f"/api/devices/{name}").json()
            return one if "train_s" in one["telemetry"] else None

        one = wait_for("telemetry", with_telemetry, 15)
        assert one["telemetry"]["examples"] > 0 and one["telemetry_at"] > done["created"]
        assert one["attributes"].get("agent")  # from its status message
        assert viewer.get("/api/devices/nope").status_code == 404
        points = viewer.get("/api/telemetry", params={"device": name}).json()
        assert [p["device"] for p in points] == [name]
        assert points[0]["metrics"] == one["telemetry"]
        everyone = viewer.get("/api/telemetry").json()
        assert len(everyone) == DEVICES
        assert [p["ts"] for p in everyone] == sorted((p["ts"] for p in everyone), reverse=True)
        later = viewer.get("/api/telemetry", params={"since": time.time() + 60}).json()
        assert later == []

        combiners = viewer.get("/api/combiners").json()
        assert [c["region"] for c in combiners] == ["region-0", "region-1"]
        for c in combiners:
            assert (c["state"], c["combiner"]) == ("online", f"combiner-{c['region']}")
            assert (c["current_round"], c["accepted"], c["rejected"]) == (3, 6, 0)
            assert c["current_task"] == "api-1:3:0"


def test_create_refuses_what_no_controller_could_run(fleet: Fleet) -> None:
    with fleet.http(Role.operator) as ops:
        cases = [
            ({"model": "resnet"}, 422, "neither a built-in model"),
            ({"model": "ab" * 32}, 422, "upload it first"),
            ({"aggregator": "fedmagic"}, 422, "fedmagic"),
            ({"min_devices": 5, "max_devices": 2}, 422, "max_devices"),
            ({"rounds": 0}, 422, "rounds"),
            ({"train": {"lr": 0.1, "momentum": 9}}, 422, "momentum"),
            ({"session_id": "bad id!"}, 422, "session_id"),
        ]
        for extra, status, says in cases:
            res = ops.post("/api/sessions", json={"session_id": "refused", **extra})
            assert res.status_code == status, (extra, res.text)
            assert res.headers["content-type"] == PROBLEM and says in res.json()["detail"], extra
        assert fleet.dep.store.get_session("refused") is None
        assert ops.post("/api/sessions/nope/start").status_code == 404
        assert ops.post("/api/sessions/nope/resume").status_code == 404


def test_a_session_stopped_before_it_runs_is_never_run(fleet: Fleet) -> None:
    with fleet.http(Role.operator) as ops:
        assert (
            ops.post("/api/sessions", json={"session_id": "never", "rounds": 2}).status_code == 201
        )
        stopped = ops.post("/api/sessions/never/stop")
        assert stopped.status_code == 202 and stopped.json()["status"] == "stopped"
        sess = _session(ops, "never")
        assert sess["status"] == "stopped" and "before it ran" in sess["reason"]
        assert ops.post("/api/sessions/never/start").status_code == 409
        time.sleep(1.0)
        assert fleet.dep.store.list_rounds("never") == []
        assert "never" not in fleet.service.ran


def test_openapi_lists_the_new_resources(fleet: Fleet) -> None:
    doc = httpx.get(f"{fleet.url}/api/openapi.json", timeout=10).json()
    paths = doc["paths"]
    assert {"post", "get"} <= set(paths["/api/sessions"])
    for path in (
        "/api/sessions/{session_id}/start",
        "/api/sessions/{session_id}/resume",
    ):
        assert "post" in paths[path]
    for path in ("/api/devices", "/api/devices/{device}", "/api/combiners", "/api/telemetry"):
        assert "get" in paths[path]
    schemas = doc["components"]["schemas"]
    assert {"SessionCreate", "DeviceDetail", "CombinerSummary", "TelemetryPoint"} <= set(schemas)


def _cli(fleet: Fleet, *args: str, role: Role = Role.viewer) -> Any:
    env = {"EDGEFL_API": fleet.url, "EDGEFL_TOKEN": fleet.token(role), "COLUMNS": "200"}
    return CliRunner().invoke(cli, list(args), env=env)


def test_cli_creates_starts_and_watches_a_session_to_its_final_metrics(fleet: Fleet) -> None:
    made = _cli(
        fleet,
        "session", "create", "--id", "cli-run", "--rounds", "2",
        "--min-devices", str(DEVICES), "--lr", "0.1", "--start",
        role=Role.operator,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "session cli-run created (2 rounds)" in made.output and "queued" in made.output
    watched = _cli(fleet, "session", "watch", "cli-run", "--interval", "0.2")
    assert watched.exit_code == 0, watched.output
    rounds = fleet.dep.store.list_rounds("cli-run")
    final = " ".join(f"{k}={v:.4g}" for k, v in sorted(rounds[-1].metrics.items()))
    assert f"session cli-run completed after round 2: final {final}" in watched.output
    assert rounds[-1].metrics["accuracy"] == pytest.approx(
        digits.reference_run(DEVICES, 2)[-1], abs=1e-9
    )
    viewer_create = _cli(fleet, "session", "create", "--id", "nope")
    assert viewer_create.exit_code == 1 and "403 Forbidden" in viewer_create.output
    listed = _cli(fleet, "devices", "--region", "region-1")
    assert listed.exit_code == 0, listed.output
    region1 = [d.device for d in fleet.dep.store.list_devices(fleet.dep.project, region="region-1")]
    assert len(region1) == 2 and all(d in listed.output for d in region1)
    assert "devices 1-2 of 2" in listed.output and "online" in listed.output
    combiners = _cli(fleet, "combiners")
    assert combiners.exit_code == 0 and "combiner-region-0" in combiners.output
    bad = _cli(fleet, "devices", "--state", "asleep")
    assert bad.exit_code == 2


def _answer(kind: str) -> Callable[[RogueDevice, dict], None]:
    """A rogue's answer to every task: a decline, or an update of the wrong shape."""

    def send(rogue: RogueDevice, task: dict) -> None:
        if kind == "decline":
            payload = encode("decline", task_id=task["task_id"], reason="no camera")
        else:
            payload = encode(
                "update",
                task_id=task["task_id"],
                device=rogue.device,
                model_version=task["model_version"],
                num_examples=10,
                metrics={},
                tensors=encode_tensors({"W": np.zeros((2, 2)), "b": np.zeros(2)}),
            )
        chunks = split_payload(payload, 1 << 20, meta={"task_id": task["task_id"]})
        # from a thread: waiting for PUBACKs in paho's callback would block its own loop
        threading.Thread(
            target=lambda: [rogue.publish_update(c.to_bytes()) for c in chunks], daemon=True
        ).start()

    return send


@pytest.mark.slow
def test_stop_and_resume_through_the_api_with_tasks_declines_and_rejections(
    fleet: Fleet,
) -> None:
    """Runs last in the module: its rogue devices stay in the controller's presence."""
    dep = fleet.dep
    dep.own(RogueDevice(dep.url, dep.project, "region-0", "rogue-decline", "x", _answer("decline")))
    dep.own(RogueDevice(dep.url, dep.project, "region-1", "rogue-bad", "x", _answer("bad")))
    # one that never answers: every round waits for its deadline, so tasks can be seen
    dep.own(RogueDevice(dep.url, dep.project, "region-1", "rogue-silent", "x"))
    body = {
        "session_id": "api-2",
        "rounds": 4,
        "min_devices": DEVICES,
        "round_timeout_s": 2.5,
        "aggregator": "fedavg",
    }
    with fleet.http(Role.operator) as ops:
        assert ops.post("/api/sessions", json=body).status_code == 201
        assert ops.post("/api/sessions/api-2/start").status_code == 202

        def tasked() -> list[dict[str, Any]]:
            listed = ops.get("/api/devices", params={"limit": 100}).json()
            return [d for d in listed if d["current_task"].startswith("api-2:")]

        busy = wait_for("devices with api-2 tasks", tasked, 30)
        assert {d["device"] for d in busy} >= {"rogue-silent"}
        wait_for("round 1", lambda: _session(ops, "api-2")["current_round"] >= 1, 30)
        assert ops.post("/api/sessions/api-2/resume").status_code == 409  # running
        stop = ops.post("/api/sessions/api-2/stop")
        assert stop.status_code == 202 and stop.json()["stop_requested_by"] == "ops (operator)"
        stopped = wait_for("api-2 to stop", lambda: _ended(ops, "api-2"), 30)
        assert stopped["status"] == "stopped" and "ops (operator)" in stopped["reason"]
        at = stopped["current_round"]
        assert 1 <= at < 4
        resumed = ops.post("/api/sessions/api-2/resume")
        assert resumed.status_code == 202 and resumed.json()["status"] == "queued"
        done = wait_for("api-2 to complete", lambda: _ended(ops, "api-2"), 60)
        assert (done["status"], done["current_round"], done["reason"]) == ("completed", 4, "")
        rounds = ops.get("/api/sessions/api-2/rounds").json()
        completed = [r["round"] for r in rounds if r["status"] == "completed"]
        assert completed == [1, 2, 3, 4]  # resumed after the last completed round, none again
        lineage = dep.store.list_models("api-2")
        assert [m.round for m in lineage] == [0, 1, 2, 3, 4]
        closed = [dep.store.get_round(r["task_id"]) for r in rounds]
        assert all(r is not None and r.status != "running" for r in closed)

        def expected(device: str, declined: bool) -> int:
            return sum(
                1
                for r in closed
                for j in r.rejected
                if j["device"] == device and j["reason"].startswith("device declined") == declined
            )

        def counts() -> dict[str, dict[str, Any]] | None:
            listed = {d["device"]: d for d in ops.get("/api/devices").json()}
            idle = all(d["current_task"] == "" for d in listed.values())
            rejected = listed["rogue-bad"]["rejected"] == expected("rogue-bad", False)
            declined = listed["rogue-decline"]["declined"] == expected("rogue-decline", True)
            settled = rejected and declined
            return listed if idle and settled else None

        devices = wait_for("rogue counts", counts, 15)
    assert devices["rogue-decline"]["declined"] >= 4 and devices["rogue-bad"]["rejected"] >= 4
    assert devices["rogue-decline"]["rejected"] == 0 and devices["rogue-decline"]["accepted"] == 0
    assert devices["rogue-bad"]["declined"] == 0 and devices["rogue-bad"]["accepted"] == 0
    assert devices["rogue-silent"]["accepted"] == devices["rogue-silent"]["rejected"] == 0
    honest = [d for name, d in devices.items() if not name.startswith("rogue-")]
    participated = {d["device"]: 0 for d in honest}
    for r in closed:
        for p in r.participants:
            participated[p["device"]] += 1
    for d in honest:  # the earlier sessions' rounds, plus this one's
        assert d["accepted"] >= participated[d["device"]] >= 4
