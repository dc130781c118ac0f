"""Schema version 5: the fleet tables (devices, combiners); models.size becomes BigInteger.

Revision ID: 0002
Revises: 0001

The controllers record what they see of the fleet (presence, tasks, last telemetry, update
counts) so the REST API can list devices and combiners without talking to a broker. The
table definitions are frozen here, like 0001's: ``edgefl.store.sql`` describes the newest
schema, this the schema of version 5. ``models.size`` held blob sizes in a 32-bit integer
on PostgreSQL (2 GiB at most); it is widened in place (on SQLite, Alembic's batch mode copies
the table), keeping every row.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
# edgefl_meta's schema_version after this revision: bump it, and SCHEMA_VERSION in
# edgefl/store/schema.py, so that older edgefl releases refuse the upgraded database
schema_version = 5


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("project", sa.String(64), primary_key=True),
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("region", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("current_task", sa.String(160), nullable=False),
        sa.Column("telemetry", sa.JSON(), nullable=False),
        sa.Column("telemetry_at", sa.Float(), nullable=True),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("declined", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
    )
    op.create_index("ix_devices_region", "devices", ["region"])
    op.create_table(
        "combiners",
        sa.Column("project", sa.String(64), primary_key=True),
        sa.Column("region", sa.String(64), primary_key=True),
        sa.Column("combiner", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("current_task", sa.String(160), nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
    )
    with op.batch_alter_table("models") as batch:
        batch.alter_column(
            "size", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False
        )
    op.execute(
        sa.text("UPDATE edgefl_meta SET value = :v WHERE key = 'schema_version'").bindparams(
            v=str(schema_version)
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.alter_column(
            "size", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False
        )
    op.drop_table("combiners")
    op.drop_index("ix_devices_region", "devices")
    op.drop_table("devices")
    op.execute(sa.text("UPDATE edgefl_meta SET value = '4' WHERE key = 'schema_version'"))
