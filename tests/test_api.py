"""The REST API over a real SQLite store."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from edgefl.api.app import create_app, require_viewer
from edgefl.store import make_store
from edgefl.store.base import ModelRecord, RoundRecord, SessionRecord, Store


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
    return store


@pytest.fixture
def store(tmp_path):
    store = _filled_store(tmp_path / "s.db")
    yield store
    store.close()


def test_sessions(store: Store) -> None:
    client = TestClient(create_app(store))
    assert client.get("/api/health").json() == {"status": "ok"}
    sessions = client.get("/api/sessions").json()
    assert [s["session_id"] for s in sessions] == ["s1", "old"]  # newest first
    assert sessions[0] == {
        "session_id": "s1",
        "project": "p",
        "status": "running",
        "current_round": 2,
        "rounds": 5,
        "aggregator": "fedavg",
        "model_version": "s1-r0002",
        "reason": "",
        "created": 1.0,
        "updated": 2.0,
    }
    one = client.get("/api/sessions/s1").json()
    assert one["config"] == {"rounds": 5, "aggregator": "fedavg"}
    assert one["status"] == "running" and one["rounds"] == 5


def test_rounds(store: Store) -> None:
    client = TestClient(create_app(store))
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
    client = TestClient(create_app(store))
    models = client.get("/api/sessions/s1/models").json()
    assert [(m["version"], m["parent"], m["round"]) for m in models] == [
        ("s1-r0000", None, 0),
        ("s1-r0001", "s1-r0000", 1),
        ("s1-r0002", "s1-r0001", 2),
    ]
    assert set(models[0]) == {"version", "parent", "round", "digest", "size", "created"}
    assert models[0]["digest"] == "00" * 32 and models[0]["size"] == 5


def test_unknown_sessions_are_404(store: Store) -> None:
    client = TestClient(create_app(store))
    for path in ("", "/rounds", "/models"):
        res = client.get(f"/api/sessions/nope{path}")
        assert res.status_code == 404 and "nope" in res.json()["detail"]


def test_dashboard_page_is_self_contained(store: Store) -> None:
    page = TestClient(create_app(store)).get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ("session-status", "round-count", "rounds-table", "accuracy-chart"):
        assert f'id="{element}"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline


def test_require_viewer_guards_every_route(store: Store) -> None:
    """The auth seam: whatever require_viewer decides applies to the page and the API alike."""
    app = create_app(store)

    def deny() -> None:
        raise HTTPException(403, "no viewer role")

    app.dependency_overrides[require_viewer] = deny
    client = TestClient(app)
    for path in ("/", "/api/sessions", "/api/sessions/s1", "/api/sessions/s1/rounds"):
        assert client.get(path).status_code == 403, path
    assert client.get("/api/health").status_code == 200  # probes stay outside the seam
    assert client.get("/docs").status_code == 404  # Swagger UI would need a CDN
