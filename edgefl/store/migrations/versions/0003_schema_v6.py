"""Schema version 6: the ``projects`` table, holding each project's active model version.

Revision ID: 0003
Revises: 0002

Operators promote one model version per project (``PUT /api/projects/{p}/active-model``);
new sessions can start from it (``initial_model: "active"``). A project had no row of its
own before: it was only a name on sessions. Rows are created when a project's settings are
first written, so an upgraded database simply has none, and every existing row is kept. The
table definition is frozen here, like those of 0001 and 0002.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
# edgefl_meta's schema_version after this revision: bump it, and SCHEMA_VERSION in
# edgefl/store/schema.py, so that older edgefl releases refuse the upgraded database
schema_version = 6


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("project", sa.String(64), primary_key=True),
        sa.Column("active_model", sa.String(128), nullable=True),
        sa.Column("active_set_by", sa.String(256), nullable=True),
        sa.Column("active_set_at", sa.Float(), nullable=True),
        sa.Column("updated", sa.Float(), nullable=False),
    )
    op.execute(
        sa.text("UPDATE edgefl_meta SET value = :v WHERE key = 'schema_version'").bindparams(
            v=str(schema_version)
        )
    )


def downgrade() -> None:
    op.drop_table("projects")
    op.execute(sa.text("UPDATE edgefl_meta SET value = '5' WHERE key = 'schema_version'"))
