"""The database on both backends: SQLite (the embedded default) and PostgreSQL (production).

The migrations up and down, the model constraints and a real upload through the API run once per
backend (`db_url` is parametrized). PostgreSQL is a throwaway cluster started by the session fixture
in tests/pg_support.py (or the server in TEST_POSTGRES_URL); without PostgreSQL installed these
`postgresql` cases are skipped with the reason, never silently.
"""

from __future__ import annotations

import io

import pytest
from portal_helpers import SMALL_IMAGES, image_bytes, make_token, make_user
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

pytestmark = pytest.mark.db_backends


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'backend.db'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def migrated_app(db_url, tmp_path):
    from flask_migrate import upgrade

    from webapp import create_app
    from webapp.db import db

    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": tmp_path / "instance",
            "DATABASE_URL": db_url,
            "STORAGE_DIR": tmp_path / "storage",
            "MODEL_DIR": tmp_path / "no-model",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_TIMEOUT": 0.5,
        }
    )
    with app.app_context():
        upgrade()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_migrations_match_the_models_and_go_down_and_up_again(migrated_app):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from flask_migrate import downgrade, upgrade

    from webapp.db import db

    with migrated_app.app_context():
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, db.metadata) == []
        assert {"users", "cases", "images", "jobs", "analyses"} <= set(inspect(db.engine).get_table_names())
        db.session.remove()
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        upgrade()
        assert "jobs" in inspect(db.engine).get_table_names()


def test_model_constraints(migrated_app):
    from webapp.db import db
    from webapp.models import Case, Image, Job, utcnow

    with migrated_app.app_context():
        case = Case(age=30, sex="male", site="back")
        image = Image(case=case, content_hash="d" * 64, storage_key="k", width=1, height=1)
        job = Job(image=image)
        db.session.add_all([case, image, job])
        db.session.commit()
        created = db.session.get(Job, job.id).created_at
        assert created.tzinfo is not None and created <= utcnow()
        bad = [
            (lambda: Case(age=130), "age_range"),
            (lambda: Case(sex="robot"), "ck_cases_sex"),
            (
                lambda: Image(case_id=case.id, content_hash="d" * 64, storage_key="k2", width=1, height=1),
                "uq_images_content_hash|UNIQUE",
            ),
            (
                lambda: Image(case_id=987654, content_hash="e" * 64, storage_key="k3", width=1, height=1),
                "FOREIGN KEY|foreign key",
            ),
            (lambda: Job(image_id=image.id, status="lost"), "ck_jobs_status|CHECK"),
        ]
        for make, message in bad:
            db.session.add(make())
            with pytest.raises(IntegrityError, match=message):
                db.session.commit()
            db.session.rollback()
        db.session.execute(text("SELECT 1"))


def test_upload_flow_through_the_api(migrated_app, sent_tasks):
    from webapp.db import db
    from webapp.models import Case, Image, Job

    make_user(migrated_app, "pg@example.org")
    headers = {"Authorization": f"Bearer {make_token(migrated_app, 'pg@example.org')}"}
    client = migrated_app.test_client()
    data = image_bytes(SMALL_IMAGES[2])
    response = client.post(
        "/api/v1/cases",
        headers=headers,
        data={"image": (io.BytesIO(data), "lesion.jpg"), "age": "52", "sex": "male", "site": "back"},
    )
    assert response.status_code == 202, response.get_json()
    body = client.get(response.json["url"], headers=headers).get_json()
    assert body["age"] == 52 and body["site"] == "back" and body["status"] == "queued"
    assert sent_tasks == [("worker.tasks.analyse", (response.json["job_id"],), "predict")]
    again = client.post("/api/v1/cases", headers=headers, data={"image": (io.BytesIO(data), "again.jpg")})
    assert again.status_code == 409 and again.json["id"] == response.json["id"]
    refused = client.post("/api/v1/cases", headers=headers, data={"image": (io.BytesIO(b"<svg/>"), "x.jpg")})
    assert refused.status_code == 415
    with migrated_app.app_context():
        assert [db.session.query(m).count() for m in (Case, Image, Job)] == [1, 1, 1]
