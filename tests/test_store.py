"""State store (SQLAlchemy, on SQLite and on PostgreSQL) and filesystem blob store.

Every test that takes ``url`` runs once per backend: a fresh SQLite file, and a blank database
on a real PostgreSQL (``tests/postgres.py``).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from edgefl.store import make_store
from edgefl.store.base import ModelRecord, RoundRecord, SessionRecord
from edgefl.store.blobs import FileBlobStore
from edgefl.store.schema import META_TABLE, VERSION_TABLE, script_directory
from edgefl.store.sql import REASON_MAX, SCHEMA_VERSION, SchemaError, SqlStore, _Base


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


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A brand-new state store URL on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


def _tables(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        return sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _meta_version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                text(f"SELECT value FROM {META_TABLE} WHERE key='schema_version'")
            ).scalar()
    finally:
        engine.dispose()


def _schema_differences(url: str) -> list:
    """What the database lacks or has beyond the models' schema (empty: it is current)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return compare_metadata(context, _Base.metadata)
    finally:
        engine.dispose()


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


def test_a_refused_database_is_left_untouched(url) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE edgefl_meta (key VARCHAR(64) PRIMARY KEY, value TEXT)"))
        newer = SCHEMA_VERSION + 1
        conn.execute(text(f"INSERT INTO edgefl_meta VALUES ('schema_version', '{newer}')"))
    engine.dispose()
    refusal = rf"schema version {newer} is newer .*\({SCHEMA_VERSION}\)"
    with pytest.raises(SchemaError, match=refusal):
        SqlStore(url)
    assert _tables(url) == ["edgefl_meta"]


def test_a_revision_from_a_newer_edgefl_is_refused_and_left_untouched(url) -> None:
    """A newer edgefl may migrate without changing the schema version: its revision alone,
    unknown here, must stop this edgefl from writing rows it cannot describe."""
    make_store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_from_the_future'"))
    engine.dispose()
    with pytest.raises(SchemaError, match=r"revision 9999_from_the_future .* is newer"):
        make_store(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        stamped = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    engine.dispose()
    assert stamped == "9999_from_the_future"


def test_new_database_records_the_current_schema_version(url) -> None:
    store = make_store(url)
    assert isinstance(store, SqlStore)
    head = script_directory().get_current_head()
    assert store.schema.current and store.schema.revision == head
    store.close()
    assert script_directory().get_revision(head).module.schema_version == SCHEMA_VERSION
    assert _meta_version(url) == str(SCHEMA_VERSION)
    assert _schema_differences(url) == []  # the migrations build exactly the models' schema
    if url.startswith("sqlite"):
        engine = create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        engine.dispose()


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
        conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))  # from before Alembic
        conn.execute(text("DROP TABLE devices"))  # and so before schema 5
        conn.execute(text("DROP TABLE combiners"))
        conn.execute(text("DROP TABLE projects"))  # and schema 6
        conn.execute(text("DROP TABLE memberships"))  # and schema 7
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
    assert _meta_version(url) == str(SCHEMA_VERSION)
    assert _schema_differences(url) == []


def test_a_version_3_database_gains_stop_requests(url) -> None:
    """v3 had no stop request columns: its sessions read as having none, and take one."""
    store = make_store(url)
    store.create_session(_session())
    store.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE sessions DROP COLUMN stop_requested_by"))
        conn.execute(text("ALTER TABLE sessions DROP COLUMN stop_requested_at"))
        conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))  # from before Alembic
        conn.execute(text("DROP TABLE devices"))  # and so before schema 5
        conn.execute(text("DROP TABLE combiners"))
        conn.execute(text("DROP TABLE projects"))  # and schema 6
        conn.execute(text("DROP TABLE memberships"))  # and schema 7
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


