"""Schema version 7: the ``memberships`` table, who belongs to which project with what role.

Revision ID: 0004
Revises: 0003

Teams (docs/security.md, "Teams and project scoping"): a person's role in a project comes
from their membership there. A project with no membership rows keeps the behaviour of
schema 6 (the token's own role and project claim decide), so an upgraded database simply has
none and every deployment works as before until an admin invites the first member. Every
existing row is kept. The table definition is frozen here, like those of 0001 to 0003.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
# edgefl_meta's schema_version after this revision: bump it, and SCHEMA_VERSION in
# edgefl/store/schema.py, so that older edgefl releases refuse the upgraded database
schema_version = 7


def upgrade() -> None:
    op.create_table(
        "memberships",
        sa.Column("project", sa.String(64), primary_key=True),
        sa.Column("user", sa.String(256), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("invited_by", sa.String(256), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
    )
    op.create_index("ix_memberships_user", "memberships", ["user"])
    op.execute(
        sa.text("UPDATE edgefl_meta SET value = :v WHERE key = 'schema_version'").bindparams(
            v=str(schema_version)
        )
    )


def downgrade() -> None:
    op.drop_index("ix_memberships_user", table_name="memberships")
    op.drop_table("memberships")
    op.execute(sa.text("UPDATE edgefl_meta SET value = '6' WHERE key = 'schema_version'"))
