from pathlib import Path

import pytest

from webapp.config import ConfigError, Settings


def test_defaults_put_everything_under_the_instance_folder(tmp_path):
    s = Settings.load(environ={"INSTANCE_DIR": str(tmp_path)})
    assert s.DATABASE_URL == f"sqlite:///{tmp_path / 'portal.db'}"
    assert s.STORAGE_DIR == tmp_path / "storage"
    assert s.MODEL_DIR.parts[-2:] == ("models", "default")
    assert s.MAX_UPLOAD_MB == 20 and s.MAX_IMAGE_PIXELS == 40_000_000
    assert s.UNTRAINED_INPUT_SIZE == (120, 160)


def test_development_secret_is_generated_once(tmp_path):
    first = Settings.load(environ={"INSTANCE_DIR": str(tmp_path)}).SECRET_KEY
    second = Settings.load(environ={"INSTANCE_DIR": str(tmp_path)}).SECRET_KEY
    assert first == second and len(first) >= 32
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_production_requires_a_secret_key(tmp_path):
    with pytest.raises(ConfigError, match="SECRET_KEY is not set"):
        Settings.load(environ={"PORTAL_ENV": "production", "INSTANCE_DIR": str(tmp_path)})
    s = Settings.load(environ={"PORTAL_ENV": "production", "SECRET_KEY": "s" * 40, "INSTANCE_DIR": str(tmp_path)})
    assert s.SECRET_KEY == "s" * 40
    assert not (tmp_path / "secret_key").exists()


def test_environment_then_overrides(tmp_path):
    env = {
        "INSTANCE_DIR": str(tmp_path),
        "DATABASE_URL": "postgresql+psycopg2://u:p@db/portal",
        "REDIS_URL": "redis://redis:6379/1",
        "STORAGE_DIR": "/data/storage",
        "MODEL_DIR": "/models/x",
        "MAX_UPLOAD_MB": "5",
        "MAX_IMAGE_PIXELS": "1000000",
        "UNTRAINED_INPUT_SIZE": "64,64",
    }
    s = Settings.load({"MAX_UPLOAD_MB": 1, "STORAGE_DIR": str(tmp_path / "s")}, environ=env)
    assert s.DATABASE_URL.startswith("postgresql") and s.REDIS_URL == "redis://redis:6379/1"
    assert s.MODEL_DIR == Path("/models/x") and s.MAX_IMAGE_PIXELS == 1_000_000
    assert s.UNTRAINED_INPUT_SIZE == (64, 64)
    assert s.MAX_UPLOAD_MB == 1 and s.STORAGE_DIR == tmp_path / "s"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"UNTRAINED_INPUT_SIZE": "64"}, "UNTRAINED_INPUT_SIZE must look like"),
        ({"UNTRAINED_INPUT_SIZE": "16,16"}, "at least 32,32"),
        ({"MAX_UPLOAD_MB": "lots"}, "MAX_UPLOAD_MB must be a number"),
        ({"MAX_IMAGE_PIXELS": "-1"}, "MAX_IMAGE_PIXELS must be positive"),
        ({"PORTAL_ENV": "staging"}, "PORTAL_ENV must be one of"),
        ({"LOGIN_RATE_LIMIT": "five a minute"}, "LOGIN_RATE_LIMIT must look like '5 per 15 minutes'"),
        ({"UPLOAD_RATE_LIMIT": "100"}, "UPLOAD_RATE_LIMIT must look like"),
    ],
)
def test_bad_values_are_refused_with_a_message(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.load(environ={"INSTANCE_DIR": str(tmp_path), **env})


@pytest.mark.sqlite_only
def test_flask_config_and_sqlite_pragmas(app):
    from sqlalchemy import text

    from webapp.db import db

    assert app.config["TESTING"] and app.config["SECRET_KEY"]
    assert app.config["MAX_CONTENT_LENGTH"] > app.config["MAX_UPLOAD_MB"] * 1024 * 1024
    with app.app_context():
        assert db.session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert db.session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert db.session.execute(text("PRAGMA busy_timeout")).scalar() >= 1000


def test_worker_layout_gives_each_pool_process_its_share_of_the_cores(monkeypatch):
    import webapp.config as config

    monkeypatch.setattr(config, "usable_cpus", lambda: 2)
    auto = Settings.load(environ={})
    assert config.worker_layout(auto) == (2, 1)  # one single-threaded process per core
    assert config.worker_layout(auto, pool_processes=1) == (1, 2)  # a worker started with -c 1
    monkeypatch.setattr(config, "usable_cpus", lambda: 16)
    assert config.worker_layout(auto) == (4, 4)  # at most 4 processes by default
    explicit = Settings.load(environ={"WORKER_PROCESSES": "3", "PREDICT_THREADS": "2"})
    assert config.worker_layout(explicit) == (3, 2)
    assert Settings.load(environ={"WORKER_PROCESSES": "0"}).WORKER_PROCESSES == 0
    with pytest.raises(ConfigError, match="WORKER_PROCESSES"):
        Settings.load(environ={"WORKER_PROCESSES": "-1"})