# The tables edgefl's schema version 3 created (before Alembic), as its create_all emitted them.
V3_DDL = [
    "CREATE TABLE edgefl_meta (key VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, "
    "PRIMARY KEY (key))",
    "CREATE TABLE sessions (session_id VARCHAR(64) NOT NULL, project VARCHAR(64) NOT NULL, "
    "config JSON NOT NULL, status VARCHAR(16) NOT NULL, current_round INTEGER NOT NULL, "
    "model_version VARCHAR(128) NOT NULL, created FLOAT NOT NULL, updated FLOAT NOT NULL, "
    "reason VARCHAR(1024), PRIMARY KEY (session_id))",
    "CREATE INDEX ix_sessions_project ON sessions (project)",
    "CREATE TABLE leases (session_id VARCHAR(64) NOT NULL, holder VARCHAR(128) NOT NULL, "
    "fence INTEGER NOT NULL, expires FLOAT NOT NULL, PRIMARY KEY (session_id))",
    "CREATE TABLE rounds (task_id VARCHAR(160) NOT NULL, session_id VARCHAR(64) NOT NULL, "
    "round INTEGER NOT NULL, attempt INTEGER NOT NULL, status VARCHAR(16) NOT NULL, "
    "model_in VARCHAR(128) NOT NULL, model_out VARCHAR(128), devices JSON NOT NULL, "
    "participants JSON NOT NULL, rejected JSON, metrics JSON NOT NULL, "
    "reason VARCHAR(1024) NOT NULL, started FLOAT NOT NULL, finished FLOAT, "
    "PRIMARY KEY (task_id))",
    "CREATE INDEX ix_rounds_session_id ON rounds (session_id)",
    "CREATE TABLE models (version VARCHAR(128) NOT NULL, parent VARCHAR(128), "
    "session_id VARCHAR(64), round INTEGER, digest VARCHAR(64) NOT NULL, size INTEGER NOT NULL, "
    "created FLOAT NOT NULL, meta JSON NOT NULL, PRIMARY KEY (version))",
    "CREATE INDEX ix_models_session_id ON models (session_id)",
    "INSERT INTO edgefl_meta VALUES ('schema_version', '3')",
    # what a v3 controller had written: a failed session, its rounds, its model and lease
    "INSERT INTO sessions VALUES ('old', 'p', '{\"rounds\": 2, \"seed\": 7}', 'failed', 1, "
    "'old-r0001-aaaaaaaa', 10.5, 20.25, 'round 2 failed 3 times')",
    "INSERT INTO rounds VALUES ('old:1:0', 'old', 1, 0, 'completed', 'old-r0000-bbbbbbbb', "
    "'old-r0001-aaaaaaaa', '[\"d1\", \"d2\"]', "
    '\'[{"device": "d1", "region": "r0", "n": 5, "metrics": {}}]\', '
    '\'[{"device": "d2", "reason": "stale"}]\', \'{"accuracy": 0.75}\', \'\', 11.0, 12.0)',
    "INSERT INTO models VALUES ('old-r0001-aaaaaaaa', 'old-r0000-bbbbbbbb', 'old', 1, "
    "'aa', 123, 12.0, '{\"metrics\": {\"accuracy\": 0.75}}')",
    "INSERT INTO leases VALUES ('old', 'ctl@host:1:abcd', 4, 0.0)",
]


def test_a_version_3_database_from_before_alembic_is_upgraded_with_its_data(url) -> None:
    """A database exactly as a v3 edgefl left it: opening it migrates it to the current
    schema in place, and every row it held reads back unchanged."""
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in V3_DDL:
            conn.execute(text(statement))
    engine.dispose()
    store = make_store(url)
    try:
        sess = store.get_session("old")
        assert sess is not None
        assert (sess.status, sess.current_round, sess.config, sess.reason) == (
            "failed",
            1,
            {"rounds": 2, "seed": 7},
            "round 2 failed 3 times",
        )
        assert (sess.created, sess.updated, sess.stop_requested_by) == (10.5, 20.25, "")
        (rnd,) = store.list_rounds("old")
        assert rnd.participants == [{"device": "d1", "region": "r0", "n": 5, "metrics": {}}]
        assert rnd.rejected == [{"device": "d2", "reason": "stale"}]
        assert (rnd.metrics, rnd.devices, rnd.finished) == ({"accuracy": 0.75}, ["d1", "d2"], 12.0)
        assert store.get_model("old-r0001-aaaaaaaa").meta == {"metrics": {"accuracy": 0.75}}
        assert store.acquire_lease("old", "ctl@host:2:ef01", 10.0) == 5  # the fence goes on
        store.update_session("old", status="running", reason="")
        assert store.request_stop("old", "alice (operator)").stop_requested_by
    finally:
        store.close()
    assert _meta_version(url) == str(SCHEMA_VERSION)
    assert _schema_differences(url) == []


