"""A consistent copy of the database and its way back, per engine.

SQLite: the online backup API (`sqlite3.Connection.backup`) copies every page in one step under a
read transaction, so in WAL mode it sees one committed state while the web app and the worker keep
writing. PostgreSQL: `pg_dump` reads inside a snapshot exported from a REPEATABLE READ transaction
that stays open meanwhile, so the caller can read, in that same snapshot, which files the rows
name; `psql` restores the dump in a single transaction (the old schema dropped in the same
transaction), so a failed restore leaves the database as it was.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

SQLITE_FILE = "database.sqlite"
POSTGRES_FILE = "database.pgdump"


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why, in a full sentence."""


def engine_kind(engine: sa.Engine) -> str:
    name = engine.dialect.name
    if name not in ("sqlite", "postgresql"):
        raise BackupError(f"Backups support SQLite and PostgreSQL, not {name}.")
    return name


@contextmanager
def dumped(engine: sa.Engine, folder: Path) -> Iterator[tuple[Path, sa.Connection]]:
    """Writes the database's copy into `folder`; yields it and a connection that reads the same state."""
    if engine_kind(engine) == "sqlite":
        target = folder / SQLITE_FILE
        _sqlite_copy(sqlite3.connect(_sqlite_path(engine), timeout=15), sqlite3.connect(target))
        copy = sa.create_engine(f"sqlite:///{target}")
        try:
            with copy.connect() as conn:
                yield target, conn
        finally:
            copy.dispose()
        return
    target = folder / POSTGRES_FILE
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
        _pg_run(engine, "pg_dump", ["--format=custom", f"--snapshot={snapshot}", f"--file={target}"])
        yield target, conn
        conn.rollback()


def restore(engine: sa.Engine, dump: Path) -> None:
    """Replaces the whole database with `dump`, in one transaction."""
    if engine_kind(engine) == "sqlite":
        engine.dispose()  # no pooled connection keeps reading the old pages
        _sqlite_copy(sqlite3.connect(dump), sqlite3.connect(_sqlite_path(engine), timeout=15))
        return
    script = _pg_run(engine, "pg_restore", ["--no-owner", "--no-privileges", "--file=-", str(dump)], url=False)
    engine.dispose()
    sql = b"DROP SCHEMA public CASCADE;\nCREATE SCHEMA public;\n" + script
    # A portal left running holds locks on the tables: give up after 30 s rather than wait forever.
    args = ["--quiet", "--single-transaction", "-v", "ON_ERROR_STOP=1", "--file=-"]
    _pg_run(engine, "psql", args, stdin=sql, env={"PGOPTIONS": "-c lock_timeout=30s"})


def _sqlite_copy(source: sqlite3.Connection, target: sqlite3.Connection) -> None:
    try:
        source.backup(target)  # pages=-1: one step, one consistent state
    finally:
        source.close()
        target.close()


def _sqlite_path(engine: sa.Engine) -> str:
    path = engine.url.database
    if not path or path == ":memory:":
        raise BackupError("An in-memory SQLite database cannot be backed up or restored.")
    return path


def _pg_run(
    engine: sa.Engine,
    tool: str,
    args: list[str],
    *,
    url: bool = True,
    stdin: bytes | None = None,
    env: dict | None = None,
) -> bytes:
    """Runs a PostgreSQL client tool against the engine's database; the password goes by environment."""
    env = {**os.environ, **(env or {})}
    if engine.url.password:
        env["PGPASSWORD"] = engine.url.password
    target = engine.url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    argv = [_pg_tool(tool), *args, *([f"--dbname={target}"] if url else [])]
    result = subprocess.run(argv, input=stdin, capture_output=True, env=env)
    if result.returncode != 0:
        raise BackupError(f"{tool} failed (exit {result.returncode}): {result.stderr.decode(errors='replace')[-2000:]}")
    return result.stdout


def _pg_tool(name: str, which: Callable[[str], str | None] = shutil.which) -> str:
    """The tool on PATH, else the newest Debian PostgreSQL's."""
    found = which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[-3]))
    if not candidates:
        raise BackupError(f"{name} is not installed: install the PostgreSQL client (postgresql-client).")
    return candidates[-1]
