"""First-run setup used by the launcher: apply migrations, create the first admin account, register the
shipped model versions."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from flask import Flask
from flask_migrate import upgrade
from sqlalchemy import func, select

from .accounts.service import create_user
from .auth.passwords import password_problem
from .db import db
from .model_versions.service import register_model_version
from .models import User

DEFAULT_ADMIN = "admin@localhost"


def upgrade_database(app: Flask) -> None:
    """Applies every Alembic migration (`flask db upgrade`)."""
    with app.app_context():
        upgrade()
        db.engine.dispose()


def ensure_admin(app: Flask, password_file: Path, email: str = DEFAULT_ADMIN) -> str | None:
    """Creates `email` as admin with a random password when there are no users yet.

    The password is written to `password_file` (mode 0600) and returned; None when users exist.
    """
    with app.app_context():
        if db.session.scalar(select(func.count(User.id))):
            return None
        password = secrets.token_urlsafe(18)  # 24 characters: past the password rules' minimum
        while password_problem(password, email):  # all but never (e.g. it holds "admin")
            password = secrets.token_urlsafe(18)
        create_user(email, "admin", password, None)  # the rules and the audit log of every account
        db.engine.dispose()
    password_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def register_shipped_models(app: Flask, models_root: Path) -> list[str]:
    """Registers every model artifact under `models_root` (the served one and the archived earlier
    versions), so that cases can be re-run with any of them and compared side by side.

    Returns:
        "name version" of each artifact found.
    """
    found = []
    manifests = sorted(models_root.glob("*/manifest.json")) + sorted(models_root.glob("archive/*/manifest.json"))
    with app.app_context():
        for manifest_path in manifests:
            try:
                manifest = json.loads(manifest_path.read_text())
                row = register_model_version(manifest, manifest_path.parent)
            except (ValueError, KeyError, TypeError) as exc:
                app.logger.warning("%s is not a valid model manifest (%s); not registered", manifest_path, exc)
                continue
            found.append(f"{row.name} {row.version}")
        db.engine.dispose()
    return found