def test_processes_opening_an_empty_database_together_migrate_it_once(url) -> None:
    """Controllers and a dashboard starting at once on a blank database: one migrates under
    the lock, the others find it current; none fails on a half-created schema."""
    code = (
        "import sys; from edgefl.store import make_store; "
        "s = make_store(sys.argv[1]); print(s.schema.describe()); s.close()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    outcomes = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err.decode() for _, err in outcomes]
    assert all(out.decode().strip().endswith(": current") for out, _ in outcomes)
    assert _schema_differences(url) == []


def test_a_read_modify_write_waits_for_a_concurrent_writer(url) -> None:
    """Another process stops the session while a stop request is being made: the request
    must see the stopped session and refuse, not record a stale request on top of it (which
    would stop the session again when it is resumed)."""
    store = make_store(url)
    store.create_session(_session())
    other = create_engine(url)  # another process's plain connection
    outcome: list[object] = []
    try:
        with other.connect() as conn:
            conn.execute(text("UPDATE sessions SET status = 'stopped' WHERE session_id = 's1'"))

            def ask() -> None:
                try:
                    outcome.append(store.request_stop("s1", "alice (operator)"))
                except Exception as exc:
                    outcome.append(exc)

            asker = threading.Thread(target=ask)
            asker.start()
            asker.join(0.5)
            assert asker.is_alive()  # it waits for the other writer's transaction
            conn.commit()
        asker.join(10)
        assert isinstance(outcome[0], ValueError) and "stopped, not running" in str(outcome[0])
        assert store.get_session("s1").stop_requested_by == ""
    finally:
        other.dispose()
        store.close()


def test_text_and_json_that_postgresql_refuses_are_stored_the_same_everywhere(url) -> None:
    """NUL characters (device-named tensors end up in reasons) and non-finite metrics (an
    evaluator's loss can be infinite) must not fail a write on PostgreSQL, and must read
    back the same on both backends."""
    store = make_store(url)
    try:
        store.create_session(_session())
        store.start_round(_round("s1", 1))
        store.finish_round(
            "s1:1:0",
            status="failed",
            model_out=None,
            participants=[],
            metrics={"loss": float("inf"), "accuracy": float("nan"), "updates": 2.0},
            reason="tensor 'W\x00' is malformed",
            finished=3.0,
            rejected=[{"device": "d1", "reason": "name 'a\x00b'"}],
        )
        rnd = store.get_round("s1:1:0")
        assert rnd.metrics == {"loss": None, "accuracy": None, "updates": 2.0}
        assert rnd.reason == "tensor 'W' is malformed"
        assert rnd.rejected == [{"device": "d1", "reason": "name 'a\x00b'"}]  # JSON keeps it
        assert store.request_stop("s1", "eve\x00 (operator)").stop_requested_by == "eve (operator)"
    finally:
        store.close()


def test_edgefl_db_shows_and_upgrades_an_old_database(url) -> None:
    """Operators who migrate explicitly: ``edgefl db current`` names the state, ``upgrade``
    brings it to the head revision, and a second upgrade changes nothing."""
    from typer.testing import CliRunner

    from edgefl.cli.main import app

    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in V3_DDL:
            conn.execute(text(statement))
    engine.dispose()
    head = script_directory().get_current_head()
    runner = CliRunner()
    before = runner.invoke(app, ["db", "current", "--state", url])
    assert before.exit_code == 0, before.output
    assert "from before Alembic" in before.output and "schema version 3" in before.output
    assert f"needs an upgrade to revision {head}" in before.output
    done = runner.invoke(app, ["db", "upgrade", "--state", url])
    assert done.exit_code == 0, done.output
    assert f"now revision {head}, schema version {SCHEMA_VERSION}: current" in done.output
    again = runner.invoke(app, ["db", "upgrade", "--state", url])
    assert again.exit_code == 0 and "already current" in again.output
    store = make_store(url)
    assert store.get_session("old").reason == "round 2 failed 3 times"
    store.close()


def test_edgefl_db_current_never_creates_a_sqlite_file(tmp_path) -> None:
    from typer.testing import CliRunner

    from edgefl.cli.main import app

    missing = tmp_path / "nowhere" / "state.db"
    result = CliRunner().invoke(app, ["db", "current", "--state", f"sqlite:///{missing}"])
    assert result.exit_code == 1 and "no state store at" in result.output
    assert not missing.parent.exists()


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


def test_racing_processes_get_the_first_lease_once(url) -> None:
    """Four processes race for a brand-new lease: exactly one wins."""
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


def test_a_session_runs_end_to_end_with_its_state_on_postgresql(
    mosquitto, postgres_url, tmp_path
) -> None:
    """The controller keeps a whole session on PostgreSQL: rounds, lineage and lease."""
    from edgefl.tasks import digits
    from tests.harness import Deployment, completed_accuracies

    dep = Deployment(mosquitto.url, tmp_path, state_url=postgres_url)
    try:
        dep.start_combiners(1)
        dep.start_fleet(4)
        ctl = dep.controller()
        sid, rounds = dep.run_session(ctl, rounds=3, min_devices=4, round_timeout_s=30)
    finally:
        dep.close()
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(4, 3), abs=1e-9)
    store = make_store(postgres_url)  # what a restarted controller or the dashboard reads
    try:
        sess = store.get_session(sid)
        assert (sess.status, sess.current_round) == ("completed", 3)
        assert sess.model_version == rounds[-1].model_out
        chain = [rounds[0].model_in] + [r.model_out for r in rounds]
        assert [store.get_model(v).parent for v in chain[1:]] == chain[:-1]
        lease = store.get_lease(sid)
        assert lease is not None and lease.fence == 1 and lease.expires == 0.0  # released
    finally:
        store.close()


