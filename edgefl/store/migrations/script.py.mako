"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}
# edgefl_meta's schema_version after this revision: bump it, and SCHEMA_VERSION in
# edgefl/store/schema.py, so that older edgefl releases refuse the upgraded database
schema_version = 5


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}
    op.execute(
        sa.text("UPDATE edgefl_meta SET value = :v WHERE key = 'schema_version'").bindparams(
            v=str(schema_version)
        )
    )


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
