"""A real PostgreSQL for the store tests: the machine's own server, or one started here.

``postgres_server`` uses the server answering on 127.0.0.1:5432 (as user ``postgres``, trust
auth) if there is one; otherwise, or with ``EDGEFL_TEST_PG_OWN=1``, it starts a private
server from the Debian binaries (``initdb`` + ``pg_ctl``, package ``postgresql``) in a
temporary directory on a free loopback port, and stops it afterwards. ``initdb`` refuses to
run as root, so as root the server runs as the ``postgres`` user the package creates.

``postgres_database`` creates one database with a random name for the test run and drops it
at the end; ``postgres_url`` empties it before each test, so every test starts from a blank
database, as it does with a fresh SQLite file.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # a server extra: the device Pythons' test runs lack it
    import psycopg

OWN = os.environ.get("EDGEFL_TEST_PG_OWN", "") not in ("", "0")
SHARED = ("127.0.0.1", 5432)
SUPERUSER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    """Where a test PostgreSQL listens, and whether the tests started it."""

    host: str
    port: int
    own: bool

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3) for ``database`` as the superuser."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        """An autocommit psycopg connection, for CREATE/DROP DATABASE."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            autocommit=True,
            connect_timeout=3,
        )


def _answers(host: str, port: int) -> bool:
    """Whether a PostgreSQL that lets the superuser in is listening there."""
    try:
        with PostgresServer(host, port, own=False).connect() as conn:
            conn.execute("SELECT 1")
    except Exception:
        return False
    return True


def find_pg_bin() -> Path:
    """The newest Debian PostgreSQL binaries (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise FileNotFoundError(
        "no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql package "
        "(make system-deps)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL in a temporary directory on a free loopback port, then stopped."""
    bin_dir = find_pg_bin()
    root = Path(tempfile.mkdtemp(prefix="edgefl-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the package's user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root needs the 'postgres' user (Debian's postgresql package "
                "creates it) to start a private PostgreSQL"
            ) from None
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    port = _free_port()
    try:
        subprocess.run(
            [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER,
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
             "-w", "-t", "60", "start"],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace")
        if log.exists():
            detail += log.read_text(errors="replace")
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start a private PostgreSQL: {detail}") from exc
    try:
        yield PostgresServer("127.0.0.1", port, own=True)
    finally:
        subprocess.run(
            [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The machine's PostgreSQL on 127.0.0.1:5432, or a private one started for the run."""
    if not OWN and _answers(*SHARED):
        yield PostgresServer(*SHARED, own=False)
        return
    stack = contextlib.ExitStack()
    try:
        started = stack.enter_context(own_postgres())
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{exc}. The store suite needs a real PostgreSQL.", pytrace=False)
    with stack:
        yield started


@pytest.fixture(scope="session")
def postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    """A database of this test run's own (random name), dropped at the end."""
    name = f"edgefl_test_{uuid.uuid4().hex[:12]}"
    with postgres_server.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.url(name)
    finally:
        with postgres_server.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, postgres_database: str) -> str:
    """The run's database, emptied first: each test starts from a blank schema."""
    name = postgres_database.rsplit("/", 1)[1]
    with postgres_server.connect(name) as conn:
        # a store a failed test left open must not hold the tables we drop
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_database
