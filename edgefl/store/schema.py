"""Schema versions of the SQL state store, and the Alembic migrations that move them forward.

Two markers live in every database, and both are kept by the migrations themselves:

- the Alembic revision, in ``edgefl_alembic_version``: which migration ran last;
- ``edgefl_meta.schema_version``: the on-disk schema version (4 for revision ``0001``, 5 for
  ``0002``, 6 for ``0003``, 7 for ``0004``, 8 for ``0005``). Every edgefl since the first
  reads it, so even a release from before Alembic refuses a database that a newer edgefl
  has changed, instead of writing rows it cannot describe.

A database from before Alembic has the second marker and not the first; revision ``0001``
brings it from its schema version (1 to 4) to the current schema, so the same upgrade serves
empty, old and current databases. The migrations are a package inside edgefl, configured here
in code: a pip-installed edgefl migrates with no ``alembic.ini``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

SCHEMA_VERSION = 8  # edgefl_meta's schema_version at the head revision
VERSION_TABLE = "edgefl_alembic_version"  # not "alembic_version": a shared database stays ours
META_TABLE = "edgefl_meta"
MIGRATIONS = Path(__file__).with_name("migrations")
# PostgreSQL advisory lock key held while migrating, so two controllers starting together on
# an empty database do not both create it (any constant; this one spells "edgefl").
_PG_LOCK_KEY = 0x6564_6765_666C


class SchemaError(RuntimeError):
    """The database was written by an incompatible edgefl version."""


@dataclass(frozen=True)
class SchemaState:
    """What a database says about its own schema, against what this edgefl knows."""

    revision: str | None  # the Alembic revision it is at; None before Alembic or when empty
    schema_version: int | None  # edgefl_meta's schema_version; None in an empty database
    head: str  # the newest revision this edgefl has
    known: bool  # whether this edgefl has ``revision`` (False: a newer edgefl wrote it)

    @property
    def current(self) -> bool:
        """Whether the database is at this edgefl's schema: nothing to migrate."""
        return self.revision == self.head

    def describe(self) -> str:
        """One line for operators: where the database is, and whether it needs upgrading."""
        if self.schema_version is None and self.revision is None:
            return f"empty database (head revision {self.head}, schema version {SCHEMA_VERSION})"
        at = f"revision {self.revision or '(none: from before Alembic)'}"
        at += f", schema version {self.schema_version}"
        if self.current:
            return f"{at}: current"
        if not self.known or (self.schema_version or 0) > SCHEMA_VERSION:
            return f"{at}: newer than this edgefl (head {self.head}, schema {SCHEMA_VERSION})"
        return f"{at}: needs an upgrade to revision {self.head} (schema {SCHEMA_VERSION})"


@functools.lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    """The migrations shipped in ``edgefl/store/migrations`` (loaded once per process)."""
    return ScriptDirectory.from_config(alembic_config())


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration built in code; ``connection`` is what env.py migrates."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def read_state(conn: Connection) -> SchemaState:
    """Read both markers without changing anything (a refused database stays untouched)."""
    script = script_directory()
    head = script.get_current_head()
    assert head is not None, "edgefl ships at least one migration"
    tables = set(inspect(conn).get_table_names())
    revision: str | None = None
    if VERSION_TABLE in tables:
        heads = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_heads()
        revision = heads[0] if heads else None
    version: int | None = None
    if META_TABLE in tables:
        raw = conn.execute(
            text(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'")
        ).scalar()
        if raw is not None:
            try:
                version = int(raw)
            except ValueError:
                raise SchemaError(f"unreadable schema version {raw!r}") from None
    known = revision is None or revision in {s.revision for s in script.walk_revisions()}
    return SchemaState(revision, version, head, known)


def check_supported(state: SchemaState, where: str) -> None:
    """Refuse a database that a newer edgefl wrote, before anything touches it."""
    if state.schema_version is not None and state.schema_version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: schema version {state.schema_version} is newer than this edgefl "
            f"supports ({SCHEMA_VERSION}); upgrade edgefl to open it"
        )
    if not state.known:
        raise SchemaError(
            f"{where}: schema revision {state.revision} (schema version "
            f"{state.schema_version}) is newer than this edgefl supports ({SCHEMA_VERSION}, "
            f"revision {state.head}); upgrade edgefl to open it"
        )


def inspect_schema(engine: Engine) -> SchemaState:
    """The database's schema state, read in a short transaction of its own."""
    with engine.connect() as conn:
        return read_state(conn)


def upgrade(engine: Engine, where: str) -> SchemaState:
    """Bring the database to the head revision in one transaction; its state afterwards.

    The check and the migration run under one lock (SQLite's write lock, or a PostgreSQL
    advisory lock), so of two processes opening an old or empty database together, one
    migrates and the other finds it current. DDL is transactional on both databases, so a
    failed migration leaves the database as it was.
    """
    writer = engine.execution_options(edgefl_write=True)  # BEGIN IMMEDIATE on SQLite
    with writer.connect() as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            state = read_state(conn)
            check_supported(state, where)
            if state.current:
                return state
            command.upgrade(alembic_config(conn), "head")
        return read_state(conn)