def test_a_private_postgresql_starts_from_the_debian_binaries_and_stops() -> None:
    """The fixture's other path, taken where no server answers on 5432 (or with
    EDGEFL_TEST_PG_OWN=1): initdb and pg_ctl in a temporary directory, as a non-root user."""
    from tests.postgres import _answers, own_postgres

    with own_postgres() as server:
        assert server.own and server.port != 5432
        url = server.url()
        store = make_store(url)
        try:
            store.create_session(_session())
            assert store.get_session("s1").config == {"rounds": 3}
        finally:
            store.close()
        with server.connect() as conn:
            data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    assert not _answers(server.host, server.port)  # stopped
    assert not Path(data_dir).exists()  # and its directory removed


# schema 5: the fleet tables, pagination in the store, status transitions ------------------
def test_fleet_changes_create_rows_and_add_up_counts_across_stores(url) -> None:
    from edgefl.store.base import CombinerChange, DeviceChange

    store, other = make_store(url), make_store(url)  # two controllers' connections
    try:
        store.record_fleet(
            [
                DeviceChange("p", "d1", "r0", "online", 10.0, {"agent": "1"}),
                DeviceChange("p", "d2", "r1", "online", 11.0),
                DeviceChange("p", "ghost", current_task="p:1:0"),  # never seen: no row
                DeviceChange("q", "d1", "r0", "offline", 12.0),
            ],
            [CombinerChange("p", "r0", "comb-0", "online", 10.0)],
        )
        assert store.get_device("p", "ghost") is None
        store.record_fleet([DeviceChange("p", "d1", current_task="p:1:0", accepted=1)])
        other.record_fleet([DeviceChange("p", "d1", accepted=1, declined=2, rejected=3)])
        other.record_fleet(
            [DeviceChange("p", "d1", last_seen=5.0, telemetry={"cpu": 0.5}, telemetry_at=9.0)],
            [
                CombinerChange(
                    "p", "r0", "comb-0", current_task="s:2:0", current_round=2, accepted=4
                )
            ],
        )
        d1 = store.get_device("p", "d1")
        assert d1 is not None and (d1.region, d1.state, d1.attributes) == (
            "r0",
            "online",
            {"agent": "1"},
        )
        assert (d1.accepted, d1.declined, d1.rejected) == (2, 2, 3)
        assert (d1.current_task, d1.telemetry, d1.telemetry_at) == ("p:1:0", {"cpu": 0.5}, 9.0)
        assert d1.last_seen == 10.0  # never moves back
        store.record_fleet([DeviceChange("p", "d1", current_task="")])
        assert store.get_device("p", "d1").current_task == ""
        assert [d.device for d in store.list_devices("p")] == ["d1", "d2"]
        assert [(d.project, d.device) for d in store.list_devices()] == [
            ("p", "d1"),
            ("p", "d2"),
            ("q", "d1"),
        ]
        assert [d.device for d in store.list_devices("p", region="r1")] == ["d2"]
        assert store.count_devices(state="offline") == 1 and store.count_devices("p") == 2
        assert [d.device for d in store.list_devices("p", limit=1, offset=1)] == ["d2"]
        [comb] = other.list_combiners("p")
        assert (comb.combiner, comb.current_round, comb.accepted, comb.rejected) == (
            "comb-0",
            2,
            4,
            0,
        )
    finally:
        store.close()
        other.close()


