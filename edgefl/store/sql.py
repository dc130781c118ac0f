"""The SQL state store (SQLAlchemy 2.0): SQLite by default, PostgreSQL by URL.

Only portable SQL and JSON columns, so the same code serves both. Opening a store migrates
its database to the current schema (Alembic, ``edgefl.store.schema``), and refuses one that a
newer edgefl wrote.

Read-modify-write calls lock the row they change (``SELECT ... FOR UPDATE`` on PostgreSQL; a
write transaction taken up front, ``BEGIN IMMEDIATE``, on SQLite), so a controller and a
dashboard in other processes cannot overwrite each other's changes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    Integer,
    Select,
    String,
    case,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from edgefl.protocol.types import Participant, Rejection, RoundStatus, SessionStatus
from edgefl.store import schema
from edgefl.store.base import (
    MEMBER_ROLES,
    CombinerChange,
    CombinerRecord,
    DeviceChange,
    DeviceRecord,
    LastAdminError,
    LeaseRecord,
    MembershipRecord,
    ModelRecord,
    ProjectRecord,
    RoundRecord,
    SessionRecord,
)
from edgefl.store.schema import SCHEMA_VERSION, SchemaError

__all__ = [
    "REASON_MAX",
    "REQUESTER_MAX",
    "SCHEMA_VERSION",
    "SchemaError",
    "SqlStore",
    "make_engine",
]

REASON_MAX = 1024  # the `reason` column's length; PostgreSQL rejects longer strings
REQUESTER_MAX = 256  # the `stop_requested_by` column's length


class _Base(DeclarativeBase):
    pass


class _FirstRowRace(Exception):
    """Another process inserted the row this transaction meant to create: try again."""


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
    size: Mapped[int] = mapped_column(BigInteger)  # v5: Integer before (a 2 GiB limit)
    created: Mapped[float] = mapped_column(Float)
    meta: Mapped[dict] = mapped_column(JSON)


class _Project(_Base):  # v6
    __tablename__ = "projects"
    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    active_model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    active_set_by: Mapped[str | None] = mapped_column(String(REQUESTER_MAX), nullable=True)
    active_set_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated: Mapped[float] = mapped_column(Float)


class _Membership(_Base):  # v7
    __tablename__ = "memberships"
    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(REQUESTER_MAX), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(16))
    invited_by: Mapped[str] = mapped_column(String(REQUESTER_MAX))
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class _Device(_Base):  # v5
    __tablename__ = "devices"
    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    region: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16))
    last_seen: Mapped[float] = mapped_column(Float)
    attributes: Mapped[dict] = mapped_column(JSON)
    current_task: Mapped[str] = mapped_column(String(160))
    telemetry: Mapped[dict] = mapped_column(JSON)
    telemetry_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    accepted: Mapped[int] = mapped_column(Integer)
    declined: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[int] = mapped_column(Integer)


class _Combiner(_Base):  # v5
    __tablename__ = "combiners"
    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    region: Mapped[str] = mapped_column(String(64), primary_key=True)
    combiner: Mapped[str] = mapped_column(String(128), primary_key=True)  # v8: pools
    state: Mapped[str] = mapped_column(String(16))
    last_seen: Mapped[float] = mapped_column(Float)
    current_task: Mapped[str] = mapped_column(String(160))
    current_round: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[int] = mapped_column(Integer)


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling neither wraps DDL (so a failed migration would be
    # half applied) nor lets a transaction start before its first write; we issue BEGIN
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (the dashboard) never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # a writer takes the write lock before it reads what it will change: a read-then-write
    # transaction that started as a reader could not become the writer once another
    # process had written (SQLITE_BUSY_SNAPSHOT), and would otherwise decide on stale rows
    write = conn.get_execution_options().get("edgefl_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity, and PostgreSQL refuses them: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_dumps(value: Any) -> str:
    """The one JSON encoding for both databases (SQLite would keep ``NaN``; PostgreSQL not)."""
    return json.dumps(_json_safe(value), allow_nan=False)


def _text(value: str, limit: int) -> str:
    """Fit free text in its column: PostgreSQL refuses NUL characters and over-long strings."""
    return value.replace("\x00", "")[:limit]


R = TypeVar(
    "R",
    SessionRecord,
    RoundRecord,
    ModelRecord,
    LeaseRecord,
    DeviceRecord,
    CombinerRecord,
    ProjectRecord,
    MembershipRecord,
)
FLEET_BATCH = 500  # rows locked per query in record_fleet (well under any parameter limit)
TASK_MAX = 160  # the task id columns' length


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


def _engine_url(url: str) -> URL:
    """The URL to connect with: a bare ``postgresql://`` means psycopg 3, the driver edgefl
    installs (SQLAlchemy's own default, psycopg2, is not a dependency)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_memory(url: str) -> bool:
    """Whether the URL is an in-memory SQLite database (one connection for every thread)."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def make_engine(url: str) -> Engine:
    """The store's engine for a URL: the driver, JSON encoding, pragmas and transactions that
    every connection to a state store uses (the store's own, and ``edgefl db``'s)."""
    parsed = _engine_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps}
    if sqlite:
        kwargs["connect_args"] = {"check_same_thread": False}
    else:  # a server restart must not leave the controller with dead pooled connections
        kwargs["pool_pre_ping"] = True
    if is_memory(url):  # one connection, or every thread would see its own empty database
        kwargs["poolclass"] = StaticPool
    engine = create_engine(parsed, **kwargs)
    if sqlite:
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


class SqlStore:
    """The default ``Store``: one engine per process, a short session per call.

    Writers are serialised by a process-wide lock (SQLite has a single writer anyway), and
    across processes by the database's row locks; readers run concurrently, except on an
    in-memory SQLite database, whose one shared connection is used under the lock for every
    call.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        memory = is_memory(url)
        self.engine: Engine = make_engine(url)
        self._writer = self.engine.execution_options(edgefl_write=True)
        self._lock = threading.Lock()  # SQLite allows one writer; serialise ours
        self._read_lock: contextlib.AbstractContextManager[Any] = (
            self._lock if memory else contextlib.nullcontext()
        )
        try:
            with self._lock:
                self.schema = schema.upgrade(self.engine, self._where())
        except BaseException:
            self.engine.dispose()
            raise

    def _where(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction under the process lock; a duplicate key is a ValueError."""
        with self._lock, Session(self._writer, expire_on_commit=False) as s:
            try:
                with s.begin():
                    yield s
            except IntegrityError as exc:  # another process inserted the same key first
                raise ValueError(f"conflicting write (the key exists): {exc.orig}") from None

    def _read(self) -> Session:
        return Session(self.engine)

    # sessions ---------------------------------------------------------------------------
    def create_session(self, record: SessionRecord) -> None:
        with self._write() as s:
            if s.get(_Session, record.session_id) is not None:
                raise ValueError(f"session {record.session_id!r} already exists")
            s.add(_Session(**_row_values(record)))

    def get_session(self, session_id: str) -> SessionRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Session, session_id)
            return _record(SessionRecord, row) if row else None

    @staticmethod
    def _sessions_where(
        q: Select[Any], project: str | Collection[str] | None, status: str | None
    ) -> Select[Any]:
        q = _in_projects(q, _Session.project, project)
        if status is not None:
            q = q.where(_Session.status == status)
        return q

    def list_sessions(
        self,
        project: str | Collection[str] | None = None,
        *,
        status: str | None = None,
        newest_first: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[SessionRecord]:
        order = (
            (_Session.created.desc(), _Session.session_id.desc())
            if newest_first
            else (_Session.created, _Session.session_id)
        )
        q = self._sessions_where(select(_Session), project, status).order_by(*order)
        with self._read_lock, self._read() as s:
            rows = s.scalars(_page(q, limit, offset)).all()
            return [_record(SessionRecord, r) for r in rows]

    def count_sessions(
        self, project: str | Collection[str] | None = None, *, status: str | None = None
    ) -> int:
        q = self._sessions_where(select(func.count()).select_from(_Session), project, status)
        return self._count(q)

    def _count(self, q: Select[Any]) -> int:
        with self._read_lock, self._read() as s:
            return int(s.execute(q).scalar_one())

    def transition_session(
        self, session_id: str, expected: tuple[str, ...], status: str, reason: str = ""
    ) -> SessionRecord:
        with self._write() as s:
            row = s.get(_Session, session_id, with_for_update=True)
            if row is None:
                raise KeyError(f"unknown session {session_id!r}")
            if row.status not in expected:
                raise ValueError(
                    f"session {session_id!r} is {row.status}, not {' or '.join(expected)}"
                )
            row.status = status
            row.reason = _text(reason, REASON_MAX)
            if status != "running":
                row.stop_requested_by, row.stop_requested_at = None, None
            row.updated = time.time()
            return _record(SessionRecord, row)

    def update_session(
        self,
        session_id: str,
        *,
        status: SessionStatus | None = None,
        current_round: int | None = None,
        model_version: str | None = None,
        reason: str | None = None,
    ) -> None:
        with self._write() as s:
            row = s.get(_Session, session_id, with_for_update=True)
            if row is None:
                raise KeyError(f"unknown session {session_id!r}")
            if reason is not None:
                row.reason = _text(reason, REASON_MAX)
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
        with self._write() as s:
            row = s.get(_Session, session_id, with_for_update=True)
            if row is None:
                raise KeyError(f"unknown session {session_id!r}")
            if row.status in ("created", "queued"):  # no controller runs it: stopped now
                row.status = "stopped"
                row.reason = _text(
                    f"stopped by request of {requested_by} before it ran", REASON_MAX
                )
                row.updated = time.time()
                return _record(SessionRecord, row)
            if row.status != "running":
                raise ValueError(f"session {session_id!r} is {row.status}, not running")
            if not row.stop_requested_by:
                row.stop_requested_by = _text(requested_by, REQUESTER_MAX)
                row.stop_requested_at = time.time()
            return _record(SessionRecord, row)

    # models -----------------------------------------------------------------------------
    def add_model(self, record: ModelRecord) -> None:
        with self._write() as s:
            if s.get(_Model, record.version) is not None:
                raise ValueError(f"model version {record.version!r} already exists")
            s.add(_Model(**_row_values(record)))

    def get_model(self, version: str) -> ModelRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Model, version)
            return _record(ModelRecord, row) if row else None

    def list_models(
        self, session_id: str | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[ModelRecord]:
        q = select(_Model).order_by(_Model.created, _Model.version)
        if session_id is not None:
            q = q.where(_Model.session_id == session_id)
        with self._read_lock, self._read() as s:
            return [_record(ModelRecord, r) for r in s.scalars(_page(q, limit, offset)).all()]

    def count_models(self, session_id: str | None = None) -> int:
        q = select(func.count()).select_from(_Model)
        if session_id is not None:
            q = q.where(_Model.session_id == session_id)
        return self._count(q)

    # projects ---------------------------------------------------------------------------
    def get_project(self, project: str) -> ProjectRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Project, project)
            return _record(ProjectRecord, row) if row else None

    def set_active_model(
        self, project: str, version: str | None, set_by: str = ""
    ) -> ProjectRecord:
        try:
            return self._set_active_model(project, version, set_by)
        except _FirstRowRace:  # another process created the row just now: it exists now
            return self._set_active_model(project, version, set_by)

    def _set_active_model(self, project: str, version: str | None, set_by: str) -> ProjectRecord:
        with self._write() as s:
            if version is not None:
                model = s.get(_Model, version)
                if model is None:
                    raise KeyError(f"unknown model version {version!r}")
                owner = s.get(_Session, model.session_id) if model.session_id else None
                if owner is None or owner.project != project:
                    where = f"project {owner.project!r}" if owner else "no session"
                    raise ValueError(
                        f"model version {version!r} belongs to {where}, not project {project!r}"
                    )
            row = s.get(_Project, project, with_for_update=True)
            now = time.time()
            if row is None:
                row = _Project(project=project, updated=now)
                s.add(row)
            row.active_model = version
            row.active_set_by = _text(set_by, REQUESTER_MAX) if version is not None else None
            row.active_set_at = now if version is not None else None
            row.updated = now
            try:
                s.flush()
            except IntegrityError:  # two first writers: the primary key refused this one
                raise _FirstRowRace from None
            return _record(ProjectRecord, row)

    # memberships (v7) -------------------------------------------------------------------
    def list_members(
        self, project: str | None = None, *, user: str | None = None
    ) -> list[MembershipRecord]:
        q = select(_Membership).order_by(_Membership.project, _Membership.user)
        if project is not None:
            q = q.where(_Membership.project == project)
        if user is not None:
            q = q.where(_Membership.user == user)
        with self._read_lock, self._read() as s:
            return [_record(MembershipRecord, r) for r in s.scalars(q).all()]

    def get_member(self, project: str, user: str) -> MembershipRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Membership, (project, user))
            return _record(MembershipRecord, row) if row else None

    def count_members(self, project: str) -> int:
        q = select(func.count()).select_from(_Membership).where(_Membership.project == project)
        return self._count(q)

    @staticmethod
    def _team(s: Session, project: str) -> dict[str, _Membership]:
        """The project's members, their rows locked: the last-admin check and the change it
        guards see the same team, whoever else is changing it."""
        q = select(_Membership).where(_Membership.project == project).with_for_update()
        return {r.user: r for r in s.scalars(q).all()}

    def add_member(
        self, project: str, user: str, role: str, invited_by: str = "", *, bootstrap: str = ""
    ) -> MembershipRecord:
        _check_role(role)
        if not user or len(user) > REQUESTER_MAX:
            raise ValueError(f"a user name is 1-{REQUESTER_MAX} characters")
        with self._write() as s:
            team = self._team(s, project)
            if user in team:
                raise ValueError(f"{user!r} is already a member of project {project!r}")
            now = time.time()
            by = _text(invited_by, REQUESTER_MAX)
            if not team and bootstrap and bootstrap != user:
                s.add(_Membership(project=project, user=bootstrap, role="admin",
                                  invited_by=by, created=now, updated=now))  # fmt: skip
            row = _Membership(
                project=project, user=user, role=role, invited_by=by, created=now, updated=now
            )
            s.add(row)
            s.flush()
            return _record(MembershipRecord, row)

    def set_member_role(self, project: str, user: str, role: str) -> MembershipRecord:
        _check_role(role)
        with self._write() as s:
            team = self._team(s, project)
            row = team.get(user)
            if row is None:
                raise KeyError(f"{user!r} is not a member of project {project!r}")
            if row.role == "admin" and role != "admin":
                _keep_an_admin(team, project, user, "demote")
            row.role = role
            row.updated = time.time()
            return _record(MembershipRecord, row)

    def remove_member(self, project: str, user: str) -> None:
        with self._write() as s:
            team = self._team(s, project)
            row = team.get(user)
            if row is None:
                raise KeyError(f"{user!r} is not a member of project {project!r}")
            if row.role == "admin":
                _keep_an_admin(team, project, user, "remove")
            s.delete(row)

    # rounds -----------------------------------------------------------------------------
    def start_round(self, record: RoundRecord) -> None:
        with self._write() as s:
            if s.get(_Round, record.task_id) is not None:
                raise ValueError(f"round {record.task_id!r} already exists")
            s.add(_Round(**{**_row_values(record), "reason": _text(record.reason, REASON_MAX)}))

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
        with self._write() as s:
            row = s.get(_Round, task_id, with_for_update=True)
            if row is None:
                raise KeyError(f"unknown round {task_id!r}")
            row.status, row.model_out, row.reason, row.finished = (
                status,
                model_out,
                _text(reason, REASON_MAX),
                finished,
            )
            row.participants = list(participants)
            row.rejected = list(rejected or [])
            row.metrics = dict(metrics)

    def get_round(self, task_id: str) -> RoundRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Round, task_id)
            return _record(RoundRecord, row) if row else None

    def list_rounds(
        self, session_id: str, *, limit: int | None = None, offset: int = 0
    ) -> list[RoundRecord]:
        q = (
            select(_Round)
            .where(_Round.session_id == session_id)
            .order_by(_Round.round, _Round.attempt)
        )
        with self._read_lock, self._read() as s:
            return [_record(RoundRecord, r) for r in s.scalars(_page(q, limit, offset)).all()]

    def count_rounds(self, session_id: str) -> int:
        q = select(func.count()).select_from(_Round).where(_Round.session_id == session_id)
        return self._count(q)

    # leases -----------------------------------------------------------------------------
    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> int | None:
        now = time.time()
        taken = or_(_Lease.holder == holder, _Lease.expires < now)
        with self._lock:
            try:
                with self._writer.begin() as conn:
                    # One conditional UPDATE, atomic in the database and across processes: on
                    # PostgreSQL a racing UPDATE waits for this row lock, then re-checks the
                    # WHERE against the committed row, and so finds the lease taken.

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
        with self._lock, self._writer.begin() as conn:
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
        with self._lock, self._writer.begin() as conn:
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

    # fleet: devices and combiners -------------------------------------------------------
    def record_fleet(
        self, devices: Sequence[DeviceChange], combiners: Sequence[CombinerChange] = ()
    ) -> None:
        if not devices and not combiners:
            return
        with self._write() as s:
            for start in range(0, len(devices), FLEET_BATCH):
                batch = devices[start : start + FLEET_BATCH]
                keys = {(c.project, c.device) for c in batch}
                q = select(_Device).where(tuple_(_Device.project, _Device.device).in_(keys))
                rows = {(r.project, r.device): r for r in s.scalars(q.with_for_update())}
                for change in batch:
                    row = rows.get((change.project, change.device))
                    if row is None:
                        row = _new_device(change)
                        if row is None:
                            continue
                        rows[(change.project, change.device)] = row
                        s.add(row)
                    _apply_device(row, change)
            # named changes first: they create the rows an unnamed one (the progress of a
            # region's only combiner) is then applied to
            for comb in sorted(combiners, key=lambda c: c.combiner is None):
                if comb.combiner is None:
                    cq = select(_Combiner).where(
                        _Combiner.project == comb.project, _Combiner.region == comb.region
                    )
                    found = list(s.scalars(cq.with_for_update()).all())
                    if len(found) == 1:  # none yet, or a pool: nothing to attribute it to
                        _apply_combiner(found[0], comb)
                    continue
                name = comb.combiner
                crow = s.get(_Combiner, (comb.project, comb.region, name), with_for_update=True)
                if crow is None:
                    if comb.state is None:
                        continue
                    crow = _Combiner(
                        project=comb.project,
                        region=comb.region,
                        combiner=name,
                        state=comb.state,
                        last_seen=comb.last_seen or time.time(),
                        current_task="",
                        current_round=0,
                        accepted=0,
                        rejected=0,
                    )
                    s.add(crow)
                _apply_combiner(crow, comb)

    def get_device(self, project: str, device: str) -> DeviceRecord | None:
        with self._read_lock, self._read() as s:
            row = s.get(_Device, (project, device))
            return _record(DeviceRecord, row) if row else None

    @staticmethod
    def _devices_where(
        q: Select[Any],
        project: str | Collection[str] | None,
        region: str | None,
        state: str | None,
    ) -> Select[Any]:
        q = _in_projects(q, _Device.project, project)
        for column, value in (
            (_Device.region, region),
            (_Device.state, state),
        ):
            if value is not None:
                q = q.where(column == value)
        return q

    def list_devices(
        self,
        project: str | Collection[str] | None = None,
        *,
        region: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[DeviceRecord]:
        q = self._devices_where(select(_Device), project, region, state)
        q = q.order_by(_Device.project, _Device.device)
        with self._read_lock, self._read() as s:
            return [_record(DeviceRecord, r) for r in s.scalars(_page(q, limit, offset)).all()]

    def count_devices(
        self,
        project: str | Collection[str] | None = None,
        *,
        region: str | None = None,
        state: str | None = None,
    ) -> int:
        q = select(func.count()).select_from(_Device)
        return self._count(self._devices_where(q, project, region, state))

    def list_combiners(self, project: str | Collection[str] | None = None) -> list[CombinerRecord]:
        q = select(_Combiner).order_by(_Combiner.project, _Combiner.region, _Combiner.combiner)
        q = _in_projects(q, _Combiner.project, project)
        with self._read_lock, self._read() as s:
            return [_record(CombinerRecord, r) for r in s.scalars(q).all()]

    def close(self) -> None:
        """Release pooled connections; the store must not be used afterwards."""
        self.engine.dispose()


def _check_role(role: str) -> None:
    if role not in MEMBER_ROLES:
        raise ValueError(f"unknown role {role!r}: use {', '.join(MEMBER_ROLES)}")


def _keep_an_admin(team: dict[str, _Membership], project: str, user: str, verb: str) -> None:
    """Refuse to take the admin role from the project's only admin."""
    if not any(u != user and r.role == "admin" for u, r in team.items()):
        raise LastAdminError(
            f"cannot {verb} {user!r}: the last admin of project {project!r} (make another "
            "member admin first)"
        )


def _in_projects(q: Select[Any], column: Any, project: str | Collection[str] | None) -> Select[Any]:
    """Filter on one project (a string) or several (any other collection; empty: none)."""
    if project is None:
        return q
    if isinstance(project, str):
        return q.where(column == project)
    return q.where(column.in_(sorted(project)))


def _page(q: Select[Any], limit: int | None, offset: int) -> Select[Any]:
    """A page of a query, cut by the database (``OFFSET`` alone when there is no limit)."""
    if offset:
        q = q.offset(offset)
    return q.limit(limit) if limit is not None else q


def _new_device(change: DeviceChange) -> _Device | None:
    """A first row for a device, or None when the change cannot start one (no region/state)."""
    if change.region is None or change.state is None:
        return None
    return _Device(
        project=change.project,
        device=change.device,
        region=change.region,
        state=change.state,
        last_seen=change.last_seen or time.time(),
        attributes={},
        current_task="",
        telemetry={},
        telemetry_at=None,
        accepted=0,
        declined=0,
        rejected=0,
    )


def _apply_device(row: _Device, c: DeviceChange) -> None:
    if c.region is not None:
        row.region = c.region
    if c.state is not None:
        row.state = c.state
    if c.last_seen is not None:
        row.last_seen = max(row.last_seen or 0.0, c.last_seen)
    if c.attributes is not None:
        row.attributes = dict(c.attributes)
    if c.current_task is not None:
        row.current_task = _text(c.current_task, TASK_MAX)
    if c.telemetry is not None:
        row.telemetry = dict(c.telemetry)
        row.telemetry_at = c.telemetry_at
    row.accepted = (row.accepted or 0) + c.accepted
    row.declined = (row.declined or 0) + c.declined
    row.rejected = (row.rejected or 0) + c.rejected


def _apply_combiner(row: _Combiner, c: CombinerChange) -> None:
    if c.combiner is not None:
        row.combiner = _text(c.combiner, 128)
    if c.state is not None:
        row.state = c.state
    if c.last_seen is not None:
        row.last_seen = max(row.last_seen or 0.0, c.last_seen)
    if c.current_task is not None:
        row.current_task = _text(c.current_task, TASK_MAX)
    if c.current_round is not None:
        row.current_round = c.current_round
    row.accepted = (row.accepted or 0) + c.accepted
    row.rejected = (row.rejected or 0) + c.rejected
