"""Schema version 8: one ``combiners`` row per combiner, not per region (combiner pools).

Revision ID: 0005
Revises: 0004

A region served by a combiner pool has several combiners, each with its own state and
counts; with the primary key (project, region) they overwrote each other's row. The key
becomes (project, region, combiner). The table is rebuilt under the new key (the same way on
SQLite and PostgreSQL: create, copy, drop, rename), keeping every row: a row of schema 7 is
its region's only combiner, under the name it had. The table definition is frozen here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
# edgefl_meta's schema_version after this revision: bump it, and SCHEMA_VERSION in
# edgefl/store/schema.py, so that older edgefl releases refuse the upgraded database
schema_version = 8

_COLUMNS = (
    "project, region, combiner, state, last_seen, current_task, current_round, accepted, rejected"
)


def _table(name: str, key: tuple[str, ...]) -> None:
    op.create_table(
        name,
        sa.Column("project", sa.String(64), primary_key="project" in key),
        sa.Column("region", sa.String(64), primary_key="region" in key),
        sa.Column("combiner", sa.String(128), primary_key="combiner" in key, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("current_task", sa.String(160), nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
    )


def _rebuild(key: tuple[str, ...], copy: str) -> None:
    _table("combiners_new", key)
    op.execute(sa.text(f"INSERT INTO combiners_new ({_COLUMNS}) {copy}"))
    op.drop_table("combiners")
    op.rename_table("combiners_new", "combiners")


def _set_version(version: int) -> None:
    op.execute(
        sa.text("UPDATE edgefl_meta SET value = :v WHERE key = 'schema_version'").bindparams(
            v=str(version)
        )
    )


def upgrade() -> None:
    _rebuild(("project", "region", "combiner"), f"SELECT {_COLUMNS} FROM combiners")
    _set_version(schema_version)


def downgrade() -> None:
    # one row per region again: the member seen last stands for its region
    _rebuild(
        ("project", "region"),
        f"SELECT {_COLUMNS} FROM combiners c WHERE NOT EXISTS (SELECT 1 FROM combiners d "
        "WHERE d.project = c.project AND d.region = c.region AND (d.last_seen > c.last_seen "
        "OR (d.last_seen = c.last_seen AND d.combiner > c.combiner)))",
    )
    _set_version(7)
