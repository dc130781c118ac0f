"""The SQL state store (SQLAlchemy 2.0): SQLite by default, PostgreSQL by URL.

Only portable SQL and JSON columns, so the same code serves both. The schema carries a
version row; a store refuses to open a database written by a newer edgefl.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from edgefl.store.base import ModelRecord, RoundRecord, SessionRecord

SCHEMA_VERSION = 1


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


def _session_record(row: _Session) -> SessionRecord:
    return SessionRecord(
        row.session_id,
        row.project,
        dict(row.config),
        row.status,
        row.current_round,
        row.model_version,
        row.created,
        row.updated,
    )


def _round_record(row: _Round) -> RoundRecord:
    return RoundRecord(
        row.task_id,
        row.session_id,
        row.round,
        row.attempt,
        row.status,
        row.model_in,
        row.model_out,
        list(row.devices),
        list(row.participants),
        dict(row.metrics),
        row.reason,
        row.started,
        row.finished,
    )


def _model_record(row: _Model) -> ModelRecord:
    return ModelRecord(
        row.version,
        row.parent,
        row.session_id,
        row.round,
        row.digest,
        row.size,
        row.created,
        dict(row.meta),
    )


class SqlStore:
    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
        self.url = url
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()  # SQLite allows one writer; serialise ours
        _Base.metadata.create_all(self.engine)
        self._check_schema()

    def _check_schema(self) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(_Meta, "schema_version")
            if row is None:
                s.add(_Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise SchemaError(
                    f"{self.url}: schema version {row.value} is newer than this edgefl "
                    f"supports ({SCHEMA_VERSION}); upgrade edgefl"
                )

    def _write(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # sessions ---------------------------------------------------------------------------
    def create_session(self, record: SessionRecord) -> None:
        with self._lock, self._write() as s, s.begin():
            if s.get(_Session, record.session_id) is not None:
                raise ValueError(f"session {record.session_id!r} already exists")
            s.add(_Session(**vars(record)))

    def get_session(self, session_id: str) -> SessionRecord | None:
        with Session(self.engine) as s:
            row = s.get(_Session, session_id)
            return _session_record(row) if row else None

    def list_sessions(self) -> list[SessionRecord]:
        with Session(self.engine) as s:
            rows = s.scalars(select(_Session).order_by(_Session.created)).all()
            return [_session_record(r) for r in rows]

    def update_session(
        self,
        session_id: str,
        *,
        status: str | None = None,
        current_round: int | None = None,
        model_version: str | None = None,
    ) -> None:
        with self._lock, self._write() as s, s.begin():
            row = s.get(_Session, session_id)
            if row is None:
                raise KeyError(f"unknown session {session_id!r}")
            if status is not None:
                row.status = status
            if current_round is not None:
                row.current_round = current_round
            if model_version is not None:
                row.model_version = model_version
            row.updated = time.time()

    # models -----------------------------------------------------------------------------
    def add_model(self, record: ModelRecord) -> None:
        with self._lock, self._write() as s, s.begin():
            s.add(_Model(**vars(record)))

    def get_model(self, version: str) -> ModelRecord | None:
        with Session(self.engine) as s:
            row = s.get(_Model, version)
            return _model_record(row) if row else None

    def list_models(self, session_id: str | None = None) -> list[ModelRecord]:
        q = select(_Model).order_by(_Model.created)
        if session_id is not None:
            q = q.where(_Model.session_id == session_id)
        with Session(self.engine) as s:
            return [_model_record(r) for r in s.scalars(q).all()]

    # rounds -----------------------------------------------------------------------------
    def start_round(self, record: RoundRecord) -> None:
        with self._lock, self._write() as s, s.begin():
            if s.get(_Round, record.task_id) is not None:
                raise ValueError(f"round {record.task_id!r} already exists")
            s.add(_Round(**vars(record)))

    def finish_round(
        self,
        task_id: str,
        *,
        status: str,
        model_out: str | None,
        participants: list[dict[str, Any]],
        metrics: dict[str, float],
        reason: str = "",
        finished: float,
    ) -> None:
        with self._lock, self._write() as s, s.begin():
            row = s.get(_Round, task_id)
            if row is None:
                raise KeyError(f"unknown round {task_id!r}")
            row.status, row.model_out, row.reason, row.finished = (
                status,
                model_out,
                reason,
                finished,
            )
            row.participants = list(participants)
            row.metrics = dict(metrics)

    def get_round(self, task_id: str) -> RoundRecord | None:
        with Session(self.engine) as s:
            row = s.get(_Round, task_id)
            return _round_record(row) if row else None

    def list_rounds(self, session_id: str) -> list[RoundRecord]:
        q = (
            select(_Round)
            .where(_Round.session_id == session_id)
            .order_by(_Round.round, _Round.attempt)
        )
        with Session(self.engine) as s:
            return [_round_record(r) for r in s.scalars(q).all()]

    def close(self) -> None:
        self.engine.dispose()
