"""Alembic's entry point: migrate the connection edgefl hands over, inside its transaction.

``edgefl.store.schema.upgrade`` opens the transaction (and takes the lock) and passes the
connection in ``config.attributes``; Alembic then runs every migration in that transaction.
Developers may also run the ``alembic`` command with ``-x url=...`` (for example to
autogenerate a revision against ``edgefl.store.sql``'s models); it gets its own transaction.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from edgefl.store.schema import VERSION_TABLE
from edgefl.store.sql import _Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=_Base.metadata,
        version_table=VERSION_TABLE,
        # SQLite alters most columns only by copying the table: Alembic's batch mode does that
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    given = context.config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///path/state.db ...")
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


_main()
