"""Schema version 4: sessions, leases, rounds, models, and edgefl_meta.

Revision ID: 0001
Revises: (none)

The first Alembic revision creates schema version 4 in an empty database. A database from
before Alembic (``edgefl_meta.schema_version`` 1 to 4, no revision yet) is brought forward
with the statements the old hand-written migrator ran, one version after another, so that it
ends exactly where a new database starts. The table definitions are frozen here on purpose:
they must not follow ``edgefl.store.sql``'s models, which describe the *newest* schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
schema_version = 4  # edgefl_meta's schema_version once this revision has run

# schema version -> the statements that took a database of that version to the next one
_LEGACY_STEPS: dict[int, list[str]] = {
    1: ["ALTER TABLE rounds ADD COLUMN rejected JSON"],
    2: ["ALTER TABLE sessions ADD COLUMN reason VARCHAR(1024)"],  # (+ the leases table)
    3: [
        "ALTER TABLE sessions ADD COLUMN stop_requested_by VARCHAR(256)",
        "ALTER TABLE sessions ADD COLUMN stop_requested_at FLOAT",
    ],
}


def _tables() -> dict[str, tuple[list[sa.Column[object]], list[tuple[str, str]]]]:
    """Schema version 4, table by table: its columns and its (index name, column) pairs."""
    return {
        "edgefl_meta": (
            [
                sa.Column("key", sa.String(64), primary_key=True),
                sa.Column("value", sa.String(256), nullable=False),
            ],
            [],
        ),
        "sessions": (
            [
                sa.Column("session_id", sa.String(64), primary_key=True),
                sa.Column("project", sa.String(64), nullable=False),
                sa.Column("config", sa.JSON(), nullable=False),
                sa.Column("status", sa.String(16), nullable=False),
                sa.Column("current_round", sa.Integer(), nullable=False),
                sa.Column("model_version", sa.String(128), nullable=False),
                sa.Column("created", sa.Float(), nullable=False),
                sa.Column("updated", sa.Float(), nullable=False),
                sa.Column("reason", sa.String(1024), nullable=True),
                sa.Column("stop_requested_by", sa.String(256), nullable=True),
                sa.Column("stop_requested_at", sa.Float(), nullable=True),
            ],
            [("ix_sessions_project", "project")],
        ),
        "leases": (
            [
                sa.Column("session_id", sa.String(64), primary_key=True),
                sa.Column("holder", sa.String(128), nullable=False),
                sa.Column("fence", sa.Integer(), nullable=False),
                sa.Column("expires", sa.Float(), nullable=False),
            ],
            [],
        ),
        "rounds": (
            [
                sa.Column("task_id", sa.String(160), primary_key=True),
                sa.Column("session_id", sa.String(64), nullable=False),
                sa.Column("round", sa.Integer(), nullable=False),
                sa.Column("attempt", sa.Integer(), nullable=False),
                sa.Column("status", sa.String(16), nullable=False),
                sa.Column("model_in", sa.String(128), nullable=False),
                sa.Column("model_out", sa.String(128), nullable=True),
                sa.Column("devices", sa.JSON(), nullable=False),
                sa.Column("participants", sa.JSON(), nullable=False),
                sa.Column("rejected", sa.JSON(), nullable=True),
                sa.Column("metrics", sa.JSON(), nullable=False),
                sa.Column("reason", sa.String(1024), nullable=False),
                sa.Column("started", sa.Float(), nullable=False),
                sa.Column("finished", sa.Float(), nullable=True),
            ],
            [("ix_rounds_session_id", "session_id")],
        ),
        "models": (
            [
                sa.Column("version", sa.String(128), primary_key=True),
                sa.Column("parent", sa.String(128), nullable=True),
                sa.Column("session_id", sa.String(64), nullable=True),
                sa.Column("round", sa.Integer(), nullable=True),
                sa.Column("digest", sa.String(64), nullable=False),
                sa.Column("size", sa.Integer(), nullable=False),
                sa.Column("created", sa.Float(), nullable=False),
                sa.Column("meta", sa.JSON(), nullable=False),
            ],
            [("ix_models_session_id", "session_id")],
        ),
    }


def _legacy_version(bind: sa.engine.Connection) -> int | None:
    """The schema version a database from before Alembic recorded, or None when it has none."""
    if not sa.inspect(bind).has_table("edgefl_meta"):
        return None
    raw = bind.execute(sa.text("SELECT value FROM edgefl_meta WHERE key = 'schema_version'"))
    value = raw.scalar()
    return None if value is None else int(value)


def upgrade() -> None:
    bind = op.get_bind()
    found = _legacy_version(bind)
    for version in range(found or schema_version, schema_version):
        for statement in _LEGACY_STEPS[version]:
            op.execute(statement)
    # An empty database gets every table; an old one the tables its version lacked (leases,
    # before v3). Old releases did the same with create_all, so a crash between their table
    # creation and their version row also ends here, complete.
    existing = set(sa.inspect(bind).get_table_names())
    for name, (columns, indexes) in _tables().items():
        if name in existing:
            continue
        op.create_table(name, *columns)
        for index, column in indexes:
            op.create_index(index, name, [column])
    if found is None:
        op.execute(
            sa.text(
                "INSERT INTO edgefl_meta (key, value) VALUES ('schema_version', :v)"
            ).bindparams(v=str(schema_version))
        )
    else:
        op.execute(
            sa.text("UPDATE edgefl_meta SET value = :v WHERE key = 'schema_version'").bindparams(
                v=str(schema_version)
            )
        )


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