def test_schema_8_keeps_one_row_per_pool_member_and_migrates_schema_7_rows(url) -> None:
    """Schema 7 keyed combiners by region, so a pool's members overwrote each other's row;
    schema 8 keys them by name too. Downgraded to 0004 and upgraded again, a region's row
    survives under its name, and both members of a pool keep their own counts."""
    from alembic import command

    from edgefl.store.base import CombinerChange
    from edgefl.store.schema import alembic_config

    store = make_store(url)
    store.record_fleet([], [CombinerChange("p", "r0", "comb-r0", "online", 5.0, accepted=0)])
    store.record_fleet([], [CombinerChange("p", "r0", "comb-r0", accepted=3)])
    store.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0004")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM edgefl_meta")).scalar() == "7"
        pk = inspect(conn).get_pk_constraint("combiners")["constrained_columns"]
        assert sorted(pk) == ["project", "region"]
    engine.dispose()
    store = make_store(url)  # upgrades to the head again
    try:
        [old] = store.list_combiners("p")
        assert (old.combiner, old.state, old.accepted) == ("comb-r0", "online", 3)
        store.record_fleet(
            [],
            [
                CombinerChange("p", "r1", "r1-a", "online", 6.0),
                CombinerChange("p", "r1", "r1-b", "online", 6.0),
            ],
        )
        store.record_fleet(
            [],
            [
                CombinerChange("p", "r1", "r1-a", accepted=2),
                CombinerChange("p", "r1", "r1-b", accepted=5),
            ],
        )
        rows = [(c.region, c.combiner, c.accepted) for c in store.list_combiners("p")]
        assert rows == [("r0", "comb-r0", 3), ("r1", "r1-a", 2), ("r1", "r1-b", 5)]
    finally:
        store.close()
    assert _meta_version(url) == str(SCHEMA_VERSION)
    assert _schema_differences(url) == []


