"""The one Alembic migration builds exactly the schema of webapp.models, and can be undone."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from webapp import create_app
from webapp.db import db


def test_upgrade_matches_models_and_downgrade_empties(tmp_path):
    from flask_migrate import downgrade, upgrade

    app = create_app({"TESTING": True, "INSTANCE_DIR": tmp_path, "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"})
    with app.app_context():
        upgrade()
        tables = set(inspect(db.engine).get_table_names())
        assert {"users", "api_tokens", "cases", "images", "model_versions", "analyses", "jobs"} <= tables
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, db.metadata) == []
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        db.engine.dispose()
