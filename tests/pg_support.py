"""A throwaway PostgreSQL cluster for the database tests (session fixture `postgres_url`).

If TEST_POSTGRES_URL is set, that server is used (it must allow CREATE DATABASE). Otherwise the
Debian `postgresql` binaries (installed by scripts/install_system_deps.sh, which `make test` runs)
start a cluster in a temporary folder on a free loopback port: initdb, then pg_ctl, with fsync off
(a test cluster need not survive a power cut). PostgreSQL refuses to run as root, so as root the
commands run as the `postgres` user (runuser). Each test gets its own database (`fresh_postgres_url`).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from portal_helpers import missing_part

INSTALL_HINT = "install PostgreSQL (scripts/install_system_deps.sh, run by `make test`) or set TEST_POSTGRES_URL"


def find_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if Path(candidate, "initdb").is_file():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def require_bindir() -> Path:
    """The PostgreSQL binaries; without them the test is skipped, or failed with CI=true."""
    bindir = find_bindir()
    if bindir is None:
        missing_part(f"PostgreSQL is not installed: {INSTALL_HINT}")
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


@pytest.fixture(scope="session")
def postgres_url():
    """A server URL (database `postgres`, superuser `postgres`, no password, loopback only)."""
    existing = os.environ.get("TEST_POSTGRES_URL")
    if existing:
        yield existing
        return
    bindir = require_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="dermportal-pg-"))
    data, log = workdir / "data", workdir / "postgres.log"
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    workdir.chmod(0o700)
    port = _free_port()
    run = lambda argv: subprocess.run(_as_postgres(argv), capture_output=True, text=True, timeout=120)  # noqa: E731
    result = run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ]
    )
    if result.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{result.stdout}\n{result.stderr}")
    options = (
        f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=50"
    )
    result = run([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start"])
    if result.returncode != 0:
        text = log.read_text(errors="replace") if log.exists() else ""
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{text}")
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    os.environ["TEST_POSTGRES_URL"] = url  # for anything that reads it (subprocesses, test_postgres)
    try:
        yield url
    finally:
        os.environ.pop("TEST_POSTGRES_URL", None)
        run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A new, empty database on the server; its URL."""
    import sqlalchemy as sa

    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, url: str) -> None:
    import sqlalchemy as sa

    name = sa.engine.make_url(url).database
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def fresh_postgres_url(postgres_url):
    """A new, empty database on the test server for one test; dropped afterwards."""
    url = create_database(postgres_url)
    try:
        yield url
    finally:
        drop_database(postgres_url, url)


@pytest.fixture
def new_postgres_database(postgres_url):
    """A factory of new, empty databases on the test server (for tests that need two); all dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(create_database(postgres_url))
        return made[-1]

    yield make
    for url in made:
        drop_database(postgres_url, url)
