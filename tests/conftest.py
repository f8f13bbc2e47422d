"""Shared fixtures: a fresh app per test (tmp SQLite + tmp storage), a client, users and tokens."""

from __future__ import annotations

import os

import pytest
from pg_support import fresh_postgres_url, new_postgres_database, postgres_url  # noqa: F401  (PostgreSQL fixtures)
from portal_helpers import ENV_VARS, login, make_token, make_user
from s3_support import s3_bucket  # noqa: F401  (S3 fixture: a bucket on a moto server process)

# webapp is imported inside the fixtures, not at module level: tests/ml/ may check that ml/ runs
# without Flask.


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """Tests configure the app through overrides only, whatever the developer's shell exports.

    PORTAL_ENV=testing and a temporary INSTANCE_DIR keep anything that loads the settings from
    the environment (worker.celery_app on import) away from the developer's instance/ folder.
    """
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORTAL_ENV", "testing")
    monkeypatch.setenv("INSTANCE_DIR", str(tmp_path / "env-instance"))


def pytest_addoption(parser):
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default=os.environ.get("TEST_DATABASE", "sqlite"),
        help="the database of the `app` fixture (env TEST_DATABASE); postgresql runs only the tests that use it",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: checks SQLite itself; left out of the --database=postgresql pass")


def pytest_collection_modifyitems(config, items):
    """With --database=postgresql, the tests that use the `app` fixture (the database) and no others:
    deselected, not skipped, so that a second pass over the suite repeats only what the engine changes."""
    if config.getoption("--database") != "postgresql":
        return
    uses_app = [
        "app" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("sqlite_only") for item in items
    ]
    config.hook.pytest_deselected(items=[item for item, keep in zip(items, uses_app, strict=True) if not keep])
    items[:] = [item for item, keep in zip(items, uses_app, strict=True) if keep]


def pytest_sessionfinish(session, exitstatus):
    # A PostgreSQL pass over modules with no database test selects nothing: that is not a failure.
    if session.config.getoption("--database") == "postgresql" and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture
def database_url(request, tmp_path):
    if request.config.getoption("--database") == "postgresql":
        return request.getfixturevalue("fresh_postgres_url")
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def app(tmp_path, database_url):
    from webapp import create_app
    from webapp.db import db

    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": tmp_path / "instance",
            "DATABASE_URL": database_url,
            "STORAGE_DIR": tmp_path / "storage",
            "MODEL_DIR": tmp_path / "no-model",
            "REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens there: the broker is "down"
            "BROKER_TIMEOUT": 0.5,
        }
    )
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def sent_tasks(monkeypatch):
    """Records the tasks the web app sends instead of publishing them."""
    calls: list[tuple] = []

    def fake_send(name, *args, queue):
        calls.append((name, args, queue))
        return f"task-{len(calls)}"

    monkeypatch.setattr("webapp.queue.send", fake_send)
    return calls


@pytest.fixture
def researcher(app):
    make_user(app)
    return "researcher@example.org"


@pytest.fixture
def auth_headers(app, researcher):
    return {"Authorization": f"Bearer {make_token(app, researcher)}"}


@pytest.fixture
def logged_in(client, researcher):
    response = login(client, researcher)
    assert response.status_code == 302
    return client


@pytest.fixture
def web_sent(monkeypatch):
    """Records the tasks the web app sends by name instead of publishing them: (name, args, queue)."""
    calls: list[tuple] = []

    def fake_send(name, *args, queue):
        calls.append((name, args, queue))
        return "task-id"

    monkeypatch.setattr("webapp.queue.send", fake_send)
    return calls
