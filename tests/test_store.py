"""State store (SQLite through SQLAlchemy) and filesystem blob store."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from edgefl.store import make_store
from edgefl.store.base import ModelRecord, RoundRecord, SessionRecord
from edgefl.store.blobs import FileBlobStore
from edgefl.store.sql import REASON_MAX, SCHEMA_VERSION, SchemaError, SqlStore


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
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_sessions_rounds_models_round_trip_and_survive_reopen(url) -> None:
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


def test_update_and_finish_change_only_what_they_are_given(url) -> None:
    store = make_store(url)
    assert isinstance(store, SqlStore)
    store.create_session(_session())
    store.update_session("s1", status="stopped")
    sess = store.get_session("s1")
    assert (sess.status, sess.current_round, sess.model_version) == ("stopped", 0, "s1-r0000")
    store.update_session("s1", current_round=2)
    assert store.get_session("s1").status == "stopped"

    store.start_round(_round("s1", 1))
    with pytest.raises(ValueError):
        store.start_round(_round("s1", 1))
    before = store.get_round("s1:1:0")
    assert (before.status, before.model_out, before.finished, before.metrics) == (
        "running",
        None,
        None,
        {},
    )
    store.finish_round(
        "s1:1:0",
        status="failed",
        model_out=None,
        participants=[],
        metrics={"updates": 0.0},
        reason="x" * (REASON_MAX + 500),  # PostgreSQL would reject an over-long reason
        finished=9.0,
    )
    after = store.get_round("s1:1:0")
    assert (after.status, after.finished, after.metrics) == ("failed", 9.0, {"updates": 0.0})
    assert after.devices == ["d1", "d2"] and len(after.reason) == REASON_MAX

    store.add_model(ModelRecord("v", None, "s1", 0, "00" * 32, 1, 1.0))
    with pytest.raises(ValueError):
        store.add_model(ModelRecord("v", None, "s1", 0, "00" * 32, 1, 1.0))
    assert store.list_models("other") == [] and len(store.list_models()) == 1
    store.close()


def test_sessions_are_listed_oldest_first(url) -> None:
    store = make_store(url)
    for sid, created in (("b", 2.0), ("a", 3.0), ("c", 1.0)):
        store.create_session(SessionRecord(sid, "p", {}, "running", 0, "v", created, created))
    assert [s.session_id for s in store.list_sessions()] == ["c", "b", "a"]
    store.close()


def test_refuses_a_newer_schema(url) -> None:
    make_store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE edgefl_meta SET value='99' WHERE key='schema_version'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="newer"):
        make_store(url)


def test_a_refused_database_is_left_untouched(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'future.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE edgefl_meta (key VARCHAR(64) PRIMARY KEY, value TEXT)"))
        newer = SCHEMA_VERSION + 1
        conn.execute(text(f"INSERT INTO edgefl_meta VALUES ('schema_version', '{newer}')"))
    refusal = rf"schema version {newer} is newer .*\({SCHEMA_VERSION}\)"
    with pytest.raises(SchemaError, match=refusal):
        SqlStore(url)
    with engine.connect() as conn:
        tables = conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).all()
    engine.dispose()
    assert [t[0] for t in tables] == ["edgefl_meta"]


def test_new_database_records_the_current_schema_version(url) -> None:
    make_store(url).close()
    engine = create_engine(url)
    with engine.connect() as conn:
        version = conn.execute(
            text("SELECT value FROM edgefl_meta WHERE key='schema_version'")
        ).scalar()
        mode = conn.execute(text("PRAGMA journal_mode")).scalar()
    engine.dispose()
    assert version == str(SCHEMA_VERSION) and mode == "wal"


def test_a_version_1_database_is_migrated_and_keeps_its_rounds(url) -> None:
    """v1 had no ``rejected`` (rounds) or ``reason`` (sessions) column and no leases: opening
    it migrates it forward, and old rows read as the fields' defaults."""
    store = make_store(url)
    store.create_session(_session())
    store.start_round(_round("s1", 1))
    store.close()
    engine = create_engine(url)
    with engine.begin() as conn:  # turn it back into a v1 database
        conn.execute(text("ALTER TABLE rounds DROP COLUMN rejected"))
        conn.execute(text("ALTER TABLE sessions DROP COLUMN reason"))
        conn.execute(text("ALTER TABLE sessions DROP COLUMN stop_requested_by"))
        conn.execute(text("ALTER TABLE sessions DROP COLUMN stop_requested_at"))
        conn.execute(text("DROP TABLE leases"))
        conn.execute(text("UPDATE edgefl_meta SET value='1' WHERE key='schema_version'"))
    engine.dispose()
    store = make_store(url)
    old = store.get_round("s1:1:0")
    assert old is not None and old.rejected == [] and old.devices == ["d1", "d2"]
    assert store.get_session("s1").reason == ""
    assert store.acquire_lease("s1", "ctl-a", 10.0) == 1
    why = [{"device": "d2", "reason": "tensor 'W' holds NaN or infinite values"}]
    store.finish_round(
        "s1:1:0",
        status="completed",
        model_out="s1-r0001",
        participants=[],
        metrics={},
        finished=2.0,
        rejected=why,
    )
    assert store.get_round("s1:1:0").rejected == why
    store.close()
    with create_engine(url).connect() as conn:
        version = conn.execute(
            text("SELECT value FROM edgefl_meta WHERE key='schema_version'")
        ).scalar()
    assert version == str(SCHEMA_VERSION)


