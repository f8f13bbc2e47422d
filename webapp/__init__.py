"""The portal's web application (application factory).

Imports nothing from `ml/` or `worker/` and no TensorFlow/Keras/shap: tasks are sent by name
(webapp.queue), and a test checks that `create_app()` leaves those modules unimported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask_migrate import Migrate

from . import audit, security
from .accounts import cli as accounts_cli
from .accounts import routes as accounts_routes
from .api import bp as api_blueprint
from .api import docs_page as api_docs_page
from .auth import routes as auth_routes
from .auth import sessions
from .backup import cli as backup_cli
from .batches import cli as batches_cli
from .batches import routes as batches_routes
from .cases import cli as cases_cli
from .cases import explanation_routes
from .cases import routes as cases_routes
from .config import DISCLAIMER, REPO_ROOT, Settings
from .dashboard import routes as dashboard_routes
from .db import db
from .errors import register_error_pages
from .model_versions import cli as model_versions_cli
from .model_versions import routes as model_versions_routes
from .models import DX_LONG_NAMES, REVIEW_ROLES, UPLOAD_ROLES
from .review import routes as review_routes
from .similar import cli as similar_cli

BLUEPRINTS = (
    auth_routes.bp,
    cases_routes.bp,
    explanation_routes.bp,
    batches_routes.bp,
    review_routes.bp,
    dashboard_routes.bp,
    model_versions_routes.bp,
    accounts_routes.bp,
    api_blueprint,
    api_docs_page.bp,
    accounts_cli.bp,
    batches_cli.bp,
    cases_cli.bp,
    model_versions_cli.bp,
    backup_cli.bp,
    similar_cli.bp,
)


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Builds the Flask app from defaults, then the environment, then `overrides` (tests).

    Args:
        overrides: settings (e.g. DATABASE_URL, STORAGE_DIR) or Flask config keys (TESTING).

    Returns:
        The configured app with its blueprints, database and CLI commands.
    """
    os.umask(0o077)  # the SQLite database, stored images, maps and exports: the service user's only
    settings = Settings.load(overrides)
    app = Flask(
        __name__,
        instance_path=str(settings.INSTANCE_DIR),
        template_folder=str(REPO_ROOT / "templates"),
        static_folder=str(REPO_ROOT / "static"),
    )
    app.config.from_mapping(settings.flask_config())
    app.url_map.converters["int"] = security.IdConverter  # before the routes: ids past the DB's range 404
    app.json = security.BoundedJSON(app)
    app.json.sort_keys = False  # keep "id" and "status" first, as the presenters order them
    app.extensions["settings"] = settings

    db.init_app(app)
    Migrate(app, db, directory=str(REPO_ROOT / "migrations"), render_as_batch=True, compare_type=True)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    app.jinja_env.globals.update(
        disclaimer=DISCLAIMER,
        dx_long_names=DX_LONG_NAMES,
        review_roles=REVIEW_ROLES,
        upload_roles=UPLOAD_ROLES,
    )
    app.jinja_env.filters["audit_text"] = audit.as_text
    sessions.init_app(app)  # Flask-Login
    security.init_app(app)  # CSRF, rate limits, security headers
    register_error_pages(app)
    return app
