"""The REST API over a real SQLite store."""

from __future__ import annotations

from fastapi.testclient import TestClient

from edgefl.api.app import create_app
from edgefl.store import make_store
from edgefl.store.base import ModelRecord, RoundRecord, SessionRecord


def _filled_store(path):  # noqa: ANN001, ANN202
    store = make_store(f"sqlite:///{path}")
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
    return store


def test_endpoints(tmp_path) -> None:  # noqa: ANN001
    store = _filled_store(tmp_path / "s.db")
    client = TestClient(create_app(store))
    assert client.get("/api/health").json() == {"status": "ok"}
    sessions = client.get("/api/sessions").json()
    assert [s["session_id"] for s in sessions] == ["s1"]
    assert sessions[0]["rounds"] == 5 and sessions[0]["current_round"] == 2
    assert client.get("/api/sessions/s1").json()["config"]["aggregator"] == "fedavg"
    rounds = client.get("/api/sessions/s1/rounds").json()
    assert [r["metrics"]["accuracy"] for r in rounds] == [0.4, 0.8]
    assert rounds[0]["duration_s"] == 0.5 and rounds[0]["participants"] == 1
    models = client.get("/api/sessions/s1/models").json()
    assert [m["parent"] for m in models] == [None, "s1-r0000", "s1-r0001"]
    assert client.get("/api/sessions/nope").status_code == 404
    assert client.get("/api/sessions/nope/rounds").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and 'id="accuracy-chart"' in page.text
    store.close()