def test_a_version_3_database_gains_stop_requests(url) -> None:
    """v3 had no stop request columns: its sessions read as having none, and take one."""
    store = make_store(url)
    store.create_session(_session())
    store.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE sessions DROP COLUMN stop_requested_by"))
        conn.execute(text("ALTER TABLE sessions DROP COLUMN stop_requested_at"))
        conn.execute(text("UPDATE edgefl_meta SET value='3' WHERE key='schema_version'"))
    engine.dispose()
    store = make_store(url)
    try:
        old = store.get_session("s1")
        assert old is not None
        assert (old.stop_requested_by, old.stop_requested_at) == ("", None)
        assert store.request_stop("s1", "alice (operator)").stop_requested_by == "alice (operator)"
    finally:
        store.close()


def test_a_stop_request_is_kept_until_the_session_leaves_running(url) -> None:
    store = make_store(url)
    try:
        store.create_session(_session())
        before = time.time()
        first = store.request_stop("s1", "alice (operator)")
        assert first.stop_requested_by == "alice (operator)"
        assert first.stop_requested_at is not None and first.stop_requested_at >= before
        again = store.request_stop("s1", "bob (admin)")  # the first request stands
        assert (again.stop_requested_by, again.stop_requested_at) == (
            "alice (operator)",
            first.stop_requested_at,
        )
        store.update_session("s1", current_round=1)  # progress leaves the request pending
        assert store.get_session("s1").stop_requested_by == "alice (operator)"
        store.update_session("s1", status="stopped", reason="stopped by alice")
        stopped = store.get_session("s1")
        assert (stopped.stop_requested_by, stopped.stop_requested_at) == ("", None)
        with pytest.raises(ValueError, match="stopped, not running"):
            store.request_stop("s1", "alice (operator)")
        with pytest.raises(KeyError):
            store.request_stop("nope", "alice (operator)")
        store.update_session("s1", status="running", reason="")  # resumed: no stale request
        assert store.get_session("s1").stop_requested_by == ""
    finally:
        store.close()


def test_concurrent_writers(url) -> None:
    store = make_store(url)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            store.create_session(_session(f"s{t}"))
            for r in range(1, 21):
                store.start_round(_round(f"s{t}", r))
                store.update_session(f"s{t}", current_round=r)
        except BaseException as exc:
            errors.append(exc)

    done = threading.Event()

    def read() -> None:  # the dashboard reads while the controller writes
        try:
            while not done.is_set():
                for sess in store.list_sessions():
                    store.list_rounds(sess.session_id)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    done.set()
    reader.join()
    assert not errors
    assert all(store.get_session(f"s{t}").current_round == 20 for t in range(6))
    assert sum(len(store.list_rounds(f"s{t}")) for t in range(6)) == 120
    store.close()


