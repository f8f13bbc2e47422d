"""The migration and the constraints on PostgreSQL (the production database).

Runs only when TEST_POSTGRES_URL points at an empty, disposable database, e.g.
TEST_POSTGRES_URL=postgresql+psycopg2://portal@127.0.0.1:5432/portal_test make test
"""

import os

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

URL = os.environ.get("TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set TEST_POSTGRES_URL to test against PostgreSQL")


def test_migration_and_constraints_on_postgres(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from flask_migrate import downgrade, upgrade

    from webapp import create_app
    from webapp.db import db
    from webapp.models import Case, Image, Job, utcnow

    app = create_app({"TESTING": True, "INSTANCE_DIR": tmp_path, "DATABASE_URL": URL})
    with app.app_context():
        upgrade()
        try:
            with db.engine.connect() as conn:
                context = MigrationContext.configure(conn, opts={"compare_type": True})
                assert compare_metadata(context, db.metadata) == []
            case = Case(age=30, sex="male", site="back")
            image = Image(case=case, content_hash="d" * 64, storage_key="k", width=1, height=1)
            job = Job(image=image)
            db.session.add_all([case, image, job])
            db.session.commit()
            assert db.session.get(Job, job.id).created_at <= utcnow()
            db.session.add(Case(age=130))
            with pytest.raises(IntegrityError, match="ck_cases_age_range"):
                db.session.commit()
            db.session.rollback()
            db.session.add(Image(case_id=case.id, content_hash="d" * 64, storage_key="k2", width=1, height=1))
            with pytest.raises(IntegrityError, match="uq_images_content_hash"):
                db.session.commit()
            db.session.rollback()
        finally:
            db.session.remove()
            downgrade(revision="base")
            assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
            with db.engine.begin() as conn:
                conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
            db.engine.dispose()
