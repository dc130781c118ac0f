"""State store (SQLite through SQLAlchemy) and filesystem blob store."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, text

from edgefl.store import make_store
from edgefl.store.base import ModelRecord, RoundRecord, SessionRecord
from edgefl.store.blobs import FileBlobStore
from edgefl.store.sql import SchemaError


def _session(sid: str = "s1") -> SessionRecord:
    return SessionRecord(sid, "p", {"rounds": 3}, "running", 0, f"{sid}-r0000", 1.0, 1.0)


def _round(sid: str, r: int, attempt: int = 0) -> RoundRecord:
    return RoundRecord(
        f"{sid}:{r}:{attempt}",
        sid,
        r,
        attempt,
        "running",
        f"{sid}-r{r - 1:04d}",
        None,
        ["d1", "d2"],
        started=float(r),
    )


@pytest.fixture
def url(tmp_path) -> str:  # noqa: ANN001
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_sessions_rounds_models_round_trip_and_survive_reopen(url) -> None:  # noqa: ANN001
    store = make_store(url)
    store.create_session(_session())
    with pytest.raises(ValueError):
        store.create_session(_session())
    store.add_model(ModelRecord("s1-r0000", None, "s1", 0, "ab" * 32, 10, 1.0))
    store.add_model(
        ModelRecord(
            "s1-r0001", "s1-r0000", "s1", 1, "cd" * 32, 10, 2.0, {"metrics": {"accuracy": 0.5}}
        )
    )
    store.start_round(_round("s1", 2))
    store.start_round(_round("s1", 1, 1))
    store.start_round(_round("s1", 1, 0))
    store.finish_round(
        "s1:1:0",
        status="failed",
        model_out=None,
        participants=[],
        metrics={},
        reason="quorum",
        finished=5.0,
    )
    store.finish_round(
        "s1:1:1",
        status="completed",
        model_out="s1-r0001",
        participants=[{"device": "d1", "n": 3, "metrics": {}}],
        metrics={"accuracy": 0.5},
        finished=6.0,
    )
    store.update_session("s1", current_round=1, model_version="s1-r0001")
    store.close()

    again = make_store(url)  # a restarted controller sees everything
    sess = again.get_session("s1")
    assert (sess.current_round, sess.model_version, sess.config) == (1, "s1-r0001", {"rounds": 3})
    assert sess.updated > 1.0
    rounds = again.list_rounds("s1")
    assert [(r.round, r.attempt) for r in rounds] == [(1, 0), (1, 1), (2, 0)]
    assert rounds[0].reason == "quorum" and rounds[1].participants[0]["device"] == "d1"
    assert again.get_round("s1:1:1").metrics == {"accuracy": 0.5}
    assert again.get_model("s1-r0001").parent == "s1-r0000"
    assert [m.version for m in again.list_models("s1")] == ["s1-r0000", "s1-r0001"]
    assert again.get_session("nope") is None and again.get_round("nope") is None
    with pytest.raises(KeyError):
        again.update_session("nope", status="failed")
    with pytest.raises(KeyError):
        again.finish_round(
            "nope", status="failed", model_out=None, participants=[], metrics={}, finished=1.0
        )
    again.close()


def test_refuses_a_newer_schema(url) -> None:  # noqa: ANN001
    make_store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE edgefl_meta SET value='99' WHERE key='schema_version'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="newer"):
        make_store(url)


def test_concurrent_writers(url) -> None:  # noqa: ANN001
    store = make_store(url)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            store.create_session(_session(f"s{t}"))
            for r in range(1, 21):
                store.start_round(_round(f"s{t}", r))
                store.update_session(f"s{t}", current_round=r)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert all(store.get_session(f"s{t}").current_round == 20 for t in range(6))
    assert sum(len(store.list_rounds(f"s{t}")) for t in range(6)) == 120
    store.close()


def test_blob_store(tmp_path) -> None:  # noqa: ANN001
    blobs = FileBlobStore(tmp_path / "b")
    blobs.put("m-r0001", b"one")
    blobs.put("m-r0001", b"two")  # atomic overwrite
    assert blobs.get("m-r0001") == b"two" and blobs.exists("m-r0001")
    assert not list((tmp_path / "b").glob(".tmp-*"))
    blobs.delete("m-r0001")
    assert not blobs.exists("m-r0001")
    with pytest.raises(KeyError):
        blobs.get("m-r0001")
    for bad in ("../etc/passwd", "a/b", "", ".hidden", "x" * 300):
        with pytest.raises(ValueError):
            blobs.put(bad, b"x")


def test_model_versions_are_content_addressed(tmp_path, url) -> None:  # noqa: ANN001
    """A round retried after a crash must never overwrite a recorded version's bytes."""
    import numpy as np

    from edgefl.controller.models import ModelRepository

    store = make_store(url)
    repo = ModelRepository(store, FileBlobStore(tmp_path / "models"))
    first, _ = repo.save({"w": np.zeros(3)}, parent=None, session_id="s", round_=1)
    again, _ = repo.save({"w": np.zeros(3)}, parent=None, session_id="s", round_=1)
    other, _ = repo.save(
        {"w": np.ones(3)},
        parent=None,
        session_id="s",
        round_=1,
        optimizer_state={"m/w": np.ones(3)},
    )
    assert first.version == again.version != other.version
    assert first.version.startswith("s-r0001-")
    np.testing.assert_array_equal(repo.load(first.version)[0]["w"], np.zeros(3))
    np.testing.assert_array_equal(repo.load(other.version)[0]["w"], np.ones(3))
    assert repo.load_optimizer_state(other.version)["m/w"].tolist() == [1.0, 1.0, 1.0]
    assert repo.load_optimizer_state(first.version) == {}
    store.close()
