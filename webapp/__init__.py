"""The portal's web application (application factory).

Imports nothing from `ml/` or `worker/` and no TensorFlow/Keras/shap: tasks are sent by name
(webapp.queue), and a test checks that `create_app()` leaves those modules unimported.
"""

from __future__ import annotations

from typing import Any, Mapping

from flask import Flask, jsonify, render_template, request

from .config import DISCLAIMER, REPO_ROOT, Settings


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Builds the Flask app from defaults, then the environment, then `overrides` (tests).

    Args:
        overrides: settings (e.g. DATABASE_URL, STORAGE_DIR) or Flask config keys (TESTING).

    Returns:
        The configured app with its blueprints, database and CLI commands.
    """
    settings = Settings.load(overrides)
    app = Flask(
        __name__,
        instance_path=str(settings.INSTANCE_DIR),
        template_folder=str(REPO_ROOT / "templates"),
        static_folder=str(REPO_ROOT / "static"),
    )
    app.config.from_mapping(settings.flask_config())
    app.json.sort_keys = False  # keep "id" and "status" first, as the presenters order them
    app.extensions["settings"] = settings

    from flask_migrate import Migrate

    from . import api, auth, cli, explanations, pages
    from .auth import csrf_token
    from .db import db

    db.init_app(app)
    Migrate(app, db, directory=str(REPO_ROOT / "migrations"), render_as_batch=True, compare_type=True)
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(explanations.bp)
    app.register_blueprint(cli.bp)
    _register_research_portal(app)
    app.jinja_env.globals.update(csrf_token=csrf_token, disclaimer=DISCLAIMER)
    from . import security

    security.init_app(app)  # security headers, login rate limiting
    _register_error_pages(app)
    return app


def _register_research_portal(app: Flask) -> None:
    """Batches, case history, review, dashboard, admin, export and their API (webapp/portal.py etc.)."""
    from . import admin, api_portal, cli_portal, portal
    from .models import DX_LONG_NAMES, REVIEW_ROLES, UPLOAD_ROLES

    for blueprint in (portal.bp, admin.bp, api_portal.bp, cli_portal.batch_bp, cli_portal.models_bp):
        app.register_blueprint(blueprint)
    app.jinja_env.globals.update(dx_long_names=DX_LONG_NAMES, review_roles=REVIEW_ROLES, upload_roles=UPLOAD_ROLES)


def _register_error_pages(app: Flask) -> None:
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
            return jsonify({"error": exc.description, "status": exc.code}), exc.code
        return render_template("error.html", error=exc), exc.code