def test_lists_are_paginated_in_the_store_with_counts(url) -> None:
    store = make_store(url)
    try:
        for i, (project, status) in enumerate(
            [("p", "running"), ("p", "queued"), ("q", "queued"), ("p", "completed")]
        ):
            store.create_session(SessionRecord(f"s{i}", project, {}, status, 0, "v", i, i))
        assert [s.session_id for s in store.list_sessions("p", newest_first=True)] == [
            "s3",
            "s1",
            "s0",
        ]
        assert [s.session_id for s in store.list_sessions("p", limit=1, offset=1)] == ["s1"]
        assert [s.session_id for s in store.list_sessions(status="queued")] == ["s1", "s2"]
        assert store.count_sessions("p") == 3 and store.count_sessions(status="queued") == 2
        for r in (1, 2, 3):
            store.start_round(_round("s0", r))
        assert [r.round for r in store.list_rounds("s0", limit=2, offset=1)] == [2, 3]
        assert store.count_rounds("s0") == 3 and store.count_rounds("nope") == 0
        for r in range(3):
            store.add_model(ModelRecord(f"s0-r{r}", None, "s0", r, "ab" * 32, 5, float(r)))
        assert [m.round for m in store.list_models("s0", limit=1, offset=2)] == [2]
        assert store.count_models("s0") == 3 and store.count_models() == 3
    finally:
        store.close()


def test_status_transitions_are_compare_and_set_across_stores(url) -> None:
    store = make_store(url)
    store.create_session(SessionRecord("s", "p", {}, "created", 0, "v", 1.0, 1.0))
    try:
        with pytest.raises(ValueError, match="is created, not queued"):
            store.transition_session("s", ("queued",), "running")
        assert store.transition_session("s", ("created",), "queued").status == "queued"
        with pytest.raises(KeyError):
            store.transition_session("nope", ("queued",), "running")
        # serving controllers racing to claim it, each through its own connections
        stores = [make_store(url) for _ in range(4)]
        won: list[int] = []
        lost: list[int] = []

        def claim(i: int) -> None:
            try:
                stores[i].transition_session("s", ("queued",), "running")
                won.append(i)
            except ValueError:
                lost.append(i)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in stores:
            s.close()
        assert len(won) == 1 and len(lost) == 3
        # a queued (or created) session is stopped at once: no controller runs it
        store.create_session(SessionRecord("q", "p", {}, "queued", 0, "v", 2.0, 2.0))
        stopped = store.request_stop("q", "ann (operator)")
        assert stopped.status == "stopped" and "ann (operator)" in stopped.reason
        assert stopped.stop_requested_by == ""
    finally:
        store.close()


def test_migration_0001_to_0002_keeps_the_data_and_widens_model_sizes(url) -> None:
    """A database at revision 0001 (schema 4) gains the fleet tables, keeps every row, and
    takes model blobs over 2 GiB afterwards."""
    from alembic import command

    from edgefl.store.schema import alembic_config

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(
            text(
                "INSERT INTO sessions (session_id, project, config, status, current_round, "
                "model_version, created, updated) VALUES ('old', 'p', '{\"rounds\": 2}', "
                "'completed', 2, 'old-r0002', 1.0, 2.0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO models VALUES ('old-r0002', 'old-r0001', 'old', 2, 'ab', 2147483647,"
                " 2.0, '{}')"
            )
        )
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT value FROM {META_TABLE}")).scalar() == "4"
    engine.dispose()
    store = make_store(url)
    try:
        assert store.schema.current and store.schema.schema_version == SCHEMA_VERSION
        sess = store.get_session("old")
        assert sess is not None and (sess.status, sess.config) == ("completed", {"rounds": 2})
        assert store.get_model("old-r0002").size == 2**31 - 1
        store.add_model(ModelRecord("big", None, "old", 3, "cd" * 32, 5 * 2**30, 3.0))
        assert store.get_model("big").size == 5 * 2**30
        assert store.list_devices() == [] and store.list_combiners() == []
    finally:
        store.close()
    assert _meta_version(url) == str(SCHEMA_VERSION)
    assert _schema_differences(url) == []
