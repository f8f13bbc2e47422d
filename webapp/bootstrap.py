"""First-run setup used by the launcher: apply migrations, create the first admin account."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import Flask
from sqlalchemy import func, select

from .db import db
from .models import User

DEFAULT_ADMIN = "admin@localhost"


def upgrade_database(app: Flask) -> None:
    """Applies every Alembic migration (`flask db upgrade`)."""
    from flask_migrate import upgrade

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
        password = secrets.token_urlsafe(12)
        user = User(email=email, role="admin")
        user.set_password(password)
        db.session.add(user)
        db.session.commit()
        db.engine.dispose()
    password_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password
