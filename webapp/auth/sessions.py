"""Who is asking: the session user of pages (Flask-Login), role checks, bearer tokens for the API."""

from __future__ import annotations

import functools
import secrets

from flask import Flask, Response, abort, g, jsonify, redirect, request, session, url_for
from flask_login import LoginManager, current_user, login_required
from sqlalchemy import func, select
from werkzeug.security import check_password_hash, generate_password_hash

from ..db import db
from ..models import ApiToken, User, hash_token, utcnow

login_manager = LoginManager()
login_manager.login_view = "auth.login"  # login_required redirects there with ?next=<this page>
login_manager.login_message = None


def init_app(app: Flask) -> None:
    login_manager.init_app(app)


@login_manager.user_loader
def load_user(session_id: str) -> User | None:
    """The session's user, when the session is still current: `User.get_id()` is "id:generation",
    and logout, a password or role change and deactivation raise the generation, so a cookie
    issued before them (replayed, or left in another browser) no longer signs anyone in."""
    user_id = session_id.partition(":")[0]
    user = db.session.get(User, int(user_id)) if user_id.isdigit() and len(user_id) < 19 else None
    if user is not None and user.active and user.get_id() == session_id:
        return user
    session.clear()
    return None


def set_g_user() -> None:
    """Runs before every request: the signed-in user (or None) in `g.user`, for views and templates."""
    g.user = current_user._get_current_object() if current_user.is_authenticated else None


def role_required(*roles: str):
    """The view needs a signed-in user with one of `roles` (anonymous: redirect to login; else 403)."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(**kwargs):
            if current_user.role not in roles:
                abort(403, description=f"This page needs the role {' or '.join(roles)}; you are {current_user.role}.")
            return view(**kwargs)

        return login_required(wrapped)

    return decorate


def find_user(email: str) -> User | None:
    return db.session.scalar(select(User).where(func.lower(User.email) == email.strip().lower()))


@functools.cache
def _dummy_hash() -> str:
    return generate_password_hash(secrets.token_hex(16))


def authenticate(email: str, password: str) -> User | None:
    """The active user with this email and password, or None. Every attempt hashes once, whether
    the account exists, is inactive or not, so that the answer's timing names no account."""
    user = find_user(email)
    if user is None:
        check_password_hash(_dummy_hash(), password)
        return None
    return user if user.check_password(password) and user.active else None


# --- API tokens ---------------------------------------------------------------------------------


def user_from_bearer() -> tuple[User | None, str | None]:
    """The user of the request's `Authorization: Bearer <token>`, or None and the reason."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return None, "Missing Authorization header; send 'Authorization: Bearer <token>'."
    if scheme.lower() != "bearer" or not token.strip():
        return None, "Malformed Authorization header; send 'Authorization: Bearer <token>'."
    row = db.session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token.strip())))
    if row is None or row.revoked_at is not None or not row.user.active:
        return None, "Invalid or revoked API token."
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:  # not a write per request
        row.last_used_at = now
        db.session.commit()
    return row.user, None


def viewer_or_refusal() -> tuple[User | None, Response | None]:
    """For files that pages and API clients both fetch: (the session user or the bearer token's
    user, None), or (None, the refusal: 401 for a bad token, else a redirect to the login page)."""
    if g.get("user") is not None:
        return g.user, None
    if request.headers.get("Authorization"):
        user, reason = user_from_bearer()
        if user is None:
            response = jsonify({"error": reason, "status": 401})
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Bearer realm="dermportal"'
            return None, response
        return user, None
    return None, redirect(url_for("auth.login", next=request.path))