def test_in_memory_sqlite_is_one_database_for_all_threads() -> None:
    store = make_store("sqlite://")
    store.create_session(_session())
    seen: list[object] = []
    th = threading.Thread(target=lambda: seen.append(store.get_session("s1")))
    th.start()
    th.join()
    assert seen[0] == store.get_session("s1") is not None
    store.close()


def test_blob_store(tmp_path) -> None:
    blobs = FileBlobStore(tmp_path / "b")
    blobs.put("m-r0001", b"one")
    blobs.put("m-r0001", b"two")  # atomic overwrite
    assert blobs.get("m-r0001") == b"two" and blobs.exists("m-r0001")
    assert not list((tmp_path / "b").glob(".tmp-*"))
    blobs.put("m-r0002.opt", b"")
    assert blobs.get("m-r0002.opt") == b""
    blobs.delete("m-r0001")
    blobs.delete("m-r0001")  # idempotent
    assert not blobs.exists("m-r0001")
    with pytest.raises(KeyError):
        blobs.get("m-r0001")
    (tmp_path / "secret").write_bytes(b"s")
    for bad in ("../secret", "..", "a/b", "a\\b", "/etc/passwd", "", ".hidden", "x" * 300, "é"):
        with pytest.raises(ValueError):
            blobs.put(bad, b"x")
        with pytest.raises(ValueError):
            blobs.get(bad)
        with pytest.raises(ValueError):
            blobs.delete(bad)
    assert (tmp_path / "secret").read_bytes() == b"s"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["m-r0002.opt"]


def test_blob_overwrite_is_atomic_for_concurrent_readers(tmp_path) -> None:
    """A reader sees the old bytes or the new bytes, never a mix or a truncated file."""
    blobs = FileBlobStore(tmp_path)
    old, new = b"a" * 1_000_000, b"b" * 1_500_000
    blobs.put("m", old)
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            data = blobs.get("m")
            seen.add(data[:1] + str(len(data)).encode() + data[-1:])

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        blobs.put("m", new if i % 2 == 0 else old)
    done.set()
    reader.join()
    assert seen and seen <= {b"a1000000a", b"b1500000b"}
    assert not list(tmp_path.glob(".tmp-*"))


def test_model_versions_are_content_addressed(tmp_path, url) -> None:
    """A round retried after a crash must never overwrite a recorded version's bytes."""
    import numpy as np

    from edgefl.controller.model_versions import ModelRepository

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


def test_one_lease_holder_at_a_time_and_takeover_raises_the_fence(url) -> None:
    store = make_store(url)
    other = make_store(url)  # a second controller process has its own connection pool
    assert store.acquire_lease("s1", "a", 0.3) == 1
    assert other.acquire_lease("s1", "b", 0.3) is None  # held by a
    assert store.acquire_lease("s1", "a", 0.3) == 1  # the holder renews without a new fence
    assert store.renew_lease("s1", "a", 1, 0.3)
    deadline = time.time() + 5
    while (fence := other.acquire_lease("s1", "b", 10.0)) is None:  # a's lease expires
        assert time.time() < deadline
        time.sleep(0.05)
    assert fence == 2
    assert not store.renew_lease("s1", "a", 1, 10.0)  # a learns it lost the session
    other.release_lease("s1", "b", 2)
    assert store.acquire_lease("s1", "a", 10.0) == 3  # fences only ever grow
    assert store.get_lease("s1").holder == "a"
    store.close()
    other.close()


def test_racing_processes_get_the_first_lease_once(tmp_path) -> None:
    """Two processes race for a brand-new lease: exactly one wins."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    make_store(url).close()
    code = (
        "import sys; from edgefl.store import make_store; "
        "s = make_store(sys.argv[1]); print(s.acquire_lease('race', sys.argv[2], 30.0))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url, f"p{i}"], stdout=subprocess.PIPE)
        for i in range(4)
    ]
    results = [p.communicate(timeout=60)[0].decode().strip() for p in procs]
    assert sorted(results) == ["1", "None", "None", "None"], results
