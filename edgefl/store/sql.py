"""The SQL state store (SQLAlchemy 2.0): SQLite by default, PostgreSQL by URL.

Only portable SQL and JSON columns, so the same code serves both. The schema carries a
version row; a store refuses to open a database written by a newer edgefl.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Float,
    Integer,
    String,
    case,
    create_engine,
    event,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from edgefl.protocol.types import Participant, Rejection, RoundStatus, SessionStatus
from edgefl.store.base import LeaseRecord, ModelRecord, RoundRecord, SessionRecord

SCHEMA_VERSION = 4
# version -> the statements that bring a database of that version to the next one
_MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE rounds ADD COLUMN rejected JSON"],  # v2: why each refused update was
    2: ["ALTER TABLE sessions ADD COLUMN reason VARCHAR(1024)"],  # v3 (+ the leases table)
    3: [  # v4: an operator's pending stop request
        "ALTER TABLE sessions ADD COLUMN stop_requested_by VARCHAR(256)",
        "ALTER TABLE sessions ADD COLUMN stop_requested_at FLOAT",
    ],
}
REASON_MAX = 1024  # the `reason` column's length; PostgreSQL rejects longer strings
REQUESTER_MAX = 256  # the `stop_requested_by` column's length


class SchemaError(RuntimeError):
    """The database was written by an incompatible edgefl version."""


class _Base(DeclarativeBase):
    pass


class _Meta(_Base):
    __tablename__ = "edgefl_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class _Session(_Base):
    __tablename__ = "sessions"
    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    current_round: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(128))
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(String(REASON_MAX), nullable=True)  # NULL in v2
    stop_requested_by: Mapped[str | None] = mapped_column(String(REQUESTER_MAX), nullable=True)
    stop_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class _Lease(_Base):
    __tablename__ = "leases"
    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    fence: Mapped[int] = mapped_column(Integer)
    expires: Mapped[float] = mapped_column(Float)


class _Round(_Base):
    __tablename__ = "rounds"
    task_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    model_in: Mapped[str] = mapped_column(String(128))
    model_out: Mapped[str | None] = mapped_column(String(128), nullable=True)
    devices: Mapped[list] = mapped_column(JSON)
    participants: Mapped[list] = mapped_column(JSON)
    rejected: Mapped[list | None] = mapped_column(JSON, nullable=True)  # NULL in v1 rows
    metrics: Mapped[dict] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(String(1024))
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)


class _Model(_Base):
    __tablename__ = "models"
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    parent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    digest: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    created: Mapped[float] = mapped_column(Float)
    meta: Mapped[dict] = mapped_column(JSON)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (the dashboard) never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


R = TypeVar("R", SessionRecord, RoundRecord, ModelRecord, LeaseRecord)


def _record(cls: type[R], row: _Base) -> R:
    """Build a record from a row by field name, so reordering a dataclass cannot swap values.

    JSON columns are copied: a caller mutating a record must never touch the ORM's state.
    """
    values: dict[str, Any] = {}
    for f in fields(cls):
        v = getattr(row, f.name)
        if v is None:  # a column added by a migration: old rows read as the field's default
            if f.default_factory is not MISSING:
                v = f.default_factory()
            elif f.default is not MISSING:
                v = f.default
        values[f.name] = copy.deepcopy(v) if isinstance(v, (dict, list)) else v
    return cls(**values)


def _row_values(record: SessionRecord | RoundRecord | ModelRecord) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}


class SqlStore:
    """The default ``Store``: one engine per process, a short session per call.

    Writers are serialised by a process-wide lock (SQLite has a single writer anyway); readers
    run concurrently, except on an in-memory SQLite database, whose one shared connection is
    used under the lock for every call.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        sqlite = parsed.get_backend_name() == "sqlite"
        memory = sqlite and parsed.database in (None, "", ":memory:")
        kwargs: dict[str, Any] = {}
        if sqlite:
            kwargs["connect_args"] = {"check_same_thread": False}
        if memory:  # one connection, or every thread would see its own empty database
            kwargs["poolclass"] = StaticPool
        self.engine: Engine = create_engine(url, **kwargs)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()  # SQLite allows one writer; serialise ours
        self._read_lock: contextlib.AbstractContextManager[Any] = (
            self._lock if memory else contextlib.nullcontext()
        )
        try:
            self._open_schema()
        except BaseException:
            self.engine.dispose()
            raise

    def _stored_version(self) -> int | None:
        if not inspect(self.engine).has_table(_Meta.__tablename__):
            return None
        with self._read_lock, self._read() as s:
            row = s.get(_Meta, "schema_version")
        if row is None:
            return None
        try:
            return int(row.value)
        except ValueError:
            raise SchemaError(f"{self._where()}: unreadable schema version {row.value!r}") from None

    def _open_schema(self) -> None:
        """Check the version *before* touching anything, so a newer database stays untouched."""
        found = self._stored_version()
        if found is not None and found > SCHEMA_VERSION:
            raise SchemaError(
                f"{self._where()}: schema version {found} is newer than this edgefl "
                f"supports ({SCHEMA_VERSION}); upgrade edgefl to open it"
            )
        if found is not None and found < SCHEMA_VERSION:
            self._migrate(found)
        _Base.metadata.create_all(self.engine)
        if found is None:
            with self._lock, Session(self.engine) as s, s.begin():
                if s.get(_Meta, "schema_version") is None:
                    s.add(_Meta(key="schema_version", value=str(SCHEMA_VERSION)))

    def _migrate(self, found: int) -> None:
        """Bring an older database forward, one version per transaction."""
        for version in range(found, SCHEMA_VERSION):
            with self._lock, Session(self.engine) as s, s.begin():
                for statement in _MIGRATIONS[version]:
                    s.execute(text(statement))
                row = s.get(_Meta, "schema_version")
                if row is not None:
                    row.value = str(version + 1)

    def _where(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def _write(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _read(self) -> Session:
        return Session(self.engine)

    # sessions ---------------------------------------------------------------------------
    def create_session(self, record: SessionRecord) -> None:
        with self._lock, self._write() as s, s.begin():
            if s.get(_Session, record.session_id) is not None:
                raise ValueError(f"session {record.session_id!r} already exists")
            s.add(_Session(**_row_values(record)))

    def get_session(self, session_id: str) -> SessionRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Session, session_id)
            return _record(SessionRecord, row) if row else None

    def list_sessions(self) -> list[SessionRecord]:
        with self._read_lock, self._read() as s:
            q = select(_Session).order_by(_Session.created, _Session.session_id)
            rows = s.scalars(q).all()
            return [_record(SessionRecord, r) for r in rows]

    def update_session(
        self,
        session_id: str,
        *,
        status: SessionStatus | None = None,
        current_round: int | None = None,
        model_version: str | None = None,
        reason: str | None = None,
    ) -> None:
        with self._lock, self._write() as s, s.begin():
            row = s.get(_Session, session_id)
            if row is None:
                raise KeyError(f"unknown session {session_id!r}")
            if reason is not None:
                row.reason = reason[:REASON_MAX]
            if status is not None:
                row.status = status
                if status != "running":  # honoured or overtaken: never stop a resumed run
                    row.stop_requested_by, row.stop_requested_at = None, None
            if current_round is not None:
                row.current_round = current_round
            if model_version is not None:
                row.model_version = model_version
            row.updated = time.time()

    def request_stop(self, session_id: str, requested_by: str) -> SessionRecord:
        with self._lock, self._write() as s, s.begin():
            row = s.get(_Session, session_id)
            if row is None:
                raise KeyError(f"unknown session {session_id!r}")
            if row.status != "running":
                raise ValueError(f"session {session_id!r} is {row.status}, not running")
            if not row.stop_requested_by:
                row.stop_requested_by = requested_by[:REQUESTER_MAX]
                row.stop_requested_at = time.time()
            return _record(SessionRecord, row)

    # models -----------------------------------------------------------------------------
    def add_model(self, record: ModelRecord) -> None:
        with self._lock, self._write() as s, s.begin():
            if s.get(_Model, record.version) is not None:
                raise ValueError(f"model version {record.version!r} already exists")
            s.add(_Model(**_row_values(record)))

    def get_model(self, version: str) -> ModelRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Model, version)
            return _record(ModelRecord, row) if row else None

    def list_models(self, session_id: str | None = None) -> list[ModelRecord]:
        q = select(_Model).order_by(_Model.created, _Model.version)
        if session_id is not None:
            q = q.where(_Model.session_id == session_id)
        with self._read_lock, self._read() as s:
            return [_record(ModelRecord, r) for r in s.scalars(q).all()]

    # rounds -----------------------------------------------------------------------------
    def start_round(self, record: RoundRecord) -> None:
        with self._lock, self._write() as s, s.begin():
            if s.get(_Round, record.task_id) is not None:
                raise ValueError(f"round {record.task_id!r} already exists")
            s.add(_Round(**{**_row_values(record), "reason": record.reason[:REASON_MAX]}))

    def finish_round(
        self,
        task_id: str,
        *,
        status: RoundStatus,
        model_out: str | None,
        participants: list[Participant],
        metrics: dict[str, float],
        reason: str = "",
        finished: float,
        rejected: list[Rejection] | None = None,
    ) -> None:
        with self._lock, self._write() as s, s.begin():
            row = s.get(_Round, task_id)
            if row is None:
                raise KeyError(f"unknown round {task_id!r}")
            row.status, row.model_out, row.reason, row.finished = (
                status,
                model_out,
                reason[:REASON_MAX],
                finished,
            )
            row.participants = list(participants)
            row.rejected = list(rejected or [])
            row.metrics = dict(metrics)

    def get_round(self, task_id: str) -> RoundRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Round, task_id)
            return _record(RoundRecord, row) if row else None

    def list_rounds(self, session_id: str) -> list[RoundRecord]:
        q = (
            select(_Round)
            .where(_Round.session_id == session_id)
            .order_by(_Round.round, _Round.attempt)
        )
        with self._read_lock, self._read() as s:
            return [_record(RoundRecord, r) for r in s.scalars(q).all()]

    # leases -----------------------------------------------------------------------------
    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> int | None:
        now = time.time()
        taken = or_(_Lease.holder == holder, _Lease.expires < now)
        with self._lock:
            try:
                with self.engine.begin() as conn:
                    # one conditional UPDATE: atomic in the database, across processes too
                    done = conn.execute(
                        update(_Lease)
                        .where(_Lease.session_id == session_id, taken)
                        .values(
                            fence=case(
                                (_Lease.holder == holder, _Lease.fence), else_=_Lease.fence + 1
                            ),
                            holder=holder,
                            expires=now + ttl_s,
                        )
                    )
                    if done.rowcount == 1:
                        fence = conn.execute(
                            select(_Lease.fence).where(_Lease.session_id == session_id)
                        ).scalar_one()
                        return int(fence)
                    held = conn.execute(
                        select(_Lease.holder).where(_Lease.session_id == session_id)
                    ).first()
                    if held is not None:
                        return None
                    conn.execute(
                        insert(_Lease).values(
                            session_id=session_id, holder=holder, fence=1, expires=now + ttl_s
                        )
                    )
                    return 1
            except IntegrityError:  # another process inserted the first lease just now
                return None

    def renew_lease(self, session_id: str, holder: str, fence: int, ttl_s: float) -> bool:
        with self._lock, self.engine.begin() as conn:
            done = conn.execute(
                update(_Lease)
                .where(
                    _Lease.session_id == session_id,
                    _Lease.holder == holder,
                    _Lease.fence == fence,
                )
                .values(expires=time.time() + ttl_s)
            )
            return bool(done.rowcount == 1)

    def release_lease(self, session_id: str, holder: str, fence: int) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(
                update(_Lease)
                .where(
                    _Lease.session_id == session_id,
                    _Lease.holder == holder,
                    _Lease.fence == fence,
                )
                .values(expires=0.0)
            )

    def get_lease(self, session_id: str) -> LeaseRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Lease, session_id)
            return _record(LeaseRecord, row) if row else None

    def close(self) -> None:
        """Release pooled connections; the store must not be used afterwards."""
        self.engine.dispose()
