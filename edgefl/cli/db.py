"""`edgefl db`: the state store's schema, for operators who migrate explicitly.

Mounted into the main CLI with ``app.add_typer(db_app, name="db")``. Opening a store migrates
it anyway; these commands let an operator upgrade a database (for example a shared PostgreSQL)
at a moment of their choosing, before the new controller and dashboard start, and see where a
database stands. The versioning is described in docs/storage.md, section 5.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

db_app = typer.Typer(
    help="The state store's schema: show its revision, or upgrade it to this edgefl's.",
    no_args_is_help=True,
    add_completion=False,
)

StateOpt = typer.Option(
    "sqlite:///edgefl-state/state.db",
    "--state",
    help="state store URL: sqlite:///path/state.db or postgresql://user@host/db",
)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _engine(url: str, *, create: bool) -> Engine:
    """An engine like the store's (driver, pragmas, transactions) that migrates nothing yet."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from edgefl.store.sql import is_memory, make_engine

    try:
        parsed = make_url(url)
    except ArgumentError:
        _fail(f"--state {url!r} is not a database URL")
    if parsed.get_backend_name() == "sqlite" and not is_memory(url):
        path = Path(parsed.database or "")
        if not create and not path.is_file():
            _fail(f"no state store at {path.resolve()} (from --state {url})")
        path.parent.mkdir(parents=True, exist_ok=True)
    return make_engine(url)


@db_app.command()
def current(state: str = StateOpt) -> None:
    """Show the database's revision and schema version, and whether it needs an upgrade."""
    from sqlalchemy.exc import SQLAlchemyError

    from edgefl.store.schema import SchemaError, inspect_schema

    engine = _engine(state, create=False)
    try:
        typer.echo(inspect_schema(engine).describe())
    except (SQLAlchemyError, SchemaError) as exc:
        _fail(f"cannot read the state store {state}: {exc}")
    finally:
        engine.dispose()


@db_app.command()
def upgrade(state: str = StateOpt) -> None:
    """Migrate the database to this edgefl's schema (creating it when empty), in one go."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from edgefl.store.schema import SchemaError, inspect_schema
    from edgefl.store.schema import upgrade as run_upgrade

    engine = _engine(state, create=True)
    where = make_url(state).render_as_string(hide_password=True)
    try:
        before = inspect_schema(engine)
        after = run_upgrade(engine, where)
    except (SQLAlchemyError, SchemaError) as exc:
        _fail(f"cannot upgrade the state store {where}: {exc}")
    finally:
        engine.dispose()
    if before.current:
        typer.echo(f"already current: {after.describe()}")
    else:
        typer.echo(f"upgraded from {before.describe()}")
        typer.echo(f"now {after.describe()}")
